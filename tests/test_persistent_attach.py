"""A persistent store is one store, whoever attaches it and however: the segment records its
disk tier and the directory records the store's codec and limits."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil

import pytest

import shmkv
from shmkv.lsm import LSM

CTX = mp.get_context("fork")


def _in_child(fn, *args):
    """Run fn(*args) in a forked child; the child's exit code says whether it passed."""

    def body():
        code = 1
        try:
            fn(*args)
            code = 0
        finally:
            os._exit(code)

    p = CTX.Process(target=body)
    p.start()
    p.join(30)
    if p.exitcode is None:
        p.kill()
        p.join(5)
    assert p.exitcode == 0


def _reboot(name):
    """What a reboot does to a store: the segment is gone, the directory stays."""
    shmkv.unlink(name)


def _worker_without_path(name):
    kv = shmkv.attach(name)  # the worker "forgot" path=
    kv.put("from-worker", b"acked")
    assert kv.delete("doomed") is True
    kv.close()


@pytest.mark.multiprocess
def test_attach_without_path_opens_the_recorded_disk_tier(name, tmp_path):
    path = tmp_path / "db"
    with shmkv.attach(name, size="8MiB", path=path, durability="none") as kv:
        kv.put("doomed", b"on disk")
        _in_child(_worker_without_path, name)
        assert kv.get("from-worker") == b"acked"
    _reboot(name)
    with shmkv.attach(name, size="8MiB", path=path) as kv:
        assert kv.get("from-worker") == b"acked"  # the worker's put reached the disk
        assert kv.get("doomed") is None  # and its delete did not come back
        with shmkv.attach(name) as bare:
            assert bare.path == kv.path == str(path.resolve())


def _put_through_inherited_handle(kv):
    kv.put("after-chdir", b"acked")  # the handle reopens its disk tier in the child
    kv.close()


