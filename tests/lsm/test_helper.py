"""The maintenance helper process (shmkv/lsm/helper.py): flushes and compactions leave the
writing process, a killed helper costs nothing, and a helper never outlives its handle."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import psutil
import pytest

from shmkv.lsm import LSM

from .conftest import SMALL, spawn


def _wait_for(cond: Callable[[], object], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def _open(path: str) -> LSM:
    return LSM(path, durability="none", memtable_bytes=16 << 10, levels=SMALL, helper=True)


def test_flushes_and_compactions_run_in_a_child_process(db_path: str) -> None:
    db = _open(db_path)
    try:
        model = {}
        for i in range(4000):
            k, v = b"k%05d" % i, os.urandom(40)
            db.put(k, v)
            model[k] = v
        _wait_for(lambda: db.stats()["compactions"] > 0)
        pid = db._helper.pid if db._helper else None
        assert pid is not None
        assert pid in [c.pid for c in psutil.Process().children()]
        assert db.stats()["last_maintenance_error"] is None
        assert all(db.get(k) == v for k, v in model.items())
        assert db.verify() == []
    finally:
        db.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_killed_helper_is_replaced_and_nothing_is_lost(db_path: str) -> None:
    db = _open(db_path)
    model: dict[bytes, bytes] = {}
    kills = 0
    try:
        for i in range(12000):
            k, v = b"k%05d" % (i % 5000), os.urandom(40)
            db.put(k, v)
            model[k] = v
            pid = db._helper.pid if db._helper else None
            if i % 1500 == 700 and pid is not None and psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)  # wherever it is: replay, table write, manifest
                kills += 1
        assert kills >= 3
        db.flush()
        assert all(db.get(k) == v for k, v in model.items())
        assert db.verify() == []
    finally:
        db.close()
    with LSM(db_path, durability="none", background=False) as again:
        assert dict(again.scan()) == model
        assert again.verify() == []


@pytest.mark.multiprocess
def test_the_helper_ends_when_its_parent_is_killed(db_path: str) -> None:
    os.environ["SHMKV_TEST_HELPER"] = "1"
    try:
        w = spawn("crash_writer", db_path, "none", "w", "1")
    finally:
        del os.environ["SHMKV_TEST_HELPER"]
    try:
        parent = psutil.Process(w.pid)
        _wait_for(lambda: parent.children())
        helper = parent.children()[0]
    finally:
        w.kill()
        w.communicate()
    helper.wait(timeout=60)  # EOF on its stdin: it finishes its round and exits
    with LSM(db_path, durability="none", background=False) as db:
        assert db.verify() == []


def test_a_helper_that_cannot_run_falls_back_to_the_thread(db_path: str) -> None:
    """Under an embedding server sys.executable may not be a Python: after a few failed
    starts the handle maintains in its own thread."""
    db = _open(db_path)
    try:
        assert db._helper is not None
        db._helper.executable = "/bin/false"
        model = {}
        for i in range(6000):
            k, v = b"k%05d" % i, os.urandom(40)
            db.put(k, v)
            model[k] = v
        _wait_for(lambda: db._helper is None and db.stats()["compactions"] > 0)
        assert all(db.get(k) == v for k, v in model.items())
        assert db.verify() == []
    finally:
        db.close()


def test_the_helper_never_creates_a_store(tmp_path) -> None:
    # A helper may start just as its parent dies and the store directory is removed: it must
    # not leave a new empty store in its place (LSM(create=False)); it just has no work.
    import json as _json

    from shmkv.errors import StoreNotFound
    from shmkv.lsm.helper_main import main as helper_main

    gone = tmp_path / "gone"
    with pytest.raises(StoreNotFound, match="no store there"):
        LSM(gone, create=False, helper=False)
    assert not gone.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreNotFound, match="no MANIFEST"):
        LSM(empty, create=False, helper=False)
    assert not (empty / "MANIFEST").exists() and not list(empty.glob("wal-*"))
    opts = {"durability": "none", "levels": {}}
    assert helper_main([str(gone), _json.dumps(opts)]) == 0
    assert not gone.exists()
    with LSM(tmp_path / "real", helper=False) as db:  # an existing store opens as before
        db.put(b"k", b"v")
    with LSM(tmp_path / "real", create=False, helper=False) as db:
        assert db.get(b"k") == b"v"
