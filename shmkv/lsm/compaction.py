"""Compaction: which tables to merge (picking) and how (merging). Leveled, LevelDB-style.

Why leveled, not tiered: the spill tier is read far more than it is written in bulk -- every
miss of the memory tier is a point get here. Leveled compaction bounds a get to the L0 tables
plus at most one table per level (each guarded by a bloom filter) and keeps space amplification
near 1.1x, which matters for a cache sized to a disk budget. Tiered (size-tiered) compaction
writes each byte fewer times but lets a get probe many overlapping runs per tier and can need 2x
space during a big merge. Our write amplification is measured (``stats()``, bench/lsm_bench.py)
rather than assumed.

Shape:

- L0 holds flushed memtables; its tables may overlap and are ordered by file number (newer =
  larger). Levels >= 1 hold non-overlapping tables sorted by key.
- L0 -> L1 when L0 has ``l0_trigger`` tables: *all* of L0 plus the L1 tables overlapping them
  (taking all of L0 means no older L0 version can be left above a newer one in L1).
- Li -> Li+1 (i >= 1) when Li's bytes exceed ``l1_bytes * multiplier**(i-1)``: the Li table whose
  overlap with Li+1 is smallest relative to its own size (RocksDB's kMinOverlappingRatio -- cheap
  to compute, lowest write amplification; rejected: LevelDB's round-robin compact pointer, which
  needs extra manifest state).

Merging invariants:

- Sources are given newest first; for each key only the newest entry survives (shadowed
  versions are dropped).
- A tombstone (or an expired entry) is dropped only when no table at a level deeper than the
  output level overlaps its key: only then can nothing older re-appear. Otherwise an expired
  entry is kept, turned into a tombstone (it reads as absent either way; the value is dead weight).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import _accel
from .manifest import Manifest
from .sstable import Entry, TableMeta, TableReader, TableWriter


@dataclass(frozen=True)
class LevelOptions:
    max_levels: int = 7
    l0_trigger: int = 4
    l1_bytes: int = 10 << 20
    multiplier: int = 10
    target_file_bytes: int = 2 << 20

    def level_target(self, level: int) -> int:
        return int(self.l1_bytes * self.multiplier ** (level - 1))


@dataclass
class Compaction:
    level: int
    output_level: int
    inputs: list[TableMeta]  # newest first: precedence order for the merge
    reason: str


def pick(m: Manifest, opts: LevelOptions) -> Compaction | None:
    """The most urgent compaction for ``m``, or None if the tree is in shape."""
    levels = m.levels(opts.max_levels)
    if len(levels[0]) >= opts.l0_trigger:
        lo = min(t.smallest for t in levels[0])
        hi = max(t.largest for t in levels[0])
        below = [t for t in levels[1] if t.overlaps(lo, hi)]
        return Compaction(0, 1, levels[0] + below, f"L0 has {len(levels[0])} tables")
    best: tuple[float, int] | None = None
    for lv in range(1, opts.max_levels - 1):
        size = sum(t.size for t in levels[lv])
        score = size / opts.level_target(lv)
        if score >= 1.0 and (best is None or score > best[0]):
            best = (score, lv)
    if best is None:
        return None
    lv = best[1]

    def ratio(t: TableMeta) -> float:
        return sum(o.size for o in levels[lv + 1] if o.overlaps(t.smallest, t.largest)) / max(
            1, t.size
        )

    chosen = min(levels[lv], key=ratio)
    below = [o for o in levels[lv + 1] if o.overlaps(chosen.smallest, chosen.largest)]
    return Compaction(lv, lv + 1, [chosen] + below, f"L{lv} at {best[0]:.2f}x its target")


def pick_full(m: Manifest, opts: LevelOptions) -> Compaction | None:
    """Everything into one run at the deepest used level (>= 1): ``LSM.compact()``."""
    if not m.tables:
        return None
    levels = m.levels(opts.max_levels)
    deepest = max(1, max(t.level for t in m.tables))
    ordered = [t for lv in levels for t in lv]  # L0 newest first, then L1, L2...: newest first
    return Compaction(0, deepest, ordered, "full compaction")


def merge(sources: list[Iterator[Entry]]) -> Iterator[Entry]:
    """Merge sorted sources (newest first) into one sorted stream, newest version per key
    (a heap in C: ``_accel.Merge``)."""
    return _accel.Merge(sources)


def drop_dead(entries: Iterator[Entry], deeper: list[TableMeta], now_ms: int) -> Iterator[Entry]:
    """Drop tombstones/expired entries no deeper table can be shadowed by; see module doc.
    (In C: ``_accel.DropDead``.)"""
    return _accel.DropDead(entries, [(t.smallest, t.largest) for t in deeper], now_ms)


def run(
    comp: Compaction,
    m: Manifest,
    readers: dict[int, TableReader],
    opts: LevelOptions,
    new_writer: Callable[[], tuple[int, TableWriter]],
    now_ms: int,
) -> list[TableMeta]:
    """Merge ``comp.inputs`` into new tables at ``comp.output_level``; return their metadata.

    REQUIRES: the maintenance lock (inputs cannot change underneath). Does not touch the
    manifest: the caller installs the outputs and removes the inputs in one manifest write.
    On error the partial outputs are removed and the exception propagates.
    """
    input_numbers = {t.number for t in comp.inputs}
    deeper = [t for t in m.tables if t.level > comp.output_level and t.number not in input_numbers]
    stream = drop_dead(merge([readers[t.number].iter_from() for t in comp.inputs]), deeper, now_ms)
    outputs: list[TableMeta] = []
    paths: list[str] = []
    writer: TableWriter | None = None
    try:
        done = False
        while not done:
            number, writer = new_writer()
            paths.append(writer.path)
            done = writer.add_from(stream, opts.target_file_bytes)
            if len(writer):
                outputs.append(writer.finish(number, comp.output_level, wal_stamp=m.wal_gen))
            else:
                writer.abandon()  # the stream ended exactly at the last table's end
            writer = None
    except BaseException:
        if writer is not None:
            writer.abandon()
        for p in paths:
            try:
                os.unlink(p)
            except OSError:
                pass
        raise
    return outputs
