"""Memtable: the in-memory image of one WAL generation.

Every process keeps one memtable per live WAL generation, built only by replaying that WAL
(never by its own puts directly), so all processes hold the same contents once caught up.

Invariant: for each key, the memtable holds the *last* entry the WAL has for it, tombstones
included (a tombstone must shadow older SSTables).

Rejected: a skip list or sortedcontainers. A dict gives O(1) gets, which is the hot path; the
sorted key list is built lazily for scans and flushes (O(n log n) once per change burst), which
are rare by comparison.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from . import format as fmt

# kind, value, expire_at_ms
Slot = tuple[int, bytes, int]

# Per-entry bookkeeping estimate (dict slot, tuple, bytes headers) for the size accounting.
_OVERHEAD = 96


class Memtable:
    __slots__ = ("gen", "_data", "_sorted", "approx_bytes", "user_bytes", "records")

    def __init__(self, gen: int) -> None:
        self.gen = gen
        self._data: dict[bytes, Slot] = {}
        self._sorted: list[bytes] | None = []
        # Bytes of memory this table holds (estimate) and key+value bytes ever applied
        # (overwrites included: the denominator of write amplification).
        self.approx_bytes = 0
        self.user_bytes = 0
        self.records = 0

    def __len__(self) -> int:
        return len(self._data)

    def apply(self, kind: int, key: bytes, value: bytes, expire_at_ms: int) -> None:
        old = self._data.get(key)
        if old is None:
            if self._sorted is not None:
                if self._sorted and key > self._sorted[-1]:
                    self._sorted.append(key)  # appends in key order keep the list valid
                else:
                    self._sorted = None
            self.approx_bytes += len(key) + _OVERHEAD
        else:
            self.approx_bytes -= len(old[1])
        self._data[key] = (kind, value, expire_at_ms)
        self.approx_bytes += len(value)
        self.user_bytes += len(key) + len(value)
        self.records += 1

    def get(self, key: bytes) -> Slot | None:
        """The newest entry for key (a tombstone is an entry), or None if this table has none."""
        return self._data.get(key)

    def _keys(self) -> list[bytes]:
        if self._sorted is None:
            self._sorted = sorted(self._data)
        return self._sorted

    def items(
        self, start: bytes | None = None, stop: bytes | None = None
    ) -> list[tuple[bytes, Slot]]:
        """A snapshot (list) of entries with start <= key < stop, in key order, tombstones included.

        A list, not a generator: the caller may keep iterating while new records are applied.
        """
        keys = self._keys()
        lo = 0 if start is None else bisect.bisect_left(keys, start)
        hi = len(keys) if stop is None else bisect.bisect_left(keys, stop)
        data = self._data
        return [(k, data[k]) for k in keys[lo:hi]]

    def iter_entries(self) -> Iterator[tuple[bytes, int, bytes, int]]:
        """(key, kind, value, expire) in key order, for a flush."""
        data = self._data
        for k in self._keys():
            kind, value, expire = data[k]
            yield k, kind, value, expire


def is_live(slot: Slot, now_ms: int) -> bool:
    kind, _, expire = slot
    return kind == fmt.KIND_PUT and (expire == 0 or expire > now_ms)
