"""Snapshots record the store's shape, restore whole or not at all, and fail cleanly."""

from __future__ import annotations

import os
import struct
import subprocess
import zlib

import msgpack
import pytest

import shmkv
from shmkv import snapshot
from shmkv.lsm import DiskFull, FileAccessError


def _other(name):
    return name + "-b"


@pytest.fixture
def second(name):
    """A second store name, removed afterwards."""
    n = _other(name)
    yield n
    if n in shmkv.list_stores():
        shmkv.unlink(n)


def test_pickle_snapshot_restores_as_a_pickle_store(name, second, tmp_path):
    snap = tmp_path / "s.snap"
    with shmkv.attach(name, size="8MiB", codec="pickle") as kv:
        kv["obj"] = {"x": (1, 2)}
        kv.dump(snap)
    with shmkv.restore(snap, second, size="8MiB") as kv:
        assert kv.codec == "pickle"
        assert kv["obj"] == {"x": (1, 2)}


def test_snapshot_into_a_store_of_another_codec_loads_nothing(name, second, tmp_path):
    snap = tmp_path / "s.snap"
    with shmkv.attach(name, size="8MiB", codec="pickle") as kv:
        kv["obj"] = [1]
        kv.dump(snap)
    with shmkv.attach(second, size="8MiB", codec="raw") as raw:
        with pytest.raises(shmkv.SegmentMismatch, match="pickle"):
            raw.load(snap)
        assert len(raw) == 0
    with pytest.raises(shmkv.SegmentMismatch):
        shmkv.restore(snap, second, codec="raw")


def test_snapshot_that_does_not_fit_the_limits_loads_nothing(name, second, tmp_path):
    snap = tmp_path / "s.snap"
    with shmkv.attach(name, size="8MiB", max_key=2000) as kv:
        kv.put_many({f"k{i}": b"v" for i in range(200)})
        kv.put(b"L" * 1500, b"long key")
        kv.dump(snap)
    with shmkv.attach(second, size="8MiB") as small:  # max_key 1024
        with pytest.raises(shmkv.SegmentMismatch, match="max_key=1024") as ei:
            small.load(snap)
        assert "nothing was loaded" in str(ei.value)
        assert len(small) == 0


def test_snapshot_with_an_item_over_max_item_loads_nothing(name, second, tmp_path):
    snap = tmp_path / "s.snap"
    with shmkv.attach(name, size="8MiB", max_item="128KiB") as kv:
        kv.put_many({f"k{i}": b"v" for i in range(200)})
        kv.put("big", b"x" * 100_000)
        kv.dump(snap)
    with shmkv.attach(second, size="8MiB", max_item="64KiB") as small:
        with pytest.raises(shmkv.SegmentMismatch, match="max_item"):
            small.load(snap)
        assert len(small) == 0


def test_restore_creates_a_store_shaped_like_the_snapshot(name, second, tmp_path):
    snap = tmp_path / "s.snap"
    with shmkv.attach(name, size="8MiB", max_key=2000, max_item="192KiB") as kv:
        kv.put(b"L" * 1500, b"x" * 150_000)
        kv.dump(snap)
        shape = (kv.max_key, kv.max_item)
    with shmkv.restore(snap, second, size="16MiB") as kv:
        assert (kv.max_key, kv.max_item) == shape
        assert kv[b"L" * 1500] == b"x" * 150_000


def _v1_snapshot(path, records):
    """A snapshot as shmkv wrote it before format version 2 (no shape record)."""
    packer = msgpack.Packer(use_bin_type=True)
    crc = 0
    body = b""
    for rec in records:
        b = packer.pack(rec)
        crc = zlib.crc32(b, crc)
        body += b
    path.write_bytes(
        struct.pack("<8sIQ", b"SHMKVDMP", 1, 0) + body + packer.pack(["end", len(records), crc])
    )


def test_version_1_snapshots_still_restore(name, tmp_path):
    snap = tmp_path / "old.snap"
    _v1_snapshot(snap, [[b"a", b"1", 0], [b"b", b"2", 0], [b"gone", b"x", 1000]])
    with shmkv.restore(snap, name, size="8MiB") as kv:
        assert kv.codec == "raw"
        assert dict(kv.items()) == {b"a": b"1", b"b": b"2"}  # the expired item is skipped


def test_unknown_snapshot_version_is_refused(name, tmp_path):
    snap = tmp_path / "new.snap"
    snap.write_bytes(struct.pack("<8sIQ", b"SHMKVDMP", 9, 0) + msgpack.packb(["end", 0, 0]))
    with shmkv.attach(name, size="8MiB") as kv:
        with pytest.raises(shmkv.Corruption, match="version 9"):
            kv.load(snap)


def _leftovers(d):
    return [f for f in os.listdir(d) if ".tmp." in f]


def test_dump_to_a_directory_fails_before_writing(kv, tmp_path):
    kv.put_many({f"k{i}": b"v" * 100 for i in range(100)})
    target = tmp_path / "adir"
    target.mkdir()
    with pytest.raises(FileAccessError, match="directory") as ei:
        kv.dump(target)
    assert isinstance(ei.value, shmkv.Error)
    assert _leftovers(tmp_path) == [] and os.listdir(target) == []


def test_dump_to_a_missing_directory_names_it(kv, tmp_path):
    with pytest.raises(FileAccessError, match="does not exist") as ei:
        kv.dump(tmp_path / "missing" / "s.snap")
    assert str(tmp_path / "missing") in str(ei.value)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs: a file system that fills up (needs root; skipped otherwise)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)


def test_dump_on_a_full_disk_raises_diskfull_and_leaves_no_temp_file(name, tiny_fs):
    with shmkv.attach(name, size="16MiB") as kv:
        kv.put("small", b"v")
        assert kv.dump(tiny_fs / "s.snap") == 1
        before = (tiny_fs / "s.snap").read_bytes()
        kv.put_many({f"k{i}": os.urandom(1000) for i in range(3000)})  # 3 MB: over the 1 MiB
        with pytest.raises(DiskFull) as ei:
            kv.dump(tiny_fs / "s.snap")
        assert isinstance(ei.value, shmkv.Error) and "s.snap" in str(ei.value)
        assert _leftovers(tiny_fs) == []  # the space is given back
        assert (tiny_fs / "s.snap").read_bytes() == before  # the old snapshot stands
        assert snapshot.read(tiny_fs / "s.snap").records[0][0] == b"small"


def test_snapshot_records_the_shape(kv, tmp_path):
    kv.put("k", b"v")
    kv.dump(tmp_path / "s.snap")
    snap = snapshot.read(tmp_path / "s.snap")
    assert snap.version == snapshot.VERSION == 2
    assert snap.shape() == {"codec": 0, "max_key": kv.max_key, "max_item": kv.max_item}


def test_a_persistent_target_takes_items_over_its_memory_limit(name, second, tmp_path):
    snap = tmp_path / "s.snap"
    with shmkv.attach(name, size="8MiB", max_item="192KiB") as kv:
        kv.put("big", b"x" * 150_000)
        kv.dump(snap)
    with shmkv.attach(second, size="8MiB", max_item="64KiB", path=tmp_path / "db") as kv:
        assert kv.load(snap) == 1
        assert kv["big"] == b"x" * 150_000  # on disk only
