"""Manifest: checksummed, replaced atomically, never half-written."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from shmkv.errors import Corruption
from shmkv.lsm import DiskFull
from shmkv.lsm import format as fmt
from shmkv.lsm import manifest as mf
from shmkv.lsm.sstable import TableMeta


def _m(gen: int) -> mf.Manifest:
    return mf.Manifest(
        generation=gen,
        wal_gen=3,
        next_file=9,
        tables=[TableMeta(4, 0, 100, 10, b"a", b"m"), TableMeta(7, 1, 200, 20, b"b", b"z")],
        counters={"flushes": 2},
    )


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    mf.write(str(tmp_path), _m(5))
    got = mf.read(str(tmp_path))
    assert got is not None
    assert got[0] == _m(5)
    assert got[1] == mf.identity(str(tmp_path))


def test_missing_manifest_reads_as_none(tmp_path: Path) -> None:
    assert mf.read(str(tmp_path)) is None and mf.identity(str(tmp_path)) is None


def test_identity_changes_with_every_write(tmp_path: Path) -> None:
    seen = set()
    for g in range(20):
        mf.write(str(tmp_path), _m(g))
        seen.add(mf.identity(str(tmp_path)))
    assert len(seen) == 20


def test_levels_orders_l0_newest_first_and_others_by_key() -> None:
    m = mf.Manifest(
        tables=[
            TableMeta(1, 0, 1, 1, b"a", b"z"),
            TableMeta(5, 0, 1, 1, b"a", b"z"),
            TableMeta(3, 1, 1, 1, b"m", b"n"),
            TableMeta(2, 1, 1, 1, b"a", b"b"),
        ]
    )
    lv = m.levels(3)
    assert (
        [t.number for t in lv[0]] == [5, 1] and [t.number for t in lv[1]] == [2, 3] and lv[2] == []
    )


def test_a_flipped_bit_is_corruption_naming_the_file(tmp_path: Path) -> None:
    mf.write(str(tmp_path), _m(1))
    p = tmp_path / fmt.MANIFEST
    data = bytearray(p.read_bytes())
    data[-3] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(Corruption, match="MANIFEST: manifest checksum mismatch"):
        mf.read(str(tmp_path))


def test_failed_write_leaves_the_previous_manifest_in_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mf.write(str(tmp_path), _m(1))

    def full(*a: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(DiskFull, match="disk full"):
        mf.write(str(tmp_path), _m(2))
    monkeypatch.undo()
    got = mf.read(str(tmp_path))
    assert got is not None and got[0].generation == 1
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []  # no leftover
