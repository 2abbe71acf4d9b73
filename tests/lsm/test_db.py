"""The LSM class in one process: API behaviour, persistence, stats, error paths, and a hypothesis
state machine checked against a plain dict."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shmkv
from shmkv.errors import Corruption, InvalidArgument, InvalidType, KeyTooLarge, StoreClosed
from shmkv.lsm import LSM, DiskFull, FileAccessError
from shmkv.lsm import format as fmt

from .conftest import SMALL

Open = Callable[..., LSM]


# -- basic behaviour -----------------------------------------------------------------------------


def test_put_get_overwrite_delete(open_db: Open) -> None:
    db = open_db()
    assert db.get(b"k") is None
    db.put(b"k", b"v1")
    assert db.get(b"k") == b"v1"
    db.put(b"k", b"v2")
    assert db.get(b"k") == b"v2"
    db.delete(b"k")
    assert db.get(b"k") is None and b"k" not in db
    db.delete(b"never-there")  # a tombstone for an absent key is fine


def test_values_survive_reopen_from_wal_and_from_tables(open_db: Open) -> None:
    db = open_db()
    for i in range(500):
        db.put(b"k%04d" % i, b"v%d" % i)
    assert db.stats()["flushes"] > 0  # some are in tables now, the tail in the WAL
    db.close()
    db = open_db()
    assert all(db.get(b"k%04d" % i) == b"v%d" % i for i in range(500))
    assert db.verify() == []


def test_delete_shadows_a_value_already_in_a_table(open_db: Open) -> None:
    db = open_db(memtable_bytes=1 << 20)
    db.put(b"k", b"old")
    db.flush()
    db.delete(b"k")
    assert db.get(b"k") is None
    db.flush()
    assert db.get(b"k") is None
    db.close()
    assert open_db().get(b"k") is None


def test_expired_keys_read_as_absent(open_db: Open) -> None:
    db = open_db()
    now = int(time.time() * 1000)
    db.put(b"past", b"v", expire_at_ms=now - 1)
    db.put(b"future", b"v", expire_at_ms=now + 60_000)
    db.put(b"never", b"v")
    assert db.get(b"past") is None
    assert db.get_entry(b"future") == (b"v", now + 60_000)
    assert db.get_entry(b"never") == (b"v", 0)
    assert [k for k, _ in db.scan()] == [b"future", b"never"]
    db.flush()
    assert db.get(b"past") is None and db.get_entry(b"future") == (b"v", now + 60_000)


def test_put_many_is_one_wal_append_and_one_fsync(open_db: Open) -> None:
    db = open_db(durability="fsync", memtable_bytes=1 << 20)
    before = db.stats()["wal_syncs"]
    db.put_many([(b"a", b"1", 0), (b"b", b"2", 0), (b"c", b"3")])  # type: ignore[list-item]
    assert db.stats()["wal_syncs"] == before + 1
    assert [db.get(k) for k in (b"a", b"b", b"c")] == [b"1", b"2", b"3"]


def test_puts_under_an_unchanged_view_take_the_one_call_fast_path(open_db: Open) -> None:
    db = open_db(durability="none", memtable_bytes=1 << 20)
    db.put(b"warm", b"up")  # the first put may catch up
    before = db._tail.puts
    for i in range(100):
        db.put(b"k%d" % i, b"v%d" % i)
    assert db._tail.puts == before + 100
    other = open_db(durability="none", memtable_bytes=1 << 20)  # appends: our view is stale
    other.put(b"k5", b"from the other")
    db.put(b"k6", b"after it")  # the Python path catches up, then appends
    assert db._tail.puts == before + 100
    assert db.get(b"k5") == b"from the other" and other.get(b"k6") == b"after it"
    db.put(b"k7", b"fast again")
    assert db._tail.puts == before + 101
    assert other.get(b"k7") == b"fast again"


def test_scan_is_ordered_half_open_and_skips_dead_keys(open_db: Open) -> None:
    db = open_db()
    for i in range(300):
        db.put(b"k%03d" % i, b"v%d" % i)
    for i in range(0, 300, 3):
        db.delete(b"k%03d" % i)
    db.put(b"k005", b"new")
    want = {b"k%03d" % i: b"v%d" % i for i in range(300) if i % 3}
    want[b"k005"] = b"new"
    assert list(db.scan()) == sorted(want.items())
    assert list(db.scan(b"k100", b"k110")) == [
        (k, v) for k, v in sorted(want.items()) if b"k100" <= k < b"k110"
    ]
    assert list(db.scan(b"zzz")) == []


def test_scan_sees_a_snapshot_and_survives_compaction(open_db: Open) -> None:
    db = open_db()
    for i in range(400):
        db.put(b"k%03d" % i, b"v")
    it = db.scan()
    first = next(it)
    db.compact()  # the tables the scan holds are unlinked now
    for i in range(400):
        db.put(b"k%03d" % i, b"w")
    rest = list(it)
    assert first == (b"k000", b"v") and len(rest) == 399 and all(v == b"v" for _, v in rest)


def test_flush_and_compact_move_data_down_and_drop_garbage(open_db: Open) -> None:
    db = open_db(memtable_bytes=1 << 20)
    for r in range(3):
        for i in range(200):
            db.put(b"k%03d" % i, b"round%d" % r * 20)
        db.flush()
    for i in range(100):
        db.delete(b"k%03d" % i)
    before = db.stats()
    db.compact()
    after = db.stats()
    assert after["files_per_level"][0] == 0 and sum(after["files_per_level"]) >= 1
    assert after["entries_on_disk"] == 100  # shadowed versions and tombstones are gone
    assert after["disk_bytes"] < before["disk_bytes"]
    assert dict(db.scan()) == {b"k%03d" % i: b"round2" * 20 for i in range(100, 200)}
    assert db.verify() == []


def test_stats_report_the_promised_numbers(open_db: Open) -> None:
    db = open_db()
    for i in range(2000):
        db.put(b"k%05d" % i, b"x" * 50)
    for i in range(2000):
        db.get(b"k%05d-absent" % i)  # inside the key ranges: the bloom decides
    s = db.stats()
    for key in (
        "disk_bytes",
        "files_per_level",
        "bloom_false_positive_rate",
        "write_amplification",
        "compactions",
        "flushes",
    ):
        assert key in s
    assert s["flushes"] > 0 and s["compactions"] > 0 and s["write_amplification"] > 1.0
    assert s["bloom_negatives"] > 0 and s["bloom_false_positive_rate"] < 0.05


@pytest.mark.slow
def test_64_mib_value_round_trips_through_wal_table_and_reopen(open_db: Open) -> None:
    _big_value_round_trip(open_db, 64)


def test_16_mib_value_round_trips_through_wal_table_and_reopen(open_db: Open) -> None:
    _big_value_round_trip(open_db, 16)


def _big_value_round_trip(open_db: Open, mib: int) -> None:
    big = os.urandom(1 << 20) * mib
    db = open_db(memtable_bytes=4 << 20)
    db.put(b"big", big)
    db.put(b"small", b"s")
    assert db.get(b"big") == big
    db.flush()
    assert db.get(b"big") == big
    db.close()
    db = open_db(memtable_bytes=4 << 20)
    assert db.get(b"big") == big and db.get(b"small") == b"s"
    assert db.verify() == []


@pytest.mark.parametrize("durability", ["none", "interval", "fsync"])
def test_every_durability_mode_stores_and_recovers(open_db: Open, durability: str) -> None:
    db = open_db(durability=durability, interval_ms=5)
    for i in range(50):
        db.put(b"k%d" % i, b"v")
    if durability == "interval":
        time.sleep(0.05)
        assert db.stats()["wal_syncs"] >= 1  # the group-commit thread ran
    db.close()
    db = open_db(durability=durability)
    assert all(db.get(b"k%d" % i) == b"v" for i in range(50))


def test_context_manager_closes_and_closed_handle_refuses(db_path: str) -> None:
    with LSM(db_path, durability="none") as db:
        db.put(b"k", b"v")
    with pytest.raises(StoreClosed):
        db.get(b"k")
    db.close()  # idempotent


# -- error paths ---------------------------------------------------------------------------------


def test_bad_arguments_raise_shmkv_errors(open_db: Open) -> None:
    db = open_db()
    with pytest.raises(KeyTooLarge):
        db.put(b"", b"v")
    with pytest.raises(KeyTooLarge):
        db.put(b"k" * (fmt.MAX_KEY + 1), b"v")
    with pytest.raises(InvalidType):
        db.put(b"k", "not bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidType):
        db.get(12)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        db.put(b"k", b"v", expire_at_ms=-5)
    with pytest.raises(InvalidArgument):
        LSM(db.path, durability="sometimes")
    for exc in (KeyTooLarge, InvalidType, InvalidArgument):
        assert issubclass(exc, shmkv.Error)


def test_missing_table_is_reported_clearly(open_db: Open, db_path: str) -> None:
    db = open_db(memtable_bytes=1 << 20)
    db.put(b"k", b"v")
    db.flush()
    db.close()
    (sst,) = [n for n in os.listdir(db_path) if n.endswith(".sst")]
    os.unlink(os.path.join(db_path, sst))
    with pytest.raises(Corruption, match=f"{sst}: named by the manifest but missing"):
        open_db()


def test_corrupted_table_block_raises_corruption_not_data(open_db: Open, db_path: str) -> None:
    db = open_db(memtable_bytes=1 << 20)
    for i in range(1000):
        db.put(b"k%04d" % i, b"value %d" % i)
    db.flush()
    db.close()
    (sst,) = [n for n in os.listdir(db_path) if n.endswith(".sst")]
    p = os.path.join(db_path, sst)
    with open(p, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    db = open_db(memtable_bytes=1 << 20)
    with pytest.raises(Corruption, match=sst):
        db.get(b"k0000")
    with pytest.raises(Corruption, match=sst):
        list(db.scan())
    problems = db.verify()
    assert problems and sst in problems[0]


def test_manifest_missing_with_data_files_is_refused(open_db: Open, db_path: str) -> None:
    db = open_db(memtable_bytes=1 << 20)
    db.put(b"k", b"v")
    db.flush()
    db.close()
    os.unlink(os.path.join(db_path, fmt.MANIFEST))
    with pytest.raises(Corruption, match="MANIFEST is missing but data files exist"):
        open_db()


def _open_as_nobody(path: str) -> str:
    """Fork, drop to uid/gid 65534 in the child, open the store there; return what it said.

    A fork rather than a new interpreter: nobody may not be allowed to exec our Python."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                LSM(path, durability="none").close()
                msg = "opened"
            except BaseException as e:
                msg = f"{type(e).__name__} {e}"
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.mark.multiprocess
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges to nobody")
def test_unreadable_table_gives_a_clear_error() -> None:
    base = tempfile.mkdtemp(prefix="lsm-perm-")  # pytest's tmp_path is not traversable by nobody
    try:
        os.chmod(base, 0o755)
        db_path = os.path.join(base, "db")
        with LSM(db_path, durability="none") as db:
            db.put(b"k", b"v")
            db.flush()
        for name in os.listdir(db_path):
            os.chmod(os.path.join(db_path, name), 0o666)
        os.chmod(db_path, 0o777)
        (sst,) = [n for n in os.listdir(db_path) if n.endswith(".sst")]
        os.chmod(os.path.join(db_path, sst), 0o000)  # root reads anything: test as nobody
        out = _open_as_nobody(db_path)
        assert out.startswith("FileAccessError"), out
        assert sst in out and "Permission denied" in out and "open table" in out
        assert issubclass(FileAccessError, shmkv.Error) and issubclass(FileAccessError, OSError)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tiny_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_raises_and_loses_nothing_acknowledged(tiny_fs: str) -> None:
    path = os.path.join(tiny_fs, "db")
    acked: dict[bytes, bytes] = {}
    with LSM(path, durability="fsync", memtable_bytes=64 << 10, levels=SMALL) as db:
        with pytest.raises(DiskFull) as ei:
            for i in range(100_000):
                k, v = b"k%06d" % i, os.urandom(2000)
                db.put(k, v)
                acked[k] = v
        assert ei.value.errno is not None and isinstance(ei.value, shmkv.errors.StoreFull)
        assert len(acked) > 100
        # Still readable while full; every acknowledged write is there.
        assert all(db.get(k) == v for k, v in acked.items())
    with LSM(path, durability="fsync", memtable_bytes=64 << 10, levels=SMALL) as db:
        assert all(db.get(k) == v for k, v in acked.items())
        assert db.verify() == []
        # Make room by deleting, compacting; then writes work again.
        for k in list(acked)[: len(acked) // 2]:
            try:
                db.delete(k)
                del acked[k]
            except DiskFull:
                break
        try:
            db.compact()
        except DiskFull:
            pass  # the merge itself may need space it does not have; nothing is lost either way
        assert all(db.get(k) == v for k, v in acked.items())
        assert db.verify() == []


# -- the model check -----------------------------------------------------------------------------

KEYS = st.sampled_from([b"k%02d" % i for i in range(24)])
VALUES = st.binary(max_size=300)


class LSMvsDict(RuleBasedStateMachine):
    """Random puts/deletes/batches/flushes/compactions/reopens; reads must match a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="lsm-model-")
        self.db = self._open()
        self.model: dict[bytes, bytes] = {}

    def _open(self) -> LSM:
        return LSM(self.dir, durability="none", memtable_bytes=1024, levels=SMALL)

    @rule(k=KEYS, v=VALUES)
    def put(self, k: bytes, v: bytes) -> None:
        self.db.put(k, v)
        self.model[k] = v

    @rule(k=KEYS, v=VALUES)
    def put_expired(self, k: bytes, v: bytes) -> None:
        self.db.put(k, v, expire_at_ms=1)  # long expired: reads as absent
        self.model.pop(k, None)

    @rule(items=st.lists(st.tuples(KEYS, VALUES), max_size=10))
    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self.db.put_many((k, v, 0) for k, v in items)
        self.model.update(items)

    @rule(k=KEYS)
    def delete(self, k: bytes) -> None:
        self.db.delete(k)
        self.model.pop(k, None)

    @rule(k=KEYS)
    def get(self, k: bytes) -> None:
        assert self.db.get(k) == self.model.get(k)

    @rule(a=KEYS, b=KEYS)
    def scan_range(self, a: bytes, b: bytes) -> None:
        lo, hi = min(a, b), max(a, b)
        assert list(self.db.scan(lo, hi)) == sorted(
            (k, v) for k, v in self.model.items() if lo <= k < hi
        )

    @rule()
    def flush(self) -> None:
        self.db.flush()

    @rule()
    def compact(self) -> None:
        self.db.compact()

    @rule()
    def reopen(self) -> None:
        self.db.close()
        self.db = self._open()

    @precondition(lambda self: len(self.model) > 0)
    @invariant()
    def scan_matches(self) -> None:
        assert list(self.db.scan()) == sorted(self.model.items())

    def teardown(self) -> None:
        try:
            assert self.db.verify() == []
        finally:
            self.db.close()
            shutil.rmtree(self.dir, ignore_errors=True)


LSMvsDict.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_lsm_matches_a_dict_model = LSMvsDict.TestCase


# -- background maintenance and threads ----------------------------------------------------------


def test_background_thread_flushes_and_compacts_while_puts_continue(open_db: Open) -> None:
    db = open_db(background=True)
    for i in range(3000):
        db.put(b"k%05d" % i, b"v%d" % i)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        s = db.stats()
        if s["flushes"] > 5 and s["compactions"] > 0 and s["wal_bytes"] < 4 * 4096 + 4096:
            break
        time.sleep(0.05)
    assert s["flushes"] > 5 and s["compactions"] > 0, s
    assert s["last_maintenance_error"] is None
    assert all(db.get(b"k%05d" % i) == b"v%d" % i for i in range(3000))
    assert db.verify() == []


def test_threads_sharing_one_handle_see_a_consistent_store(open_db: Open) -> None:
    import threading

    db = open_db(background=True)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(600):
                k = b"t%d-%04d" % (t, i)
                db.put(k, k)
                if i % 3 == 0:
                    db.delete(b"t%d-%04d" % (t, i // 2))
                assert db.get(k) in (k, None)  # None only if this very key was deleted above
            list(db.scan(b"t%d-" % t, b"t%d." % t))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    for t in range(4):
        deleted = {b"t%d-%04d" % (t, i // 2) for i in range(0, 600, 3)}
        want = {b"t%d-%04d" % (t, i) for i in range(600)} - deleted
        assert {k for k, _ in db.scan(b"t%d-" % t, b"t%d." % t)} == want
    assert db.verify() == []


@pytest.mark.multiprocess
def test_handle_used_after_fork_raises_and_leaves_the_parent_working(open_db: Open) -> None:
    db = open_db()
    db.put(b"k", b"v")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            try:
                db.get(b"k")
                msg = b"no error"
            except shmkv.Error as e:
                msg = str(e).encode()
            db.close()  # harmless: the handle was abandoned at fork
            with LSM(db.path, durability="none") as mine:  # the right way
                msg += b"|" + (mine.get(b"k") or b"None")
            os.write(w, msg)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    assert "across fork" in out and out.endswith("|v"), out
    db.put(b"k2", b"v2")  # the parent's locks were not released by the child
    db.flush()
    assert db.get(b"k2") == b"v2" and db.verify() == []


@pytest.mark.timeout(30)
def test_a_fifo_in_place_of_the_manifest_raises_instead_of_blocking(
    open_db: Open, db_path: str
) -> None:
    """Every read of on-disk state is bounded: the manifest is read by its size, and a file
    that is not a regular file is refused (opening a FIFO for reading blocked forever)."""
    open_db().close()
    os.unlink(os.path.join(db_path, fmt.MANIFEST))
    os.mkfifo(os.path.join(db_path, fmt.MANIFEST))
    with pytest.raises(Corruption, match="MANIFEST: not a regular file"):
        open_db()
