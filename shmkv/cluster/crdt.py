"""Counters as CRDTs: a PN-counter per key, one (increments, decrements) entry per node (pure).

Why not a value under a version: ``incr`` as read-modify-write through quorums loses increments
that meet at different coordinators (both read 5, both write 6), and siblings of numbers leave
the client to guess the sum. A PN-counter (Riak's approach) keeps, per coordinating node, the
total it has added (``p``) and subtracted (``n``); the value is sum(p) - sum(n), and merging two
replicas takes the maximum of each entry. Each entry only ever grows and only its own node
grows it, so the maximum is the latest, merge is commutative, associative and idempotent, and
concurrent increments through any nodes all count, whatever order replicas exchange state in.

REQUIRES of the caller (the coordinator), as for versions.py: ``node`` increments its own
durable local replica of the counter, which holds all of its earlier increments. A node that may
have lost them (memory-only restart, a fallback that handed off and dropped the key) must count
under a fresh actor name (``f"{name}@{incarnation}"``): starting its entry again from 0, the
maximum would hide its new increments behind the old ones.

Encoding (msgpack; DO NOT CHANGE: stored layout):

    [PNCOUNTER_FORMAT, [[node, p, n], ...]]    entries sorted by node, 0 <= p, n < 2**64,
                                              no entry with p == n == 0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from ..errors import InvalidType
from .errors import ConfigError, ProtocolError
from .versions import MAX_NODE_NAME, _unpack

# DO NOT CHANGE: stored layout; distinct from versions.py's VERSIONSET_FORMAT and CONTEXT_FORMAT.
PNCOUNTER_FORMAT = 3
MAX_ENTRY = (1 << 64) - 1  # msgpack's largest unsigned integer


class PNCounter:
    """A replica of one counter. Immutable; :meth:`increment` and :meth:`merge` return new ones.

    Invariant: every entry is ``(p, n)`` with ``0 <= p, n <= MAX_ENTRY``, not both 0.
    """

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, tuple[int, int]] | None = None) -> None:
        clean: dict[str, tuple[int, int]] = {}
        for node, (p, n) in (entries or {}).items():
            if not isinstance(node, str) or not node or len(node) > MAX_NODE_NAME:
                raise ConfigError(
                    f"a counter's node must be a non-empty str of at most {MAX_NODE_NAME} chars, got {node!r}"
                )
            for x in (p, n):
                if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_ENTRY:
                    raise ConfigError(
                        f"counter entry of {node!r} must be ints in 0..2**64-1, got {(p, n)!r}"
                    )
            if p or n:
                clean[node] = (p, n)
        self._entries = dict(sorted(clean.items()))

    @property
    def value(self) -> int:
        return sum(p for p, _ in self._entries.values()) - sum(n for _, n in self._entries.values())

    @property
    def entries(self) -> dict[str, tuple[int, int]]:
        return dict(self._entries)

    def increment(self, node: str, delta: int) -> PNCounter:
        """This replica after coordinator ``node`` added ``delta`` (negative: subtracted).

        REQUIRES: ``self`` is ``node``'s own local replica (see the module docstring).

        :raises InvalidType: ``delta`` is not an int. :raises ConfigError: a bad node name, or the
            node's entry would pass 2**64-1.
        """
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise InvalidType(f"a counter delta must be an int, got {type(delta).__name__}")
        p, n = self._entries.get(node, (0, 0))
        if delta >= 0:
            p += delta
        else:
            n -= delta
        if p > MAX_ENTRY or n > MAX_ENTRY:
            raise ConfigError(f"counter entry of {node!r} would pass 2**64-1")
        return PNCounter({**self._entries, node: (p, n)})

    def merge(self, other: PNCounter) -> PNCounter:
        """Both replicas' increments: the maximum of each node's ``p`` and of its ``n``."""
        out = dict(self._entries)
        for node, (p, n) in other._entries.items():
            mp, mn = out.get(node, (0, 0))
            out[node] = (max(p, mp), max(n, mn))
        return PNCounter(out)

    def descends(self, other: PNCounter) -> bool:
        """Whether this replica has counted every increment ``other`` has."""
        return self.merge(other) == self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PNCounter) and self._entries == other._entries

    def __hash__(self) -> int:
        return hash(tuple(self._entries.items()))

    def __repr__(self) -> str:
        return f"PNCounter(value={self.value}, entries={self._entries})"

    def to_wire(self) -> list[Any]:
        return [PNCOUNTER_FORMAT, [[node, p, n] for node, (p, n) in self._entries.items()]]

    @classmethod
    def from_wire(cls, w: Any) -> PNCounter:
        """:raises ProtocolError: ``w`` is not a canonical PN-counter wire form."""
        if (
            not isinstance(w, list)
            or len(w) != 2
            or w[0] != PNCOUNTER_FORMAT
            or not isinstance(w[1], list)
        ):
            raise ProtocolError("not a PN-counter: expected [3, [[node, p, n], ...]]")
        entries: dict[str, tuple[int, int]] = {}
        prev = ""
        for e in w[1]:
            if not (isinstance(e, list) and len(e) == 3):
                raise ProtocolError("a PN-counter entry must be [node, p, n]")
            node, p, n = e
            if not isinstance(node, str) or not node or len(node) > MAX_NODE_NAME or node <= prev:
                raise ProtocolError("PN-counter nodes must be non-empty strs, distinct and sorted")
            for x in (p, n):
                if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x <= MAX_ENTRY:
                    raise ProtocolError(f"PN-counter entry of {node!r} must be ints in 0..2**64-1")
            if not (p or n):
                raise ProtocolError(f"PN-counter entry of {node!r} is empty (not canonical)")
            entries[node] = (p, n)
            prev = node
        return cls(entries)

    def encode(self) -> bytes:
        return msgpack.packb(self.to_wire())  # type: ignore[no-any-return]

    @classmethod
    def decode(cls, data: bytes) -> PNCounter:
        """:raises ProtocolError: ``data`` is not an encoded PN-counter (never loops or crashes)."""
        return cls.from_wire(_unpack(data, "PN-counter"))


__all__ = ["PNCounter", "PNCOUNTER_FORMAT"]
