"""Compaction: picking, merging (newest wins), when tombstones may go, and the leveled shape."""

from __future__ import annotations

import random
from collections.abc import Callable

from shmkv.lsm import LSM, LevelOptions
from shmkv.lsm import format as fmt
from shmkv.lsm.compaction import drop_dead, merge, pick
from shmkv.lsm.manifest import Manifest
from shmkv.lsm.sstable import TableMeta

PUT, DEL = fmt.KIND_PUT, fmt.KIND_DELETE
Open = Callable[..., LSM]


def test_merge_keeps_only_the_newest_version_of_each_key() -> None:
    newest = [(b"a", PUT, b"new", 0), (b"c", DEL, b"", 0)]
    older = [(b"a", PUT, b"old", 0), (b"b", PUT, b"b", 0), (b"c", PUT, b"c-old", 0)]
    oldest = [(b"b", PUT, b"b-oldest", 0), (b"d", PUT, b"d", 0)]
    got = list(merge([iter(newest), iter(older), iter(oldest)]))
    assert got == [
        (b"a", PUT, b"new", 0),
        (b"b", PUT, b"b", 0),
        (b"c", DEL, b"", 0),
        (b"d", PUT, b"d", 0),
    ]


def test_tombstone_is_dropped_only_when_nothing_deeper_overlaps_it() -> None:
    deeper = [TableMeta(9, 3, 100, 1, b"m", b"p")]
    ents = [(b"a", DEL, b"", 0), (b"n", DEL, b"", 0), (b"z", DEL, b"", 0)]
    assert list(drop_dead(iter(ents), deeper, now_ms=0)) == [(b"n", DEL, b"", 0)]
    assert list(drop_dead(iter(ents), [], now_ms=0)) == []


def test_expired_entry_becomes_a_tombstone_or_disappears() -> None:
    deeper = [TableMeta(9, 3, 100, 1, b"a", b"b")]
    ents = [(b"a", PUT, b"big value", 5), (b"x", PUT, b"gone", 5), (b"y", PUT, b"live", 50)]
    got = list(drop_dead(iter(ents), deeper, now_ms=10))
    assert got == [(b"a", DEL, b"", 0), (b"y", PUT, b"live", 50)]


def _t(n: int, level: int, lo: bytes, hi: bytes, size: int = 100) -> TableMeta:
    return TableMeta(n, level, size, 1, lo, hi)


def test_l0_trigger_takes_all_of_l0_and_the_overlapping_l1_tables() -> None:
    opts = LevelOptions(l0_trigger=2)
    m = Manifest(
        tables=[
            _t(5, 0, b"c", b"f"),
            _t(6, 0, b"a", b"d"),
            _t(1, 1, b"a", b"b"),
            _t(2, 1, b"e", b"g"),
            _t(3, 1, b"x", b"z"),
        ]
    )
    c = pick(m, opts)
    assert c is not None and c.output_level == 1
    assert [t.number for t in c.inputs] == [6, 5, 1, 2]  # newest first; L1 table 3 untouched


def test_oversized_level_compacts_the_table_with_least_overlap_below() -> None:
    opts = LevelOptions(l0_trigger=4, l1_bytes=150)
    m = Manifest(
        tables=[
            _t(1, 1, b"a", b"c"),
            _t(2, 1, b"d", b"f"),
            _t(3, 2, b"a", b"b", 1000),
            _t(4, 2, b"b", b"c", 1000),
        ]
    )
    c = pick(m, opts)
    assert c is not None and (c.level, c.output_level) == (1, 2)
    assert [t.number for t in c.inputs] == [2]  # table 2 overlaps nothing in L2


def test_tree_in_shape_needs_no_compaction() -> None:
    assert (
        pick(Manifest(tables=[_t(1, 0, b"a", b"b"), _t(2, 1, b"a", b"b")]), LevelOptions()) is None
    )


# -- through the LSM ---------------------------------------------------------------------------


def test_levels_stay_non_overlapping_under_random_writes(open_db: Open) -> None:
    db = open_db()
    rnd = random.Random(3)
    model: dict[bytes, bytes] = {}
    for _ in range(6000):
        k = b"k%05d" % rnd.randrange(3000)
        if rnd.random() < 0.2:
            db.delete(k)
            model.pop(k, None)
        else:
            v = rnd.randbytes(rnd.randrange(1, 60))
            db.put(k, v)
            model[k] = v
    s = db.stats()
    assert (
        s["compactions"] > 5 and sum(1 for n in s["files_per_level"][2:] if n) >= 1
    )  # reached L2+
    assert db.verify() == []  # includes the non-overlap check of L1+
    assert dict(db.scan()) == model


def test_tombstone_above_a_deeper_value_survives_compaction(open_db: Open) -> None:
    tiny = LevelOptions(l0_trigger=2, l1_bytes=1 << 30, target_file_bytes=1 << 20)
    db = open_db(memtable_bytes=1 << 20, levels=tiny)
    db.put(b"k", b"deep")
    db.put(b"other", b"x")
    db.compact()  # k now lives in L1, the bottom
    lv = db.stats()["files_per_level"]
    assert lv[0] == 0 and lv[1] == 1
    db.delete(b"k")
    db.flush()
    db.put(b"z", b"1")
    db.flush()  # second L0 table: L0 -> L1 compaction; the tombstone meets the value and both go
    assert db.get(b"k") is None
    db.compact()
    assert db.get(b"k") is None and db.stats()["entries_on_disk"] == 2


def test_write_amplification_is_measured(open_db: Open) -> None:
    db = open_db()
    for i in range(3000):
        db.put(b"k%05d" % (i * 7919 % 3000), b"v" * 40)
    wa = db.stats()["write_amplification"]
    assert 1.0 < wa < 40.0
