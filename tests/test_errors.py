"""Bad input gets a clear exception deriving from shmkv.Error, and the store stays usable."""

from __future__ import annotations

import fractions
import mmap
import multiprocessing
import os
import pickle
import shutil
import struct
import subprocess
import sys

import posix_ipc
import pytest

import shmkv
from shmkv import segment


@pytest.mark.parametrize("key", [1, 2.5, None, ["k"], bytearray(b"k"), object()])
def test_wrong_key_type_raises_type_error(kv, key):
    with pytest.raises(TypeError) as ei:
        kv.put(key, b"v")
    assert isinstance(ei.value, shmkv.Error)
    assert "key must be bytes or str" in str(ei.value)
    for op in (kv.get, kv.delete, kv.__contains__, kv.incr):
        with pytest.raises(shmkv.InvalidType):
            op(key)
    kv.put("ok", b"v")
    assert kv["ok"] == b"v"


@pytest.mark.parametrize("value", ["text", 1, None, 3.5, {"a": 1}])
def test_wrong_value_type_raises_type_error(kv, value):
    with pytest.raises(shmkv.InvalidType) as ei:
        kv.put("k", value)
    assert isinstance(ei.value, TypeError)
    assert "bytes-like" in str(ei.value)
    assert "k" not in kv


def test_empty_key_is_rejected(kv):
    with pytest.raises(shmkv.KeyTooLarge, match="1 to"):
        kv.put(b"", b"v")
    with pytest.raises(shmkv.KeyTooLarge):
        kv.incr(b"")


def test_oversized_key_names_the_limit(kv):
    kv.put(b"k" * kv.max_key, b"v")
    with pytest.raises(shmkv.KeyTooLarge, match=str(kv.max_key)):
        kv.put(b"k" * (kv.max_key + 1), b"v")
    assert kv[b"k" * kv.max_key] == b"v"


def test_key_limit_is_at_least_250_bytes(kv):
    assert kv.max_key >= 250


def test_oversized_value_names_the_limit(kv):
    with pytest.raises(shmkv.ValueTooLarge, match=str(kv.max_item)) as ei:
        kv.put("k", b"x" * kv.max_item)
    assert isinstance(ei.value, ValueError)
    kv.put("k", b"ok")
    assert kv.verify() == []


def test_default_item_limit_is_one_mib_for_large_stores(name):
    with shmkv.attach(name, size="128MiB") as kv:
        assert kv.max_item == 1 << 20
        kv.put("k", b"x" * ((1 << 20) - 100))


def test_bad_ttl(kv):
    with pytest.raises(shmkv.InvalidArgument):
        kv.put("k", b"v", ttl=-1)
    with pytest.raises(shmkv.InvalidArgument):
        kv.put("k", b"v", ttl=0)
    with pytest.raises(shmkv.InvalidType):
        kv.put("k", b"v", ttl="soon")
    assert "k" not in kv


def test_bad_incr_delta(kv):
    with pytest.raises(shmkv.InvalidType):
        kv.incr("n", 1.5)
    with pytest.raises(shmkv.InvalidArgument):
        kv.incr("n", 2**64)


def test_use_after_close_raises_store_closed(name):
    kv = shmkv.attach(name, size="8MiB")
    kv.put("k", b"v")
    kv.close()
    kv.close()  # idempotent
    for call in (lambda: kv.get("k"), lambda: kv.put("k", b"v"), lambda: kv["k"],
                 lambda: len(kv), lambda: kv.delete("k"), lambda: kv.stats(),
                 lambda: list(kv.keys()), lambda: kv.verify(), lambda: "k" in kv):
        with pytest.raises(shmkv.StoreClosed):
            call()


def test_size_mismatch_names_both_sizes(name):
    with shmkv.attach(name, size="8MiB"):
        with pytest.raises(shmkv.SegmentMismatch) as ei:
            shmkv.attach(name, size="16MiB")
        msg = str(ei.value)
        assert str(8 << 20) in msg and str(16 << 20) in msg