@pytest.mark.multiprocess
def test_relative_path_is_resolved_once_at_attach(name, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    kv = shmkv.attach(name, size="8MiB", path="db", durability="none")
    monkeypatch.chdir(tmp_path / "elsewhere")
    _in_child(_put_through_inherited_handle, kv)
    kv.close()
    _reboot(name)
    with shmkv.attach(name, path=tmp_path / "db") as again:
        assert again.get("after-chdir") == b"acked"
        assert not (tmp_path / "elsewhere" / "db").exists()
        assert again.path == str(tmp_path.resolve() / "db")
        with pytest.raises(shmkv.SegmentMismatch):  # "db" now names another directory
            shmkv.attach(name, path="db")


def test_attach_with_another_path_is_refused_naming_both(name, tmp_path):
    with shmkv.attach(name, size="8MiB", path=tmp_path / "a", durability="none"):
        with pytest.raises(shmkv.SegmentMismatch) as ei:
            shmkv.attach(name, path=tmp_path / "b")
        assert str(tmp_path / "a") in str(ei.value) and str(tmp_path / "b") in str(ei.value)
        assert not (tmp_path / "b").exists()
        # the same directory by another spelling is the same store
        with shmkv.attach(name, path=tmp_path / "a" / ".." / "a") as same:
            assert same.path == str(tmp_path / "a")


def test_memory_only_store_attached_with_a_path_is_refused(name, tmp_path):
    with shmkv.attach(name, size="8MiB") as kv:
        kv.put("k", b"v")
        with pytest.raises(shmkv.SegmentMismatch, match="memory-only") as ei:
            shmkv.attach(name, path=tmp_path / "db")
        assert str(tmp_path / "db") in str(ei.value)
        assert not (tmp_path / "db").exists()
        assert kv.path is None and kv.stats()["path"] is None


def test_durability_is_a_setting_of_the_store(name, tmp_path):
    with shmkv.attach(
        name, size="8MiB", path=tmp_path / "db", durability="interval", interval_ms=20
    ) as kv:
        assert kv.durability == "interval" and kv.stats()["durability"] == "interval"
        with pytest.raises(shmkv.SegmentMismatch) as ei:
            shmkv.attach(name, durability="fsync")
        assert "interval" in str(ei.value) and "fsync" in str(ei.value)
        with pytest.raises(shmkv.SegmentMismatch, match="interval_ms=20"):
            shmkv.attach(name, interval_ms=100)
        with shmkv.attach(name, path=tmp_path / "db") as other:  # None: the store's
            assert other.durability == "interval"
    _reboot(name)
    with shmkv.attach(name, path=tmp_path / "db") as kv:  # a new segment chooses anew: the default
        assert kv.durability == "fsync"


def test_durability_without_a_path_is_refused(name):
    with pytest.raises(shmkv.InvalidArgument, match="needs a path"):
        shmkv.attach(name, size="8MiB", durability="fsync")
    assert name not in shmkv.list_stores()
    with shmkv.attach(name, size="8MiB"):
        with pytest.raises(shmkv.SegmentMismatch, match="memory-only"):
            shmkv.attach(name, durability="none")


def test_pickle_store_comes_back_as_pickle_after_a_reboot(name, tmp_path):
    with shmkv.attach(
        name, size="8MiB", codec="pickle", path=tmp_path / "db", durability="none"
    ) as kv:
        kv["obj"] = {"x": [1, 2]}
    _reboot(name)
    with shmkv.attach(name, path=tmp_path / "db") as kv:
        assert kv.codec == "pickle"
        assert kv["obj"] == {"x": [1, 2]}
    _reboot(name)
    with pytest.raises(shmkv.SegmentMismatch, match="pickle") as ei:
        shmkv.attach(name, path=tmp_path / "db", codec="raw")
    assert "raw" in str(ei.value)


def test_limits_are_recorded_on_disk(name, tmp_path):
    long_key = b"k" * 1500
    with shmkv.attach(
        name, size="8MiB", max_key=2000, path=tmp_path / "db", durability="none"
    ) as kv:
        kv.put(long_key, b"v")
        kv.put("short", b"s")
        max_item = kv.max_item
    _reboot(name)
    with shmkv.attach(name, path=tmp_path / "db") as kv:
        assert kv.max_key == 2000 and kv.max_item == max_item
        assert long_key in list(kv.keys())
        assert kv[long_key] == b"v"  # listed, readable...
        assert kv.delete(long_key) is True  # ...and deletable
    _reboot(name)
    with pytest.raises(shmkv.SegmentMismatch, match="max_key=2000"):
        shmkv.attach(name, path=tmp_path / "db", max_key=1024)
    with pytest.raises(shmkv.SegmentMismatch, match="max_item"):
        shmkv.attach(name, path=tmp_path / "db", max_item=max_item * 2)


def test_segment_is_recreated_at_the_recorded_size(name, tmp_path):
    shmkv.attach(name, size="12MiB", path=tmp_path / "db", durability="none").close()
    _reboot(name)
    with shmkv.attach(name, path=tmp_path / "db") as kv:
        assert kv.stats()["segment_bytes"] == 12 << 20
    _reboot(name)
    with shmkv.attach(name, size="8MiB", path=tmp_path / "db") as kv:  # the memory tier may change
        assert kv.stats()["segment_bytes"] == 8 << 20


def test_directory_of_another_store_is_refused(name, tmp_path):
    with shmkv.attach(name, size="8MiB", path=tmp_path / "db", durability="none"):
        other = name + "-other"
        try:
            with pytest.raises(shmkv.SegmentMismatch, match="a directory serves one store"):
                shmkv.attach(other, size="8MiB", path=tmp_path / "db")
            assert other not in shmkv.list_stores()
        finally:
            if other in shmkv.list_stores():
                shmkv.unlink(other)


def test_removed_directory_is_refused_not_recreated_empty(name, tmp_path):
    with shmkv.attach(name, size="8MiB", path=tmp_path / "db", durability="none") as kv:
        kv.put("k", b"v")
        shutil.rmtree(tmp_path / "db")
        with pytest.raises(shmkv.SegmentMismatch, match="removed or replaced"):
            shmkv.attach(name)
        assert not (tmp_path / "db").exists()


def _attach_and_put(name, path, i):
    with shmkv.attach(name, size="8MiB", codec="pickle", path=path, durability="none") as kv:
        kv[f"w{i}"] = i


@pytest.mark.multiprocess
def test_concurrent_first_attaches_record_the_store_once(name, tmp_path):
    path = tmp_path / "db"
    procs = [CTX.Process(target=_attach_and_put, args=(name, path, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert not [f for f in os.listdir(path) if f.startswith("STORE.")]  # no temporary left
    _reboot(name)
    with shmkv.attach(name, path=path) as kv:
        assert kv.codec == "pickle" and sorted(
            kv.get_many([f"w{i}" for i in range(4)]).values()
        ) == [0, 1, 2, 3]


def test_a_directory_from_before_store_records_is_adopted(name, tmp_path):
    path = tmp_path / "db"
    with LSM(path, durability="none") as db:  # the engine alone writes no STORE record
        db.put(b"k", b"old data")
    assert not (path / "STORE").exists()
    with shmkv.attach(name, size="8MiB", path=path) as kv:
        assert kv["k"] == b"old data"
    assert (path / "STORE").exists()


def test_a_path_too_long_to_record_is_refused(name, tmp_path):
    deep = tmp_path / ("d" * 200) / ("e" * 200) / ("f" * 200) / ("g" * 200) / ("h" * 200)
    deep = deep / ("i" * 200) / ("j" * 200) / ("k" * 200) / ("l" * 200) / ("m" * 200) / ("n" * 200)
    with pytest.raises(shmkv.InvalidArgument, match="at most 2048"):
        shmkv.attach(name, size="8MiB", path=deep)
    assert name not in shmkv.list_stores() and not (tmp_path / ("d" * 200)).exists()
