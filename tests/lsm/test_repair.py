"""shmkv.lsm.repair: a lost or damaged MANIFEST rebuilt from the tables and logs on disk."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable

import pytest

from shmkv.errors import Corruption
from shmkv.lsm import LSM, LevelOptions, StoreInUse, repair
from shmkv.lsm import format as fmt
from shmkv.lsm.wal import encode_record

from .conftest import SMALL, worker_env

Open = Callable[..., LSM]


def _churn(db: LSM, n: int, seed: int = 1) -> dict[bytes, bytes]:
    """Puts, overwrites and deletes over 600 keys; the model of what the store must hold."""
    rnd = random.Random(seed)
    model: dict[bytes, bytes] = {}
    for i in range(n):
        k = b"k%04d" % rnd.randrange(600)
        if rnd.random() < 0.2:
            db.delete(k)
            model.pop(k, None)
        else:
            v = b"v%d-" % i * rnd.randrange(1, 20)
            db.put(k, v)
            model[k] = v
    return model


def _check(db: LSM, model: dict[bytes, bytes]) -> None:
    wrong = [k for k in (b"k%04d" % i for i in range(600)) if db.get(k) != model.get(k)]
    assert wrong == []
    assert list(db.scan()) == sorted(model.items())


def test_a_lost_manifest_is_rebuilt_from_tables_and_logs(open_db: Open, db_path: str) -> None:
    db = open_db()
    model = _churn(db, 3000)
    s = db.stats()
    assert s["compactions"] > 0 and sum(s["files_per_level"][1:]) > 0 and s["memtable_entries"]
    db.close()
    os.unlink(os.path.join(db_path, fmt.MANIFEST))
    with pytest.raises(Corruption, match="shmkv repair"):
        open_db()
    report = repair(db_path, levels=SMALL)
    assert report.changed and report.tables_kept and report.entries_recovered > 0
    assert report.set_aside == [] and report.bytes_dropped == 0
    db = open_db()
    _check(db, model)
    assert db.verify() == []
    assert db.stats()["files_per_level"][1:] == s["files_per_level"][1:]  # levels kept
    db.put(b"after", b"repair")  # and the store goes on working
    db.flush()
    db.close()
    assert open_db().get(b"after") == b"repair"


def test_repair_is_idempotent(open_db: Open, db_path: str) -> None:
    db = open_db()
    model = _churn(db, 1500)
    db.close()
    os.unlink(os.path.join(db_path, fmt.MANIFEST))
    assert repair(db_path, levels=SMALL).changed
    listing = sorted(os.listdir(db_path))
    with open(os.path.join(db_path, fmt.MANIFEST), "rb") as f:
        manifest = f.read()
    again = repair(db_path, levels=SMALL)
    assert not again.changed and "nothing changed" in str(again)
    assert sorted(os.listdir(db_path)) == listing
    with open(os.path.join(db_path, fmt.MANIFEST), "rb") as f:
        assert f.read() == manifest
    _check(open_db(), model)


def test_a_damaged_table_is_set_aside_in_lost_not_deleted(open_db: Open, db_path: str) -> None:
    db = open_db(memtable_bytes=1 << 20, levels=LevelOptions(l0_trigger=100))  # two L0 tables
    for i in range(100):
        db.put(b"a%03d" % i, b"x" * 50)
    db.flush()
    for i in range(100):
        db.put(b"b%03d" % i, b"y" * 50)
    db.flush()
    tables = sorted(n for n in os.listdir(db_path) if n.endswith(".sst"))
    assert len(tables) == 2
    db.close()
    victim = os.path.join(db_path, tables[0])
    with open(victim, "r+b") as f:  # one bit of the first data block
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 1]))
    os.unlink(os.path.join(db_path, fmt.MANIFEST))
    report = repair(db_path, levels=SMALL)
    ((moved, why),) = report.set_aside
    assert moved == os.path.join(db_path, "lost", tables[0]) and "checksum" in why
    assert os.path.exists(moved) and not os.path.exists(victim)
    db = open_db(memtable_bytes=1 << 20, levels=LevelOptions(l0_trigger=100))
    assert all(db.get(b"b%03d" % i) == b"y" * 50 for i in range(100))
    assert db.get(b"a000") is None  # lost with its table -- and said so:
    assert any(tables[0] in p and "lost/" in p for p in db.verify())


def test_repair_refuses_while_another_process_has_the_store_open(db_path: str) -> None:
    LSM(db_path, durability="none", background=False).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from shmkv.lsm import LSM; db = LSM(sys.argv[1], durability='none', "
         "background=False); print('open', flush=True); sys.stdin.read()", db_path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(StoreInUse, match="open in another process"):
            repair(db_path)
    finally:
        holder.communicate("", timeout=30)
    db = LSM(db_path, durability="none", background=False)  # a handle in this process too
    try:
        with pytest.raises(StoreInUse):
            repair(db_path)
    finally:
        db.close()
    assert not repair(db_path).changed  # closed: it runs (and finds nothing to do)


def test_repair_after_a_killed_holder_runs(db_path: str) -> None:
    """The open lock dies with its process: a SIGKILLed writer does not block repair."""
    LSM(db_path, durability="none", background=False).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from shmkv.lsm import LSM; db = LSM(sys.argv[1], durability='none', "
         "background=False); db.put(b'k', b'v'); print('open', flush=True); sys.stdin.read()",
         db_path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=worker_env(),
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
    holder.kill()
    holder.communicate(timeout=30)
    os.unlink(os.path.join(db_path, fmt.MANIFEST))
    assert repair(db_path).entries_recovered == 1
    db = LSM(db_path, durability="none", background=False)
    try:
        assert db.get(b"k") == b"v"
    finally:
        db.close()


def test_repair_mends_a_wal_sealed_to_a_missing_log(open_db: Open, db_path: str) -> None:
    db = open_db(memtable_bytes=1 << 20)
    for i in range(20):
        db.put(b"k%d" % i, b"v%d" % i)
    db.close()
    with open(os.path.join(db_path, fmt.wal_name(1)), "ab") as f:
        f.write(encode_record(fmt.REC_SEAL, fmt.U64.pack(2)))
    with pytest.raises(Corruption, match="missing"):
        open_db()
    report = repair(db_path)
    assert report.changed and report.entries_recovered == 20
    db = open_db(memtable_bytes=1 << 20)
    assert [db.get(b"k%d" % i) for i in range(20)] == [b"v%d" % i for i in range(20)]
    assert db.verify() == []


def test_a_compaction_cut_short_keeps_every_key_of_its_inputs(open_db: Open, db_path: str) -> None:
    """Inputs of a compaction left on disk beside its outputs (a crash before the unlink, or
    before the manifest): overlapping tables at one level are merged newest first."""
    db = open_db()
    model = _churn(db, 2000, seed=3)
    db.flush()
    keep = {}
    for n in os.listdir(db_path):
        if n.endswith(".sst"):
            with open(os.path.join(db_path, n), "rb") as f:
                keep[n] = f.read()
    model.update(_churn(db, 0))
    for i in range(0, 600, 3):  # newer versions of a third of the keys, compacted down
        db.put(b"k%04d" % i, b"new%d" % i)
        model[b"k%04d" % i] = b"new%d" % i
    db.compact()
    db.close()
    for n, data in keep.items():  # the old tables come back: stale inputs at every level
        p = os.path.join(db_path, n)
        if not os.path.exists(p):
            with open(p, "wb") as f:
                f.write(data)
    os.unlink(os.path.join(db_path, fmt.MANIFEST))
    report = repair(db_path, levels=SMALL)
    assert any("overlapped" in n for n in report.notes)
    db = open_db()
    _check(db, model)
    assert [p for p in db.verify() if "lost/" not in p] == []


def test_random_damage_then_a_lost_manifest_loses_only_what_repair_reports(
    open_db: Open, db_path: str, tmp_path: os.PathLike[str]
) -> None:
    """Seeded crash-style trials: flip a bit in a WAL record or cut the WAL, delete the
    MANIFEST, repair. Every key is then either right, or its loss is in the report."""
    db = open_db(memtable_bytes=1 << 20, durability="fsync")
    for i in range(60):
        db.put(b"k%02d" % i, b"v%d" % i)
        if i == 29:
            db.flush()  # half in a table, half in the log
    db.close()
    pristine = str(tmp_path) + "/pristine"
    shutil.copytree(db_path, pristine)
    wal = os.path.join(db_path, fmt.wal_name(2))
    rnd = random.Random(12)
    for trial in range(20):
        shutil.rmtree(db_path)
        shutil.copytree(pristine, db_path)
        size = os.path.getsize(wal)
        off = rnd.randrange(fmt.WAL_HEADER.size, size)
        if trial % 2:
            os.truncate(wal, off)
        else:
            with open(wal, "r+b") as f:
                f.seek(off)
                b = f.read(1)
                f.seek(off)
                f.write(bytes([b[0] ^ (1 << rnd.randrange(8))]))
        os.unlink(os.path.join(db_path, fmt.MANIFEST))
        report = repair(db_path)
        db = LSM(db_path, durability="none", background=False)
        try:
            got = {i: db.get(b"k%02d" % i) for i in range(60)}
        finally:
            db.close()
        assert all(got[i] == b"v%d" % i for i in range(30)), trial  # in the table
        missing = [i for i in range(30, 60) if got[i] is None]
        assert all(got[i] == b"v%d" % i for i in range(30, 60) if i not in missing), trial
        if trial % 2:  # a cut: what follows it is gone; a record cut in two is reported
            assert missing == list(range(missing[0], 60)) if missing else True, trial
        else:  # a flip damages one record: one put at most, reported, the log kept in lost/
            assert len(missing) <= 1, (trial, missing)
            if missing:
                assert report.bytes_dropped > 0, trial
                assert any("damaged" in why for _, why in report.set_aside), trial


def test_a_garbled_shared_page_is_set_aside_and_recreated(open_db: Open, db_path: str) -> None:
    db = open_db(memtable_bytes=1 << 20)
    db.put(b"k", b"v")
    db.close()
    with open(os.path.join(db_path, fmt.SHARED), "r+b") as f:
        f.write(b"garbage!")
    with pytest.raises(Corruption, match="not a shmkv shared page"):
        open_db()
    report = repair(db_path)
    assert report.changed and not report.manifest_rebuilt
    assert [os.path.basename(p) for p, _ in report.set_aside] == [fmt.SHARED]
    db = open_db(memtable_bytes=1 << 20)
    assert db.get(b"k") == b"v"
    db.close()
    assert not repair(db_path).changed