def test_codec_mismatch(name):
    with shmkv.attach(name, size="8MiB", codec="raw"):
        with pytest.raises(shmkv.SegmentMismatch, match="pickle"):
            shmkv.attach(name, codec="pickle")


def test_layout_version_mismatch_names_both_versions(name):
    shmkv.attach(name, size="8MiB").close()
    shm = posix_ipc.SharedMemory(segment.shm_name(name))
    with mmap.mmap(shm.fd, 4096) as m:
        m[8:12] = struct.pack("<I", 99)
    shm.close_fd()
    with pytest.raises(shmkv.SegmentMismatch) as ei:
        shmkv.attach(name)
    assert "99" in str(ei.value) and f"layout version {segment._core.LAYOUT_VERSION}" in str(ei.value)


def test_unfinished_segment_is_recreated(name):
    shm = posix_ipc.SharedMemory(segment.shm_name(name), posix_ipc.O_CREX, size=1 << 20)
    with mmap.mmap(shm.fd, 4096) as m:
        m[0:8] = b"NOTSHMKV"
        m[4000:4008] = struct.pack("<Q", 0)
    shm.close_fd()
    # init_done is unset, so it reads as a half-made segment and is re-created
    with shmkv.attach(name, size="8MiB") as kv:
        kv.put("k", b"v")
        assert kv["k"] == b"v"


def test_store_too_big_for_dev_shm_fails_at_create(name):
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    with pytest.raises(shmkv.StoreFull, match="/dev/shm"):
        shmkv.attach(name, size=free + (1 << 30))
    assert name not in shmkv.list_stores()


def test_fallocate_failure_is_a_clear_error(name, monkeypatch):
    # Even when statvfs says there is room, a failed reservation is an error at create
    # time, never a SIGBUS later: ask for more than the whole tmpfs while hiding statvfs.
    monkeypatch.setattr(segment, "_free_shm_bytes", lambda: None)
    total = os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize
    if total + (1 << 30) > (32 << 30):
        pytest.skip("tmpfs larger than the 32 GiB segment limit")
    with pytest.raises(shmkv.StoreFull, match="reserve"):
        shmkv.attach(name, size=total + (1 << 30))
    assert name not in shmkv.list_stores()


@pytest.mark.parametrize("size", ["12XB", "-5", "0", "abc", 0, -1])
def test_bad_size_strings(name, size):
    with pytest.raises(shmkv.Error):
        shmkv.attach(name, size=size)


def test_too_small_size_is_explained(name):
    with pytest.raises(shmkv.InvalidArgument, match="too small"):
        shmkv.attach(name, size="64KiB")
    assert name not in shmkv.list_stores()


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 300, "spaces here", None])
def test_bad_store_names(bad):
    with pytest.raises(shmkv.InvalidArgument):
        shmkv.attach(bad, size="8MiB")


def test_bad_attach_arguments(name):
    with pytest.raises(shmkv.InvalidArgument):
        shmkv.attach(name, size="8MiB", codec="json")
    with pytest.raises(shmkv.InvalidArgument):
        shmkv.attach(name, size="8MiB", max_key=0)
    with pytest.raises(shmkv.InvalidArgument):
        shmkv.attach(name, size="8MiB", growth_factor=0.5)
    assert name not in shmkv.list_stores()


def test_store_full_when_items_cannot_fit(name):
    # a store whose every page is held by one class still takes other sizes (pages move)
    with shmkv.attach(name, size="4MiB") as kv:
        for i in range(20000):
            kv.put(f"small{i}", b"s" * 20)
        kv.put("big", b"b" * 30000)
        assert kv["big"] == b"b" * 30000
        assert kv.verify() == []


# -- issue 8: every promise of the single-host store ---------------------------------------

CTX = multiprocessing.get_context("fork")


