"""Memory as the hot tier of a persistent store: attach(..., path=, durability=)."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time

import pytest
from checked_values import make_value

import shmkv
from shmkv.torture import soak

CTX = mp.get_context("fork")


@pytest.fixture
def tiered(name, tmp_path):
    # "none": functional tests don't need an fsync per put (the durability test below does)
    kv = shmkv.attach(name, size="4MiB", path=tmp_path / "db", durability="none")
    yield kv
    kv.close()


def test_evicted_items_are_read_back_from_disk(tiered):
    for i in range(30_000):
        tiered.put(f"k{i}", make_value(0, i, 100))
    s = tiered.stats()
    assert s["evictions"] > 0  # memory (4 MiB) could not hold them all
    for i in range(0, 30_000, 7):
        assert tiered.get(f"k{i}") == make_value(0, i, 100)
    assert tiered.stats()["disk"]["entries_on_disk"] + tiered.stats()["disk"]["memtable_entries"] > 0


def test_a_miss_promotes_the_item_into_memory(tiered):
    for i in range(30_000):
        tiered.put(f"k{i}", b"v" * 100)
    assert tiered.get("k0") == b"v" * 100  # evicted long ago, read through
    hits_before = tiered.stats()["hits"]
    assert tiered.get("k0") == b"v" * 100  # now served from memory
    assert tiered.stats()["hits"] == hits_before + 1


def test_values_larger_than_memory_items_go_to_disk(tiered):
    for size in (1 << 20, 8 << 20, 64 << 20):
        big = os.urandom(1024) * (size // 1024)
        tiered.put(f"big{size}", big)
        assert tiered.get(f"big{size}") == big
    tiered.put("big1048576", b"small now")
    assert tiered["big1048576"] == b"small now"


def test_deletes_of_disk_only_keys_leave_tombstones(tiered, name, tmp_path):
    for i in range(30_000):
        tiered.put(f"k{i}", b"v" * 100)
    assert tiered.delete("k1") is True
    assert tiered.get("k1") is None
    assert tiered.delete("k1") is False
    assert "k1" not in tiered
    tiered.close()
    shmkv.unlink(name)
    with shmkv.attach(name, size="4MiB", path=tmp_path / "db") as kv:
        assert kv.get("k1") is None
        assert kv.get("k2") == b"v" * 100


def test_add_and_incr_see_disk_only_values(tiered):
    tiered.put("counter", b"41")
    tiered.put("present", b"x")
    for i in range(30_000):
        tiered.put(f"fill{i}", b"v" * 100)
    assert tiered.add("present", b"y") is False
    assert tiered["present"] == b"x"
    assert tiered.add("absent", b"z") is True
    assert tiered.incr("counter") == 42
    assert tiered.incr("fresh", 5) == 5
    tiered.put("text", b"abc")
    with pytest.raises(shmkv.NotACounter):
        tiered.incr("text")
    assert tiered["text"] == b"abc"


def test_incr_counts_by_the_same_rule_in_both_tiers(tiered, name):
    # One rule (shmkv_counter_add): the disk tier's incr must accept and refuse exactly what
    # the memory tier's does, with the same error.
    mem = shmkv.attach(f"{name}_mem", size="8MiB")
    try:
        for stored, delta in [(b"+7", 1), (b"-0", -1), (b"9" * 20, 1), (b"", 1), (b"1 ", 1),
                              (str(2**63 - 1).encode(), 1), (str(-(2**63)).encode(), -1),
                              (b"0" * 64 + b"1", 1), (b"0" * 63 + b"1", 1)]:
            outcomes = []
            for kv in (mem, tiered):
                kv.put("c", stored)
                try:
                    outcomes.append(kv.incr("c", delta))
                except shmkv.NotACounter as e:
                    outcomes.append(str(e))
                    assert kv["c"] == stored
            assert outcomes[0] == outcomes[1], (stored, outcomes)
    finally:
        mem.close()
        shmkv.unlink(f"{name}_mem")


def test_scan_is_ordered_over_disk_and_memory(tiered):
    keys = [f"key{i:05d}".encode() for i in range(3000)]
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    for k in shuffled:
        tiered.put(k, k[::-1])
    tiered.delete(b"key00010")
    got = list(tiered.scan(b"key00005", b"key00020"))
    assert [k for k, _ in got] == [k for k in keys[5:20] if k != b"key00010"]
    assert all(v == k[::-1] for k, v in got)
    assert len(tiered) == 2999
    assert [k for k, _ in tiered.scan()] == [k for k in keys if k != b"key00010"]


def test_ttl_applies_on_disk_too(tiered):
    tiered.put("t", b"v", ttl=0.2)
    for i in range(30_000):
        tiered.put(f"fill{i}", b"v" * 100)
    time.sleep(0.3)
    assert tiered.get("t") is None


def test_two_processes_share_one_persistent_store(name, tmp_path):
    path = tmp_path / "db"
    kv = shmkv.attach(name, size="8MiB", path=path)

    def child():
        other = shmkv.attach(name, size="8MiB", path=path)
        other.put("from-child", b"1")
        assert other.get("from-parent") == b"0"
        other.close()
        os._exit(0)

    kv.put("from-parent", b"0")
    p = CTX.Process(target=child)
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert kv.get("from-child") == b"1"
    kv.close()


@pytest.mark.slow
def test_fsync_mode_survives_sigkill_of_everyone_and_loss_of_the_segment(name, tmp_path):
    # shmkv.torture.soak (tools/soak.py): 3 fsync writers SIGKILLed at a random moment in each
    # of 6 rounds, the segment unlinked every second round; then the store from its directory
    # alone is held to the writers' logs
    got = soak.run(name, tmp_path / "db", writers=3, rounds=6, seed=7)
    assert got.problems == []
    assert not got.lost, f"acknowledged writes lost: {got.lost[:5]}"
    assert not got.wrong, got.wrong[:5]
    assert got.acknowledged > 100 and got.kills == 18


def test_the_soak_checker_catches_a_lost_write_and_a_stale_value(name, tmp_path):
    # the checker is trusted once it is seen catching what it exists to catch
    path = tmp_path / "db"
    logs = [tmp_path / "acks0"]
    logs[0].write_text("try-put w0-1 1\nput w0-1 1\ntry-put w0-2 2\nput w0-2 2\n"
                       "try-put w0-2 3\nput w0-2 3\ntry-put w0-3 4\nput w0-3 4\ntry-del w0-3 5\n")
    with shmkv.attach(name, size="4MiB", path=path, durability="fsync") as kv:
        kv.put("w0-2", soak.make_value(0, 2, 50))  # acknowledged 3, holds 2: stale
        kv.put("w0-3", soak.make_value(0, 4, 50))  # a later delete was only attempted: fine
        # w0-1: acknowledged, never written: lost
    shmkv.unlink(name)
    got = soak.check(name, path, logs)
    assert got.lost == ["w0-1"]
    assert len(got.wrong) == 1 and got.wrong[0].startswith("w0-2:")
    assert not got.ok and got.acknowledged == 3


def test_snapshot_dump_and_restore_warm_a_new_store(name, tmp_path):
    snap = tmp_path / "snap.bin"
    with shmkv.attach(name, size="8MiB") as kv:
        kv.put_many({f"k{i}": make_value(0, i, 200) for i in range(2000)})
        kv.put("short", b"x", ttl=0.2)
        kv.put("long", b"y", ttl=600)
        assert kv.dump(snap) == 2002
    shmkv.unlink(name)
    time.sleep(0.3)
    with shmkv.restore(snap, name, size="8MiB") as kv:
        assert len(kv) == 2001  # "short" expired while the store was down
        assert kv["k1999"] == make_value(0, 1999, 200)
        assert kv["long"] == b"y"


def test_damaged_snapshot_is_an_error_not_a_partial_restore(name, tmp_path):
    snap = tmp_path / "snap.bin"
    with shmkv.attach(name, size="8MiB") as kv:
        kv.put_many({f"k{i}": b"v" * 100 for i in range(500)})
        kv.dump(snap)
        data = snap.read_bytes()
        snap.write_bytes(data[: len(data) // 2])
        kv.clear()
        with pytest.raises(shmkv.Corruption, match="snap.bin"):
            kv.load(snap)
        snap.write_bytes(b"garbage" * 10)
        with pytest.raises(shmkv.Corruption):
            kv.load(snap)
        assert len(kv) == 0


def test_pickle_codec_over_a_disk_tier(name, tmp_path):
    with shmkv.attach(name, size="8MiB", codec="pickle", path=tmp_path / "db", durability="none") as kv:
        kv["a"] = {"x": 1}
        kv.put("b", [1, 2])
        assert dict(kv.items()) == {b"a": {"x": 1}, b"b": [1, 2]}
        assert list(kv.scan("a", "b")) == [(b"a", {"x": 1})]
    shmkv.unlink(name)
    with shmkv.attach(name, size="8MiB", codec="pickle", path=tmp_path / "db") as kv:
        assert kv["b"] == [1, 2]


def test_bad_durability_is_rejected(name, tmp_path):
    with pytest.raises(shmkv.InvalidArgument):
        shmkv.attach(name, size="8MiB", path=tmp_path / "db", durability="sometimes")


def test_forked_child_reopens_the_disk_tier(name, tmp_path):
    kv = shmkv.attach(name, size="8MiB", path=tmp_path / "db", durability="none")
    kv.put("p", b"parent")

    def child():
        kv.put("c", b"child")  # the inherited handle: memory re-registered, LSM reopened
        assert kv.get("p") == b"parent"
        kv.close()
        os._exit(0)

    p = CTX.Process(target=child)
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert kv.get("c") == b"child"
    kv.close()
    shmkv.unlink(name)
    with shmkv.attach(name, size="8MiB", path=tmp_path / "db") as again:
        assert again.get("c") == b"child"


def test_put_many_goes_to_disk_in_one_batch(name, tmp_path):
    with shmkv.attach(name, size="8MiB", path=tmp_path / "db", durability="fsync") as kv:
        kv.put("a", b"old")
        assert kv["a"] == b"old"  # in memory
        syncs = kv.stats()["disk"]["wal_syncs"]
        kv.put_many({"a": b"new", **{f"k{i}": b"v" for i in range(200)}})
        assert kv.stats()["disk"]["wal_syncs"] - syncs <= 2
        assert kv["a"] == b"new"
        assert kv.get_many(["k0", "k199"]) == {"k0": b"v", "k199": b"v"}
    shmkv.unlink(name)
    with shmkv.attach(name, size="8MiB", path=tmp_path / "db") as kv:
        assert kv["a"] == b"new" and kv["k150"] == b"v"


def test_delete_many_and_clear_write_one_batch_not_an_fsync_per_key(name, tmp_path):
    with shmkv.attach(name, size="8MiB", path=tmp_path / "db", durability="fsync") as kv:
        kv.put_many({f"k{i}": b"v%d" % i for i in range(2500)})
        for i in range(0, 2500, 5):
            assert kv[f"k{i}"] == b"v%d" % i  # some in memory too: both tiers must forget
        syncs = kv.stats()["disk"]["wal_syncs"]
        assert kv.delete_many([f"k{i}" for i in range(1000)] + ["k0", "never-there"]) == 1000
        assert kv.stats()["disk"]["wal_syncs"] - syncs == 1
        assert all(kv.get(f"k{i}") is None for i in range(1000))
        assert kv.get("k1000") == b"v1000"
        syncs = kv.stats()["disk"]["wal_syncs"]
        kv.clear()
        assert kv.stats()["disk"]["wal_syncs"] - syncs == 1  # 1,500 keys, one batch
        assert len(kv) == 0 and kv.get("k2499") is None and kv.verify() == []
    shmkv.unlink(name)  # memory gone: what disk says is all there is
    with shmkv.attach(name, size="8MiB", path=tmp_path / "db") as kv:
        assert len(kv) == 0 and kv.get("k5") is None and kv.get("k2000") is None


def test_delete_many_checks_every_key_before_removing_any(name, tmp_path):
    with shmkv.attach(name, size="8MiB", path=tmp_path / "db", durability="none") as kv:
        kv.put("a", b"1")
        with pytest.raises(shmkv.InvalidType):
            kv.delete_many(["a", 42])
        assert kv["a"] == b"1"


def test_attach_takes_the_wal_recovery_the_error_message_names(name, tmp_path):
    from shmkv.lsm import format as fmt

    db = tmp_path / "db"
    with shmkv.attach(name, size="8MiB", path=db, durability="fsync") as kv:
        for i in range(10):
            kv.put(f"k{i}", b"v%d" % i)
    shmkv.unlink(name)
    wal = db / fmt.wal_name(1)
    data = bytearray(wal.read_bytes())
    data[-1] ^= 0x01  # the last, complete, fsync-acknowledged record
    wal.write_bytes(bytes(data))
    with pytest.raises(shmkv.Corruption, match="wal_recovery='skip'") as e:
        shmkv.attach(name, size="8MiB", path=db)
    assert "bad record checksum" in str(e.value)
    with pytest.raises(shmkv.InvalidArgument):
        shmkv.attach(name, size="8MiB", path=db, wal_recovery="bogus")
    with shmkv.attach(name, size="8MiB", path=db, wal_recovery="skip") as kv:
        assert [kv.get(f"k{i}") for i in range(10)] == [b"v%d" % i for i in range(9)] + [None]
        problems = kv.verify()
        assert len(problems) == 1 and "lost/" in problems[0]
