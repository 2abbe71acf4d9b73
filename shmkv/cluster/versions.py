"""Versions of one key: dotted version vectors with one shared causal context (pure).

The scheme is the one of riak's dvvset.erl (Almeida, Gonçalves et al., "Dotted Version Vectors"),
in its explicit form: a replica's :class:`VersionSet` for a key is

- a *clock* ``{node: counter}``: the causal history it has seen. It is downward closed -- a
  clock entry ``a: 5`` means the dots ``a:1 .. a:5`` were all seen -- because dots of a node are
  only ever minted one after the other by that node, from a state that holds all its earlier ones;
- the *siblings*: the concurrent versions still alive, each a value (``None`` is a tombstone)
  tagged with the *dot* ``(node, counter)`` of the write that made it.

A dot of the clock is in one of three states for a replica: *unseen* (beyond the clock), *alive*
(a sibling carries it) or *dead* (seen but superseded: within the clock, no sibling). Merging two
replicas takes, per dot, the later state in unseen < alive < dead -- a join semi-lattice, so
merge is commutative, associative and idempotent, and no order of message delivery loses a
write. A write is only ever removed by a write whose context included it: that is the whole
promise "no silent last-write-wins".

Writes. The coordinator of a put holds its local VersionSet ``S`` for the key and gets the
client's context ``C`` (what the client read; ``None`` means "what you hold", ``S``'s clock):

    new = S minus the siblings whose dot C has seen, clock = join(S.clock, C), and a new sibling
          (value, dot = (node, max(S.clock[node], C[node]) + 1)), clock[node] = that counter

So a put supersedes exactly what its context saw; two puts from one context, or two puts that
met at different coordinators before seeing each other, are both kept (siblings); a put without
a context supersedes what its coordinator holds. The sibling count is bounded by the number of
writers that did not see each other, not by the number of writes.

REQUIRES of the caller (the coordinator): the VersionSet it calls :meth:`VersionSet.put` on is
its own durable local replica of the key, which holds every dot this node has minted for it.
A node that may have forgotten some (a memory-only restart, a fallback that handed its data off
and dropped it) must write under a fresh actor name, e.g. ``f"{name}@{incarnation}"``: otherwise
it could mint a dot that another replica already holds with a different value. Minting past the
client's context (the ``max`` above) narrows that window; merge keeps both values of such a
clash (a dot held alive with two values stays two siblings) so even then nothing is dropped
silently -- but the clash itself is a bug of the caller, not a state this module aims for.

Rejected alternatives: vector clocks with one entry per *client* (Riak before 2.0: the clock
grows with the number of clients, and pruning it loses causality) and plain per-node vector
clocks without dots (two writes through one coordinator from one context then look ordered and
one is lost -- the "sibling explosion vs lost update" dilemma DVVs were made for).

Expiry (TTLs). A sibling may carry ``expires``: an absolute wall-clock time in integer
milliseconds since the epoch, fixed once by the coordinator that minted its dot (now + ttl). It
is part of the version -- the same dot always carries the same expiry -- so merge keeps it
exactly, as it keeps the value, and every replica, read repair and anti-entropy moves the same
expiry around: an expired copy written back elsewhere is still expired there. A *reader* judges
expiry with :meth:`VersionSet.visible`: an expired sibling is left out of what is served (absent,
as a tombstone is for reads) but stays in the set and its dot in the clock, so it supersedes
nothing -- a concurrent sibling without expiry (or with a later one) is still served -- and a
write whose context saw it supersedes it as any sibling. Expiry is judged by each replica's (and
zero-hop reader's) own wall clock: with clocks that disagree by D, a key can be served up to D
after (or stop up to D before) the expiry its writer's coordinator computed.

Encoding (msgpack; DO NOT CHANGE: stored in the local store and sent on the wire):

    VersionSet: [VERSIONSET_FORMAT, [[node, counter], ...], [sibling, ...]]
      sibling:  [node_index, counter, value]            no expiry (every set before TTLs)
                [node_index, counter, value, expires]   expires: int ms since the epoch, >= 1
    Context:    [CONTEXT_FORMAT, [[node, counter], ...]]

clock entries sorted by node, counters >= 1; siblings sorted by (node_index, counter, value,
expires) with ``None`` (a tombstone) first and no expiry before any expiry, ``node_index``
pointing into the clock list. A sibling without expiry is always the three-element form, so every
set written before TTLs existed decodes, and re-encodes, to the same bytes. The encoding is
canonical -- equal version sets encode to equal bytes -- so Merkle trees can hash it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from ..errors import InvalidType
from .errors import ConfigError, ProtocolError

# DO NOT CHANGE: stored layouts. Tags are distinct across versions.py and crdt.py, so the first
# element of any stored value says what it is.
VERSIONSET_FORMAT = 1
CONTEXT_FORMAT = 2

MAX_COUNTER = (1 << 63) - 1
#: the largest ``expires`` (ms since the epoch) a sibling may carry
MAX_EXPIRES = (1 << 63) - 1
#: the longest TTL a put may ask for (ms; about 146 million years): now + it stays below MAX_EXPIRES
MAX_TTL_MS = 1 << 62
MAX_NODE_NAME = 255

#: One Packer for every encoding here: ``msgpack.packb`` builds a Packer per call, which costs
#: as much as the packing itself. Safe to share: ``pack`` runs in C without releasing the GIL
#: or calling back into Python for the types encoded here, and resets its buffer on an error.
_pack = msgpack.Packer(use_bin_type=True).pack

Dot = tuple[str, int]
Clock = dict[str, int]


def descends(a: Mapping[str, int], b: Mapping[str, int]) -> bool:
    """Whether clock ``a`` has seen everything clock ``b`` has (``a >= b`` entry by entry)."""
    return all(a.get(node, 0) >= c for node, c in b.items())


def join(a: Mapping[str, int], b: Mapping[str, int]) -> Clock:
    """The least clock that descends both (the maximum entry by entry)."""
    out = dict(a)
    for node, c in b.items():
        if c > out.get(node, 0):
            out[node] = c
    return out


def _seen(clock: Mapping[str, int], dot: Dot) -> bool:
    return dot[1] <= clock.get(dot[0], 0)


def _check_node(node: object) -> str:
    if not isinstance(node, str) or not node or len(node) > MAX_NODE_NAME:
        raise ConfigError(
            f"a version's node must be a non-empty str of at most {MAX_NODE_NAME} chars, got {node!r}"
        )
    return node


@dataclass(frozen=True, slots=True)
class Sibling:
    """One concurrent version: ``value`` (``None`` = tombstone) written as event ``dot``;
    ``expires``: wall-clock ms since the epoch after which it is not served (None: never)."""

    value: bytes | None
    dot: Dot
    expires: int | None = None

    def _key(self) -> tuple[str, int, bool, bytes, bool, int]:
        # Canonical order: by dot, a tombstone before a value of the same (clashing) dot, no
        # expiry before an expiry.
        return (
            self.dot[0], self.dot[1], self.value is not None, self.value or b"",
            self.expires is not None, self.expires or 0,
        )

    def expired(self, now_ms: int) -> bool:
        """Whether this version is past its expiry at wall-clock ``now_ms``."""
        return self.expires is not None and self.expires <= now_ms

    def __repr__(self) -> str:
        exp = "" if self.expires is None else f", expires={self.expires}"
        return f"Sibling({self.value!r}, {self.dot[0]}:{self.dot[1]}{exp})"


def _check_expires(expires: object) -> int | None:
    if expires is None:
        return None
    if isinstance(expires, bool) or not isinstance(expires, int) or not 1 <= expires <= MAX_EXPIRES:
        raise ConfigError(f"a version's expiry must be an int of ms since the epoch in 1..2**63-1, got {expires!r}")
    return expires


class Context:
    """What a reader saw: a clock, opaque to users. Pass it back with the ``put``/``delete``
    that resolves what was read; :meth:`encode`/:meth:`decode` carry it as bytes."""

    __slots__ = ("_clock",)

    def __init__(self, clock: Mapping[str, int] | None = None) -> None:
        clock = dict(clock or {})
        for node, c in clock.items():
            _check_node(node)
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= MAX_COUNTER:
                raise ConfigError(
                    f"context counter of {node!r} must be an int in 0..2**63-1, got {c!r}"
                )
        self._clock: tuple[tuple[str, int], ...] = tuple(
            sorted((n, c) for n, c in clock.items() if c)
        )

    @property
    def clock(self) -> Clock:
        return dict(self._clock)

    @classmethod
    def _trusted(cls, clock: Clock) -> Context:
        """The context of a clock that is already valid (a VersionSet's: non-empty str nodes,
        counters in 1..2**63-1) -- what :attr:`VersionSet.context` builds on every read,
        without checking it again."""
        out = object.__new__(cls)
        out._clock = tuple(sorted(clock.items()))
        return out

    def merge(self, other: Context) -> Context:
        """A context that has seen what both have (for a client that read twice)."""
        return Context(join(dict(self._clock), dict(other._clock)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Context) and self._clock == other._clock

    def __hash__(self) -> int:
        return hash(self._clock)

    def __repr__(self) -> str:
        return f"Context({dict(self._clock)})"

    def to_wire(self) -> list[Any]:
        return [CONTEXT_FORMAT, [list(e) for e in self._clock]]

    @classmethod
    def from_wire(cls, w: Any) -> Context:
        """:raises ProtocolError: ``w`` is not a context's wire form."""
        if not isinstance(w, list) or len(w) != 2 or w[0] != CONTEXT_FORMAT:
            raise ProtocolError("not a version context: expected [2, clock]")
        # _clock_from_wire checked what __init__ would check again (nodes, counters >= 1,
        # sorted and distinct -- so no sort either): the client decodes the context of every
        # put it makes
        out = object.__new__(cls)
        out._clock = tuple(_clock_from_wire(w[1]).items())
        return out

    def encode(self) -> bytes:
        # msgpack packs a tuple as the list to_wire() builds: the same bytes, no lists made
        # (every read's answer carries a context)
        return _pack((CONTEXT_FORMAT, self._clock))  # type: ignore[no-any-return]

    @classmethod
    def decode(cls, data: bytes) -> Context:
        """:raises ProtocolError: ``data`` is not an encoded context."""
        return cls.from_wire(_unpack(data, "version context"))