@pytest.fixture(params=["memory", "disk"])
def either(request, name, tmp_path):
    """A memory-only store and a persistent one: the same rules hold in both tiers."""
    tier = {"path": tmp_path / "db", "durability": "none"} if request.param == "disk" else {}
    store = shmkv.attach(name, size="16MiB", **tier)
    yield store
    store.close()


def _shm_entries(name: str) -> set[str]:
    """The /dev/shm entries of store `name` (other stores may come and go meanwhile)."""
    return {e for e in os.listdir(segment.SHM_DIR) if name in e}


@pytest.mark.parametrize("ttl", [float("inf"), float("nan"), 1.85e16, 1e17, 2**64, 10**400,
                                 fractions.Fraction(10**400), 100 * 365 * 86400 + 1])
def test_huge_or_non_finite_ttl_is_rejected_in_both_tiers(either, ttl):
    # these used to overflow the double-to-uint64 conversion: stored, then gone at once
    calls = (lambda: either.put("k", b"v", ttl=ttl), lambda: either.add("k", b"v", ttl=ttl),
             lambda: either.put_many({"k": b"v"}, ttl=ttl))
    for call in calls:
        with pytest.raises(shmkv.InvalidArgument, match="ttl"):
            call()
    assert "k" not in either


@pytest.mark.parametrize("ttl", ["5", True, b"5", [5]])
def test_ttl_must_be_a_number(either, ttl):
    for call in (lambda: either.put("k", b"v", ttl=ttl), lambda: either.add("k", b"v", ttl=ttl),
                 lambda: either.put_many({"k": b"v"}, ttl=ttl)):
        with pytest.raises(shmkv.InvalidType, match="ttl"):
            call()
    assert "k" not in either


def test_a_long_ttl_keeps_the_item(either):
    either.put("k", b"v", ttl=100 * 365 * 86400)  # the longest accepted: 100 years
    either.add("a", b"v", ttl=1e9)
    either.put_many({"m": b"v"}, ttl=3e9)
    assert either.get("k") == b"v" and either.get("a") == b"v" and either.get("m") == b"v"


def test_disk_tier_rejects_an_expiry_past_its_u64(tmp_path):
    from shmkv.lsm import LSM

    db = LSM(tmp_path / "db", durability="none", helper=False)
    try:
        for e in (1 << 64, True):
            with pytest.raises(shmkv.InvalidArgument, match="expire_at_ms"):
                db.put(b"k", b"v", e)
            with pytest.raises(shmkv.InvalidArgument, match="expire_at_ms"):
                db.put_many([(b"k", b"v", e)])
        assert db.get(b"k") is None
    finally:
        db.close()


def test_path_that_is_a_file_is_a_shmkv_error(name, tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    before = _shm_entries(name)
    for path in (f, f / "under"):
        with pytest.raises(shmkv.Error, match="file"):
            shmkv.attach(name, size="8MiB", path=path)
    # and nothing is left reserved in /dev/shm: no segment, no lock file
    assert _shm_entries(name) == before


def test_disk_tier_alone_reports_a_file_in_the_way(tmp_path):
    from shmkv.lsm import LSM

    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(shmkv.Error, match="store directory"):
        LSM(tmp_path / "file" / "db")


@pytest.fixture
def read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                        capture_output=True, timeout=30).returncode
    if rc != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True, timeout=30)


def test_new_store_on_a_read_only_file_system(name, read_only_dir):
    before = _shm_entries(name)
    with pytest.raises(shmkv.Error, match="read-only"):
        shmkv.attach(name, size="8MiB", path=read_only_dir / "db")
    assert _shm_entries(name) == before
    with pytest.raises(shmkv.Error):
        from shmkv.lsm import LSM

        LSM(read_only_dir / "db")


