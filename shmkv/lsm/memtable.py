"""Memtable: the in-memory image of one WAL generation.

Every process keeps one memtable per live WAL generation, built only by replaying that WAL
(never by its own puts directly), so all processes hold the same contents once caught up.

Invariant: for each key, the memtable holds the *last* entry the WAL has for it, tombstones
included (a tombstone must shadow older SSTables).

Rejected: a skip list or sortedcontainers. A dict gives O(1) gets, which is the hot path; the
sorted key list is built lazily for scans and flushes (O(n log n) once per change burst), which
are rare by comparison. ``items`` returns (key, kind, value, expire) rows, the shape every
merge source has.
"""

from __future__ import annotations

from . import _accel
from . import format as fmt

# kind, value, expire_at_ms
Slot = tuple[int, bytes, int]

# The class is C (ext/_lsm.pyx): apply() is on every put's path and every replayed record's.
Memtable = _accel.Memtable


def is_live(slot: Slot, now_ms: int) -> bool:
    kind, _, expire = slot
    return kind == fmt.KIND_PUT and (expire == 0 or expire > now_ms)