class VersionSet:
    """The versions one replica holds for one key. Immutable; every operation returns a new one.

    Invariants: every sibling's dot is within the clock (``dot[1] <= clock[dot[0]]``); siblings
    are distinct and kept in canonical order; no clock entry is 0.
    """

    __slots__ = ("_clock", "_siblings")

    def __init__(
        self, clock: Mapping[str, int] | None = None, siblings: Iterable[Sibling] = ()
    ) -> None:
        clock = {n: c for n, c in (clock or {}).items() if c}
        sibs = sorted(set(siblings), key=Sibling._key)
        for s in sibs:
            if not _seen(clock, s.dot):
                raise ConfigError(f"sibling {s!r} lies beyond the clock {clock}")
        self._clock: Clock = clock
        self._siblings: tuple[Sibling, ...] = tuple(sibs)

    # -- what a reader sees ---------------------------------------------------------------------

    @property
    def siblings(self) -> tuple[Sibling, ...]:
        return self._siblings

    @property
    def values(self) -> list[bytes | None]:
        """Every sibling's value, tombstones as ``None``, in canonical (dot) order."""
        return [s.value for s in self._siblings]

    def size(self) -> int:
        """The bytes of every sibling's value (what a copy of this set weighs on the wire, less
        its clocks)."""
        return sum(len(s.value) for s in self._siblings if s.value is not None)

    @property
    def distinct_values(self) -> list[bytes | None]:
        """:attr:`values` without repeats (two writers that wrote the same bytes agree)."""
        return list(dict.fromkeys(self.values))

    @property
    def clock(self) -> Clock:
        return dict(self._clock)

    @property
    def context(self) -> Context:
        """What a client that read this set has seen; give it back with the resolving write."""
        return Context._trusted(self._clock)  # the invariants hold the checks Context makes

    @classmethod
    def _trusted(cls, clock: Clock, siblings: tuple[Sibling, ...]) -> VersionSet:
        """A set from parts that already keep the invariants (from_wire checked them): no
        second sort and check."""
        out = object.__new__(cls)
        out._clock = clock
        out._siblings = siblings
        return out

    @property
    def is_deleted(self) -> bool:
        """No live value: never written, or every sibling is a tombstone."""
        for s in self._siblings:  # (a loop, not all() over a generator: every write asks)
            if s.value is not None:
                return False
        return True

    def visible(self, now_ms: int) -> VersionSet:
        """What a read at wall-clock ``now_ms`` serves: this set without its expired siblings
        (the clock, so the context a reader gets, is unchanged: a write with it supersedes the
        expired ones too). For answering reads only: stored sets are never filtered, so merge
        stays the only thing that changes one and every replica drops a version the same way.
        """
        for s in self._siblings:  # (a loop, not any() over a generator: every read asks)
            if s.expires is not None:
                break
        else:
            return self
        return VersionSet(self._clock, [s for s in self._siblings if not s.expired(now_ms)])

    @property
    def reclaim_at(self) -> int | None:
        """When the whole set may be dropped from a store (ms since the epoch): the latest
        expiry, if every sibling has one; None when some sibling never expires (or no sibling)."""
        if not self._siblings or any(s.expires is None for s in self._siblings):
            return None
        return max(s.expires for s in self._siblings if s.expires is not None)

    def __len__(self) -> int:
        return len(self._siblings)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VersionSet) and (self._clock, self._siblings) == (
            other._clock,
            other._siblings,
        )

    def __hash__(self) -> int:
        return hash((tuple(sorted(self._clock.items())), self._siblings))

    def __repr__(self) -> str:
        return f"VersionSet(clock={self._clock}, siblings={list(self._siblings)})"

    # -- the algebra --------------------------------------------------------------------------

    def put(
        self, value: bytes | None, context: Context | None, node: str, expires: int | None = None
    ) -> VersionSet:
        """The coordinator ``node``'s new write of ``value`` (``None``: delete) on this replica,
        served until wall-clock ms ``expires`` (None: no expiry; see "Expiry" above).

        Supersedes exactly the versions ``context`` saw (all of this replica's when ``None``).
        REQUIRES: ``self`` is ``node``'s own local replica of the key (see the module docstring).

        :raises ConfigError: a bad node name or expiry. :raises InvalidType: a value not bytes-like.
        """
        _check_node(node)
        expires = _check_expires(expires)
        if value is not None:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise InvalidType(
                    f"a version's value must be bytes or None, got {type(value).__name__}"
                )
            value = bytes(value)
        seen = self._clock if context is None else context.clock
        kept = [s for s in self._siblings if not _seen(seen, s.dot)]
        clock = join(self._clock, seen)
        counter = clock.get(node, 0) + 1
        if counter > MAX_COUNTER:
            raise ConfigError(f"the version counter of {node!r} is exhausted")
        clock[node] = counter
        kept.append(Sibling(value, (node, counter), expires))
        return VersionSet(clock, kept)

    @classmethod
    def put_encoded(
        cls, data: bytes | None, value: bytes | None, node: str, expires: int | None = None
    ) -> tuple[VersionSet, bytes]:
        """``decode(data).put(value, None, node, expires)`` and its :meth:`encode`, for the hot
        path of a put without a context (RESP SET, ``put`` without ``context=``): ``data`` is the
        stored encoding (None: nothing stored). Such a put supersedes every sibling held
        (they are all within the set's own clock: the invariant), so only the clock is decoded
        and checked -- the siblings are dropped unread, and the new set is built and encoded
        in one step. The result is the one :meth:`put` gives (tests/cluster/test_versions.py
        checks it against it); a stored clock that is not valid raises as :meth:`decode` does.
        Rejected: decoding siblings only to drop them (half the cost of a SET in the daemon).

        REQUIRES: ``node`` a valid node name and ``value`` bytes, ``expires`` None or valid
        (the coordinator's own write: replica.py checks them once).
        """
        if data is None:
            clock: Clock = {}
        else:
            w = _unpack(data, "version set")
            if type(w) is not list or len(w) != 3 or w[0] != VERSIONSET_FORMAT or type(w[2]) is not list:
                raise ProtocolError("not a version set: expected [1, clock, siblings]")
            clock = _clock_from_wire(w[1])
        counter = clock.get(node, 0) + 1
        if counter > MAX_COUNTER:
            raise ConfigError(f"the version counter of {node!r} is exhausted")
        clock[node] = counter
        out = object.__new__(cls)
        out._clock = clock
        out._siblings = (Sibling(value, (node, counter), expires),)
        nodes = sorted(clock)
        sib = [nodes.index(node), counter, value] if expires is None else [nodes.index(node), counter, value, expires]
        enc = _pack([VERSIONSET_FORMAT, [[n, clock[n]] for n in nodes], [sib]])
        return out, enc

    def delete(self, context: Context | None, node: str) -> VersionSet:
        """A tombstone with its own dot: :meth:`put` of ``None``."""
        return self.put(None, context, node)

    def merge(self, other: VersionSet) -> VersionSet:
        """Both replicas' knowledge: per dot the later of unseen < alive < dead.

        A sibling survives unless the other side has seen its dot and holds no sibling with
        that dot (it was superseded there). Two values for one dot (see the REQUIRES in the
        module docstring) both survive rather than one being picked.
        """
        if other is self:
            return self
        mine = {s.dot for s in self._siblings}
        theirs = {s.dot for s in other._siblings}
        kept = [s for s in self._siblings if s.dot in theirs or not _seen(other._clock, s.dot)]
        kept += [s for s in other._siblings if s.dot in mine or not _seen(self._clock, s.dot)]
        return VersionSet(join(self._clock, other._clock), kept)

    def descends(self, other: VersionSet) -> bool:
        """Whether this set already knows everything ``other`` does (merging it changes nothing)."""
        return self.merge(other) == self

    # -- encoding ------------------------------------------------------------------------------

    def to_wire(self) -> list[Any]:
        """The canonical msgpack-friendly form (see the module docstring)."""
        nodes = sorted(self._clock)
        index = {n: i for i, n in enumerate(nodes)}
        return [
            VERSIONSET_FORMAT,
            [[n, self._clock[n]] for n in nodes],
            [
                [index[s.dot[0]], s.dot[1], s.value]
                if s.expires is None
                else [index[s.dot[0]], s.dot[1], s.value, s.expires]
                for s in self._siblings
            ],
        ]

    @classmethod
    def from_wire(cls, w: Any) -> VersionSet:
        """:raises ProtocolError: ``w`` is not a canonical VersionSet wire form."""
        if not isinstance(w, list) or len(w) != 3 or w[0] != VERSIONSET_FORMAT:
            raise ProtocolError("not a version set: expected [1, clock, siblings]")
        clock = _clock_from_wire(w[1])
        raw = w[2]
        if type(raw) is list and len(raw) == 1 and len(clock) == 1:
            # The commonest set: one version, written by the clock's one node -- what the loop
            # below accepts of it, checked flat (every read of a 1-node cluster decodes one)
            e = raw[0]
            if type(e) is list and len(e) == 3:
                i, c, v = e
                if type(i) is int and i == 0 and type(c) is int and (v is None or type(v) is bytes):
                    ((node, top),) = clock.items()
                    if 1 <= c <= top:
                        return cls._trusted(clock, (Sibling(v, (node, c)),))
        nodes = [e[0] for e in w[1]]
        if not isinstance(raw, list):
            raise ProtocolError("version set siblings must be a list")
        sibs: list[Sibling] = []
        for e in raw:
            ne = len(e) if isinstance(e, list) else 0
            if ne == 3:
                i, c, v = e
                x = None
            elif ne == 4:
                i, c, v, x = e
                if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= MAX_EXPIRES:
                    raise ProtocolError(f"sibling expiry {x!r} must be an int of ms in 1..2**63-1")
            else:
                raise ProtocolError("a sibling must be [node_index, counter, value(, expires)]")
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(nodes):
                raise ProtocolError(f"sibling node index {i!r} is out of range")
            if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= clock[nodes[i]]:
                raise ProtocolError(
                    f"sibling counter {c!r} of {nodes[i]!r} is not within the clock"
                )
            if v is not None and not isinstance(v, bytes):
                raise ProtocolError(f"sibling value must be bytes or nil, got {type(v).__name__}")
            sibs.append(Sibling(v, (nodes[i], c), x))
        if len(sibs) > 1:
            keys = [s._key() for s in sibs]
            if keys != sorted(set(keys)):
                raise ProtocolError("version set siblings are not distinct and in canonical order")
        # Checked above: clock counters >= 1, every dot within the clock, siblings distinct and
        # canonical -- the invariants __init__ would establish again.
        return cls._trusted(clock, tuple(sibs))

    def encode(self) -> bytes:
        """msgpack bytes of :meth:`to_wire`, for the local store and the wire."""
        return _pack(self.to_wire())  # type: ignore[no-any-return]

    @classmethod
    def decode(cls, data: bytes) -> VersionSet:
        """:raises ProtocolError: ``data`` is not an encoded VersionSet (never loops or crashes)."""
        return cls.from_wire(_unpack(data, "version set"))


