"""The ring: consistent hashing with weighted virtual nodes (pure; no I/O, no clock).

The token space is the 64-bit unsigned integers. A key's token is the first 64 bits of mmh3's
128-bit x64 hash of the key bytes. Every member owns ``round(weight * vnodes_per_weight)``
virtual nodes; vnode ``i`` of member ``m`` sits at the token of ``f"{m.name}#{i}"``. A vnode owns
the arc ``(previous token, its token]``, so a key belongs to the first vnode at or after its token,
wrapping around; the key's *preference list* is the next N vnodes that belong to distinct members.

Invariants (the tests check each):

- The tokens depend only on the member's name and weight, never on the other members or on the
  order of the configuration, so every node computes the same ring from the same member list.
- Adding a member only inserts its tokens; a key's new preference list is its old one with the
  new member inserted (and the last one pushed out), so no key moves between two members that both
  stay, and about 1/(n+1) of the primary ownership moves (to the new member). Removing is the
  mirror image. Raising a weight keeps the first vnodes and adds more, so re-weighting also only
  moves keys to or from the re-weighted member.
- Ownership is balanced by the law of large numbers: a member's share is a sum of its vnodes'
  arcs, whose relative spread is about 1/sqrt(vnodes). The default of 2048 vnodes per unit of
  weight keeps max/mean ownership at equal weights near 1.05 for 3..20 members (the promise is
  <= 1.10). 256 -- Cassandra's old default -- measured up to 1.14 here. Rejected: Riak's fixed
  partitions with a claim algorithm (balanced with far fewer vnodes, but the assignment then
  depends on the history of joins, not on the member list alone).
- Ties between equal tokens (astronomically rare) are broken by member name, so they too are the
  same everywhere.

A configuration is immutable and carries an epoch; a new configuration must have a larger one.

Data centres (Cassandra's NetworkTopologyStrategy): a ring may carry a *replication map*
(``--n-per-dc dc1:2,dc2:1``, :meth:`Ring.with_replication`), and then a key's preference list is
the walk from its token taking a member only while its DC still needs replicas -- distinct
members, ring order within each DC, exactly ``map[dc]`` per DC, N = the sum. Members of a DC not
in the map hold no replicas. Without a map (the default) the list is the plain walk above, DCs or
not. The map is a cluster-wide flag, not part of :meth:`to_wire` (whose layout is fixed): every
node and client applies the same map (the RING answer carries it beside the ring).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import mmh3

from .errors import ConfigError, ProtocolError

TOKEN_SPACE = 1 << 64
DEFAULT_VNODES_PER_WEIGHT = 2048
# A bound on one configuration's size, so a typo in --weight cannot allocate gigabytes.
MAX_VNODES = 1 << 21
MAX_NAME = 255
# DO NOT CHANGE: the wire/stored layout of Ring.to_wire().
RING_FORMAT = 1


_bisect_left = bisect.bisect_left
_hash64 = mmh3.hash64
_U64 = (1 << 64) - 1


def key_token(key: bytes) -> int:
    """The ring position of ``key``: mmh3 x64 128-bit hash, first 64 bits, unsigned."""
    # No keyword arguments (a call with them costs as much as the hash): the defaults are
    # seed 0 and x64arch; the signed value masked is the unsigned one, whether or not this
    # mmh3 honours `signed` (5.x ignores a positional one).
    return _hash64(key)[0] & _U64


@functools.lru_cache(maxsize=64)
def _member_tokens(name: str, count: int) -> tuple[int, ...]:
    # Cached: rings are rebuilt on every configuration change, from mostly the same members.
    # 64 entries of 2048 tokens are ~4 MB; a larger cluster only pays ~1.5 ms per member again.
    return tuple(key_token(f"{name}#{i}".encode()) for i in range(count))


@dataclass(frozen=True)
class Member:
    """One node of the cluster. ``addr`` is "host:port"; ``weight`` scales its share."""

    name: str
    addr: str
    weight: float = 1.0
    dc: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > MAX_NAME:
            raise ConfigError(
                f"member name must be a non-empty str of at most {MAX_NAME} chars, got {self.name!r}"
            )
        if not isinstance(self.addr, str):
            raise ConfigError(
                f"member {self.name!r}: addr must be a 'host:port' str, got {self.addr!r}"
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise ConfigError(f"member {self.name!r}: weight must be a number, got {self.weight!r}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(
                f"member {self.name!r}: weight must be finite and > 0, got {self.weight!r}"
            )
        if self.dc is not None and not isinstance(self.dc, str):
            raise ConfigError(f"member {self.name!r}: dc must be a str or None, got {self.dc!r}")


def parse_n_per_dc(spec: str) -> dict[str, int]:
    """``"dc1:2,dc2:1"`` -> ``{"dc1": 2, "dc2": 1}`` (the ``--n-per-dc`` flag).

    :raises ConfigError: not a comma-separated list of DC:COUNT with counts >= 1, or a DC twice.
    """
    out: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        dc, sep, count = part.rpartition(":")
        if not sep or not dc or not count.strip().isdigit() or int(count) < 1:
            raise ConfigError(f"--n-per-dc {spec!r}: expected DC:COUNT[,DC:COUNT...] with counts >= 1, got {part!r}")
        if dc in out:
            raise ConfigError(f"--n-per-dc {spec!r} names data centre {dc!r} twice")
        out[dc] = int(count)
    return out


class Ring:
    """One ring configuration: its members, their vnodes, and its epoch. Immutable.

    :param members: the members; names must be distinct.
    :param epoch: the configuration's number (>= 0); every change makes a larger one.
    :param vnodes_per_weight: vnodes of a member of weight 1 (at least 1 vnode per member).
    :raises ConfigError: no members, duplicate names, a bad epoch or vnode count.
    """

    __slots__ = (
        "_epoch", "_members", "_vnodes_per_weight", "_tokens", "_owners", "_names", "_replication",
        "_dc_index", "_prefs", "_derived", "_last", "_buckets", "_bucket_shift",
    )

    def __init__(
        self,
        members: Iterable[Member],
        epoch: int,
        vnodes_per_weight: int = DEFAULT_VNODES_PER_WEIGHT,
    ) -> None:
        members = list(members)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"ring epoch must be an int >= 0, got {epoch!r}")
        if (
            isinstance(vnodes_per_weight, bool)
            or not isinstance(vnodes_per_weight, int)
            or vnodes_per_weight < 1
        ):
            raise ConfigError(f"vnodes_per_weight must be an int >= 1, got {vnodes_per_weight!r}")
        if not members:
            raise ConfigError("a ring needs at least one member")
        by_name: dict[str, Member] = {}
        for m in members:
            if not isinstance(m, Member):
                raise ConfigError(f"ring members must be Member, got {type(m).__name__}")
            if m.name in by_name:
                raise ConfigError(f"duplicate member name {m.name!r} in the ring configuration")
            by_name[m.name] = m
        counts = {m.name: max(1, round(m.weight * vnodes_per_weight)) for m in members}
        total = sum(counts.values())
        if total > MAX_VNODES:
            raise ConfigError(
                f"ring would have {total} vnodes (limit {MAX_VNODES}); lower the weights or vnodes_per_weight"
            )
        self._epoch = epoch
        self._vnodes_per_weight = vnodes_per_weight
        # Members in name order: the owner indices below then do not depend on input order.
        self._names: tuple[str, ...] = tuple(sorted(by_name))
        self._members: Mapping[str, Member] = MappingProxyType({n: by_name[n] for n in self._names})
        index = {n: i for i, n in enumerate(self._names)}
        vnodes = sorted((t, index[n]) for n in self._names for t in _member_tokens(n, counts[n]))
        # Invariant: _tokens is sorted ascending; _owners[i] is the member index of vnode i.
        self._tokens: list[int] = [t for t, _ in vnodes]
        self._owners: list[int] = [o for _, o in vnodes]
        self._replication: Mapping[str, int] | None = None
        self._dc_index: list[str | None] = [self._members[n].dc for n in self._names]
        # (vnode index, n) -> that vnode's preference list: a ring is immutable, so a list once
        # walked stays right for its lifetime (a new configuration is a new Ring with an empty
        # cache). At most vnodes x distinct n entries; filled lazily by preference_list.
        self._prefs: dict[tuple[int, int], tuple[str, ...]] = {}
        #: tables computed from this ring once (:meth:`derived`): vnode_preference_lists(n)
        #: under ("vnode_lists", n), and callers' own (anti-entropy's range table)
        self._derived: dict[Hashable, Any] = {}
        #: (key, its vnode index): the last lookup. A write asks for one key's placement
        #: several times in a row (its preference list, its replica check, anti-entropy's
        #: range of it); a ring's tokens never change, so the answer stays right.
        self._last: tuple[bytes | None, int] = (None, 0)
        # Invariant: _buckets[b] == bisect_left(_tokens, b << _bucket_shift) for every b, and
        # one more entry, len(_tokens): a token t's vnode lies in _buckets[t >> shift] ..
        # _buckets[(t >> shift) + 1], a handful of tokens (bisecting ~6,000 ints that are
        # objects all over the heap was most of a lookup).
        bits = min(16, max(1, (len(self._tokens) - 1).bit_length()))
        self._bucket_shift = 64 - bits
        buckets = [0] * ((1 << bits) + 1)
        j = 0
        toks = self._tokens
        for b in range(1 << bits):
            lo = b << self._bucket_shift
            while j < len(toks) and toks[j] < lo:
                j += 1
            buckets[b] = j
        buckets[1 << bits] = len(toks)
        self._buckets: list[int] = buckets

    # -- data centres --------------------------------------------------------------------------

    @property
    def replication(self) -> Mapping[str, int] | None:
        """The replication map (DC -> replicas per key), or None: the plain walk."""
        return self._replication

    def with_replication(self, replication: Mapping[str, int] | None) -> Ring:
        """This configuration with the replication map ``replication`` (None: none); the vnodes
        are shared, nothing is recomputed.

        :raises ConfigError: a count that is not an int >= 1, a DC with no members, a count
            above the DC's member count.
        """
        if replication is not None:
            replication = dict(replication)
            if not replication:
                raise ConfigError("the replication map (--n-per-dc) is empty")
            sizes: dict[str | None, int] = {}
            for m in self._members.values():
                sizes[m.dc] = sizes.get(m.dc, 0) + 1
            for dc, count in replication.items():
                if not isinstance(dc, str) or not dc:
                    raise ConfigError(f"--n-per-dc: a data centre name must be a non-empty str, got {dc!r}")
                if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                    raise ConfigError(f"--n-per-dc: {dc} needs an int count >= 1, got {count!r}")
                if dc not in sizes:
                    known = sorted(d for d in sizes if d is not None)
                    raise ConfigError(
                        f"--n-per-dc names data centre {dc!r}, which has no nodes in the ring "
                        f"(epoch {self._epoch}; its DCs: {', '.join(known) or 'none, no node has --dc'})"
                    )
                if count > sizes[dc]:
                    raise ConfigError(
                        f"--n-per-dc asks {count} replicas in data centre {dc!r}, which has only "
                        f"{sizes[dc]} nodes"
                    )
        out = object.__new__(Ring)
        for slot in Ring.__slots__:
            object.__setattr__(out, slot, getattr(self, slot))
        out._replication = MappingProxyType(replication) if replication is not None else None
        out._prefs = {}  # the walk depends on the replication map
        out._derived = {}
        return out

    def dc_of(self, name: str) -> str | None:
        """The DC of member ``name`` (None: no --dc, or not a member)."""
        m = self._members.get(name)
        return m.dc if m is not None else None

    def _walk(self, start: int, n: int) -> list[int]:
        """Member indices of the preference list of vnode ``start`` (the replication map's walk
        when there is one), ``n`` of them (check_n was called)."""
        owners, size = self._owners, len(self._tokens)
        seen: list[int] = []
        want = dict(self._replication) if self._replication is not None else None
        dcs = self._dc_index
        # Terminates: one turn visits every member; check_n/with_replication made the map fillable.
        for step in range(size):
            o = owners[(start + step) % size]
            if o in seen:
                continue
            if want is not None:
                left = want.get(dcs[o], 0)  # type: ignore[arg-type]
                if left == 0:
                    continue
                want[dcs[o]] = left - 1  # type: ignore[index]
            seen.append(o)
            if len(seen) == n:
                break
        return seen

    # -- the configuration ---------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def members(self) -> Mapping[str, Member]:
        """Members by name (read-only), in name order."""
        return self._members

    @property
    def vnodes_per_weight(self) -> int:
        return self._vnodes_per_weight

    def __len__(self) -> int:
        return len(self._names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ring):
            return NotImplemented
        return (self._epoch, self._vnodes_per_weight, tuple(self._members.values())) == (
            other._epoch,
            other._vnodes_per_weight,
            tuple(other._members.values()),
        )

    def __hash__(self) -> int:
        return hash((self._epoch, self._vnodes_per_weight, tuple(self._members.values())))

    def __repr__(self) -> str:
        return f"Ring(epoch={self._epoch}, members={list(self._names)}, vnodes={len(self._tokens)})"

    def with_members(self, members: Iterable[Member], epoch: int) -> Ring:
        """A new configuration with ``members`` and the same vnodes_per_weight.

        :raises ConfigError: ``epoch`` is not larger than this ring's.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch <= self._epoch:
            raise ConfigError(
                f"a new ring configuration needs an epoch > {self._epoch}, got {epoch!r}"
            )
        return Ring(members, epoch, self._vnodes_per_weight).with_replication(self._replication)

    # -- placement -----------------------------------------------------------------------------

    @staticmethod
    def token(key: bytes) -> int:
        """The ring position of ``key`` (see :func:`key_token`)."""
        return key_token(key)

    def successors(self, key: bytes) -> Iterator[str]:
        """Every member once, lazily, in the order the ring meets them from ``key``'s token on.

        The first N are the preference list; the rest are the fallbacks, in order.
        """
        tokens, owners, names = self._tokens, self._owners, self._names
        size, remaining = len(tokens), len(names)
        i = bisect.bisect_left(tokens, key_token(key))
        seen: set[int] = set()
        # Terminates: one turn of the ring visits every vnode, hence every member.
        for step in range(size):
            o = owners[(i + step) % size]
            if o not in seen:
                seen.add(o)
                yield names[o]
                remaining -= 1
                if remaining == 0:
                    return

    def vnode_index(self, key: bytes) -> int:
        """The index of the vnode that owns ``key`` (into :meth:`vnode_preference_lists`)."""
        last = self._last
        if last[0] == key and type(key) is bytes:
            return last[1]
        tokens = self._tokens
        t = key_token(key)
        b = t >> self._bucket_shift
        buckets = self._buckets
        i = _bisect_left(tokens, t, buckets[b], buckets[b + 1])
        if i == len(tokens):
            i = 0  # past the last token: the ring wraps to the first vnode
        if type(key) is bytes:
            self._last = (key, i)
        return i

    def vnode_preference_lists(self, n: int) -> list[tuple[str, ...]]:
        """Per vnode, in token order, the preference list of the keys it owns: every key of vnode
        ``i`` has ``preference_list(key, n) == list(result[i])``. For a caller that looks up many
        keys' lists (the client's zero-hop reads: one bisect instead of a walk per key).
        Walked once per ring and n, then copied (several nodes in one process -- the
        simulator's -- share a ring, and each asks; a walk of every vnode costs ~30 ms)."""
        self.check_n(n)
        names = self._names
        lists: tuple[tuple[str, ...], ...] = self.derived(("vnode_lists", n), lambda: tuple(
            tuple(names[o] for o in self._walk(i, n)) for i in range(len(self._tokens))))
        return list(lists)

    def derived(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per ring and ``key`` and kept as long as the ring is: a ring
        is immutable, so a table derived from it stays right (a new configuration is a new Ring
        with none). The value is shared between callers: never modify it."""
        try:
            return self._derived[key]
        except KeyError:
            value = self._derived[key] = make()
            return value

    def preference_list(self, key: bytes, n: int) -> list[str]:
        """The members of the next ``n`` vnodes from ``key``'s token that belong to distinct members.

        :raises ConfigError: ``n`` < 1 or ``n`` > the number of members.
        """
        return list(self._row(self.vnode_index(key), n))

    def holds(self, key: bytes, n: int, name: str) -> bool:
        """``name in preference_list(key, n)``, without building the list."""
        return name in self._row(self.vnode_index(key), n)

    def _row(self, i: int, n: int) -> tuple[str, ...]:
        hit = self._prefs.get((i, n))
        if hit is None:
            self.check_n(n)
            names = self._names
            hit = self._prefs[(i, n)] = tuple(names[o] for o in self._walk(i, n))
        return hit

    def check_n(self, n: int) -> None:
        """:raises ConfigError: unless 1 <= ``n`` <= the number of members."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"replica count N must be an int >= 1, got {n!r}")
        if n > len(self._names):
            raise ConfigError(
                f"N={n} replicas asked for, but the ring (epoch {self._epoch}) has only "
                f"{len(self._names)} members"
            )
        if self._replication is not None and n != sum(self._replication.values()):
            raise ConfigError(
                f"N={n}, but the replication map {dict(self._replication)} places "
                f"{sum(self._replication.values())} replicas per key (N must be its sum)"
            )

    def shares(self) -> dict[str, float]:
        """Fraction of the token space each member owns as primary (exact, from the vnode arcs)."""
        return {n: arc / TOKEN_SPACE for n, arc in self.arcs().items()}

    def arcs(self) -> dict[str, int]:
        """Exact primary ownership per member, in tokens; the values sum to 2**64."""
        owned = [0] * len(self._names)
        prev = self._tokens[-1] - TOKEN_SPACE
        for t, o in zip(self._tokens, self._owners, strict=True):
            owned[o] += t - prev
            prev = t
        return {n: owned[i] for i, n in enumerate(self._names)}

    def vnode_count(self, name: str) -> int:
        """How many vnodes ``name`` has in this configuration."""
        i = self._names.index(name)
        return sum(1 for o in self._owners if o == i)

    # -- encoding ------------------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-friendly dict that :meth:`from_wire` turns back into an equal ring."""
        return {
            "format": RING_FORMAT,
            "epoch": self._epoch,
            "vnodes_per_weight": self._vnodes_per_weight,
            "members": [[m.name, m.addr, m.weight, m.dc] for m in self._members.values()],
        }

    @classmethod
    def from_wire(cls, d: Any) -> Ring:
        """The ring :meth:`to_wire` described.

        :raises ProtocolError: ``d`` is not such a description (wrong shape or format version,
            or a configuration the constructor rejects).
        """
        if not isinstance(d, dict) or set(d) != {"format", "epoch", "vnodes_per_weight", "members"}:
            raise ProtocolError(
                "ring description must be a dict with format, epoch, vnodes_per_weight, members"
            )
        if d["format"] != RING_FORMAT:
            raise ProtocolError(f"ring description format {d['format']!r} is not {RING_FORMAT}")
        raw = d["members"]
        if not isinstance(raw, list) or not all(isinstance(m, list) and len(m) == 4 for m in raw):
            raise ProtocolError("ring members must be a list of [name, addr, weight, dc]")
        try:
            return cls((Member(*m) for m in raw), d["epoch"], d["vnodes_per_weight"])
        except ConfigError as e:
            raise ProtocolError(f"ring description rejected: {e}") from None


__all__ = ["Member", "Ring", "parse_n_per_dc", "key_token", "TOKEN_SPACE", "DEFAULT_VNODES_PER_WEIGHT", "RING_FORMAT"]