def test_a_read_only_dev_shm_is_a_shmkv_error():
    # a private mount namespace with a read-only tmpfs over /dev/shm: the real failure,
    # without touching the host's /dev/shm
    code = ("import shmkv\n"
            "try:\n"
            "    shmkv.attach('ro-test', size='8MiB')\n"
            "except shmkv.Error as e:\n"
            "    print('shmkv.Error:', e)\n")
    root = os.path.dirname(os.path.dirname(shmkv.__file__))
    script = f"mount -t tmpfs -o ro,size=1m tmpfs /dev/shm && cd {root} && {sys.executable} -c \"$0\""
    out = subprocess.run(["unshare", "-m", "sh", "-c", script, code], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0 and "shmkv.Error" not in out.stdout and "Traceback" not in out.stderr:
        pytest.skip(f"cannot make a private read-only /dev/shm here: {out.stderr.strip()}")
    assert "shmkv.Error:" in out.stdout and "ead-only" in out.stdout, out.stdout + out.stderr


def test_key_with_a_lone_surrogate_is_a_shmkv_error(either):
    bad = "a\udc80b"
    for call in (lambda: either.put(bad, b"v"), lambda: either.get(bad), lambda: bad in either,
                 lambda: either.delete(bad), lambda: either.get_many([bad]),
                 lambda: either.put_many({bad: b"v"}), lambda: either.delete_many([bad]),
                 lambda: either.add(bad, b"v"), lambda: either.scan(bad)):
        with pytest.raises(shmkv.InvalidArgument, match="UTF-8"):
            call()
    if either._tier is None:
        with pytest.raises(shmkv.InvalidArgument, match="UTF-8"):
            either.incr(bad)
    either.put("ok", b"v")
    assert either["ok"] == b"v"


def test_growth_factor_must_be_a_number(name):
    for bad in ("x", "1.25", None, True):
        with pytest.raises(shmkv.InvalidType, match="growth_factor"):
            shmkv.attach(name, size="8MiB", growth_factor=bad)
    assert name not in shmkv.list_stores()


@pytest.mark.parametrize("bad", [[("k", b"v", 5)], [("k",)], [None], None, 5, [b"kv"], ["kv"]])
def test_put_many_rejects_anything_but_pairs(either, bad):
    either.put("keep", b"v")
    with pytest.raises(shmkv.InvalidType, match="put_many"):
        either.put_many(bad)
    assert either.get("keep") == b"v" and "k" not in either


@pytest.mark.parametrize("bad", [[("k", b"v", 5)], [None], None])
def test_pickle_store_put_many_rejects_anything_but_pairs(name, bad):
    with shmkv.attach(name, size="8MiB", codec="pickle") as kv:
        with pytest.raises(shmkv.InvalidType, match="put_many"):
            kv.put_many(bad)
        assert len(kv) == 0


@pytest.mark.parametrize("bad", [1, 2.5, object()])
def test_scan_bounds_must_be_keys(either, bad):
    either.put("a", b"1")
    with pytest.raises(shmkv.InvalidType, match="scan"):
        either.scan(bad)
    with pytest.raises(shmkv.InvalidType, match="scan"):
        either.scan(None, bad)
    assert list(either.scan("a", "b")) == [(b"a", b"1")]


def test_max_item_larger_than_the_store_names_max_item(name):
    with pytest.raises(shmkv.InvalidArgument, match="max_item") as ei:
        shmkv.attach(name, size="8MiB", max_item="512MiB")
    assert "slab classes" not in str(ei.value) and "too small" in str(ei.value)
    # a too-fine growth factor still says so, and names the range it had to cover
    with pytest.raises(shmkv.InvalidArgument, match="growth factor .* max_item"):
        shmkv.attach(name, size="8MiB", max_item="1MiB", growth_factor=1.01)
    assert name not in shmkv.list_stores()


def test_failed_attaches_leave_nothing_in_dev_shm(name):
    before = _shm_entries(name)
    failures = [
        lambda: shmkv.attach(name, create=False),                     # StoreNotFound
        lambda: shmkv.attach(name, size="64KiB"),                     # too small
        lambda: shmkv.attach(name, size="8MiB", max_item="512MiB"),   # C layout refuses
        lambda: shmkv.attach(name, size="8MiB", durability="bogus"),
    ]
    for fail in failures:
        with pytest.raises(shmkv.Error):
            fail()
        assert _shm_entries(name) == before
    # an attach that succeeds and is removed leaves nothing either
    shmkv.attach(name, size="8MiB").close()
    shmkv.unlink(name)
    assert _shm_entries(name) == before


def test_disk_tier_failing_after_creation_removes_the_new_segment(name, tmp_path):
    # a path that passes the early checks but whose store cannot open: a corrupt MANIFEST
    db = tmp_path / "db"
    shmkv.attach(name, size="8MiB", path=db, durability="none").close()
    shmkv.unlink(name)
    for f in os.listdir(db):
        if f.startswith("MANIFEST"):
            (db / f).write_bytes(b"garbage" * 10)
    before = _shm_entries(name)
    with pytest.raises(shmkv.Error):
        shmkv.attach(name, size="8MiB", path=db, durability="none")
    assert _shm_entries(name) == before  # the segment it had created is gone again


def test_unlink_removes_a_stale_lock_file(name):
    # what a failed attach of an older shmkv left behind
    open(segment.lock_path(name), "w").close()
    with pytest.raises(shmkv.StoreNotFound):
        shmkv.unlink(name)
    assert not os.path.exists(segment.lock_path(name))


def test_name_ending_in_a_newline_is_rejected():
    with pytest.raises(shmkv.InvalidArgument):
        shmkv.attach("name\n", size="8MiB")
    assert "name\n" not in shmkv.list_stores()


@pytest.mark.parametrize("stripes", [3, 1000, 6])
def test_lock_stripes_must_be_a_power_of_two(name, stripes):
    with pytest.raises(shmkv.InvalidArgument, match="power of two"):
        shmkv.attach(name, size="8MiB", lock_stripes=stripes)
    with shmkv.attach(name, size="8MiB", lock_stripes=512) as kv:
        assert kv.stats()["lock_stripes"] == 512


@pytest.mark.parametrize("kwargs", [{"durability": "bogus"}, {"interval_ms": 0}, {"interval_ms": "5"}])
def test_tier_options_are_checked_without_a_path(name, kwargs):
    with pytest.raises(shmkv.InvalidArgument):
        shmkv.attach(name, size="8MiB", **kwargs)
    assert name not in shmkv.list_stores()


def test_delete_many_checks_every_key_first(either):
    either.put_many({"a": b"1", "b": b"2"})
    for bad in (["a", b"", "b"], ["a", b"k" * (either.max_key + 1)], ["a", 5, "b"]):
        with pytest.raises(shmkv.Error):
            either.delete_many(bad)
        assert either.get("a") == b"1" and either.get("b") == b"2"
    assert either.delete_many(["a", "b", "c"]) == 2


@pytest.mark.parametrize("key", [b"", "", "big"])
def test_bad_key_lengths_raise_on_reads_in_both_tiers(either, key):
    # one rule for both tiers: a key that can never be stored is a KeyTooLarge on every
    # operation, reads included (before: memory-only reads answered None/False silently)
    if key == "big":
        key = b"k" * (either.max_key + 1)
    for call in (lambda: either.get(key), lambda: either[key], lambda: key in either,
                 lambda: either.delete(key), lambda: either.get_many([key]),
                 lambda: either.put(key, b"v"), lambda: either.add(key, b"v")):
        with pytest.raises(shmkv.KeyTooLarge, match="1 to"):
            call()


def test_pickling_a_store_names_the_problem(kv):
    with pytest.raises(shmkv.InvalidType, match="cannot be pickled.*attach"):
        pickle.dumps(kv)


def test_repr_of_a_persistent_store_does_not_read_the_disk(name, tmp_path):
    with shmkv.attach(name, size="8MiB", path=tmp_path / "db", durability="none") as kv:
        kv.put_many({f"k{i}": b"v" for i in range(100)})
        # a repr must not touch the disk tier at all (a scan is O(n) and may raise Corruption)
        tier = kv._tier
        kv._tier = _Exploding()
        try:
            r = repr(kv)
        finally:
            kv._tier = tier
        assert name in r and "db" in r


class _Exploding:
    def __getattr__(self, attr):
        raise AssertionError(f"repr touched the disk tier ({attr})")


def test_handles_of_one_process_share_one_slot(name):
    handles = [shmkv.attach(name, size="8MiB") for _ in range(300)]  # more than the 256 slots
    try:
        assert handles[-1].stats()["processes"] == [os.getpid()]
        for h in handles[:-1]:
            h.close()
        handles[-1].put("k", b"v")
        assert handles[-1].stats()["processes"] == [os.getpid()]
        assert handles[-1].verify() == []
    finally:
        for h in handles:
            h.close()
    with shmkv.attach(name) as kv:
        assert kv.stats()["processes"] == [os.getpid()]


def _hold_slot(name, ready, stop):
    with shmkv.attach(name):
        ready.release()
        stop.wait(60)


@pytest.mark.multiprocess
def test_forked_child_past_the_slot_limit_is_told_why(name):
    kv = shmkv.attach(name, size="8MiB")
    ready, stop = CTX.Semaphore(0), CTX.Event()
    procs = [CTX.Process(target=_hold_slot, args=(name, ready, stop)) for _ in range(255)]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            assert ready.acquire(timeout=60)
        # all 256 slots taken (us + 255): a forked child has none left
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                kv.get("k")
                msg = b"no error"
            except shmkv.StoreFull as e:
                msg = str(e).encode()
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                msg = repr(e).encode()
            os.write(w, msg[:4000])
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        msg = os.read(r, 4096).decode()
        os.close(r)
        assert "slot" in msg and "256" in msg and "closed" not in msg, msg
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        kv.close()


def test_import_from_an_unbuilt_source_tree_says_what_to_do(tmp_path):
    # the situation after a plain `pip install .`, running python from the repository root:
    # the source tree (no compiled extension in it) shadows the installed package
    src = os.path.dirname(shmkv.__file__)
    shutil.copytree(src, tmp_path / "shmkv", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    out = subprocess.run([sys.executable, "-c", "import shmkv; shmkv.attach('x')"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode != 0
    assert "not built" in out.stderr and "build_ext --inplace" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "shmkv.cli", "ls"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode != 0 and "not built" in out.stderr, out.stderr


def test_a_manifest_naming_a_missing_table_names_it(tmp_path):
    from shmkv.lsm import LSM

    db = LSM(tmp_path / "db", durability="none", helper=False)
    for i in range(100):
        db.put(b"k%d" % i, b"v" * 100)
    db.flush()
    db.close()
    (table,) = [f for f in os.listdir(tmp_path / "db") if f.endswith(".sst")]
    os.unlink(tmp_path / "db" / table)
    with pytest.raises(shmkv.Corruption, match=table):
        LSM(tmp_path / "db", durability="none", helper=False)


def _attach_racer(name, create, start, out):
    start.wait(30)
    done = 0
    for _ in range(20):
        try:
            with shmkv.attach(name, size="8MiB", create=create) as kv:
                kv.incr("n")
                done += 1
        except shmkv.StoreNotFound:
            pass
    out.put(done)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_failing_attaches_racing_creators_lose_nothing(name):
    # Attaches that fail (create=False, no store yet) remove the lock file they made, while
    # creators wait on it: every creator must still serialise on the one lock, so the store
    # is created once and no increment lands in a segment someone else threw away. (Without
    # the inode check in segment._flock_current this loses an increment within a few rounds.)
    for _ in range(20):
        start, out = CTX.Event(), CTX.Queue()
        procs = [CTX.Process(target=_attach_racer, args=(name, i % 2 == 0, start, out)) for i in range(8)]
        for p in procs:
            p.start()
        start.set()
        total = sum(out.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(30)
        with shmkv.attach(name, create=False) as kv:
            assert int(kv["n"]) == total
            assert kv.verify() == []
        shmkv.unlink(name)
        assert _shm_entries(name) == set()