def _clock_from_wire(raw: Any) -> Clock:
    if type(raw) is list and len(raw) == 1:
        # The commonest clock, one node's (a 1-node cluster; a key whose writes one coordinator
        # took): what the loop below accepts, checked flat -- every decode of a stored set or
        # a context runs this
        e = raw[0]
        if type(e) is list and len(e) == 2:
            node, c = e
            if type(node) is str and node and len(node) <= MAX_NODE_NAME and type(c) is int and 1 <= c <= MAX_COUNTER:
                return {node: c}
    if not isinstance(raw, list):
        raise ProtocolError("a clock must be a list of [node, counter]")
    clock: Clock = {}
    prev = ""
    for e in raw:
        if not (isinstance(e, list) and len(e) == 2):
            raise ProtocolError("a clock entry must be [node, counter]")
        node, c = e
        if not isinstance(node, str) or not node or len(node) > MAX_NODE_NAME:
            raise ProtocolError(
                f"clock node must be a non-empty str of at most {MAX_NODE_NAME} chars"
            )
        if node <= prev:
            raise ProtocolError("clock entries are not distinct and sorted by node")
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= MAX_COUNTER:
            raise ProtocolError(f"clock counter of {node!r} must be in 1..2**63-1, got {c!r}")
        clock[node] = c
        prev = node
    return clock


def _unpack(data: bytes, what: str) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"an encoded {what} must be bytes, got {type(data).__name__}")
    try:
        # raw=False: node names arrive as str and values (bin) as bytes; a str value is refused.
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as e:
        raise ProtocolError(f"undecodable {what}: {e}") from None


__all__ = [
    "Clock",
    "Context",
    "Dot",
    "Sibling",
    "VersionSet",
    "descends",
    "join",
    "MAX_TTL_MS",
    "VERSIONSET_FORMAT",
    "CONTEXT_FORMAT",
]
