"""The user-facing API of a local store, in one process."""

from __future__ import annotations

import os
import time

import pytest

import shmkv


@pytest.fixture(params=["hash", "btree"])
def kv(name, request):
    """Every test taking `kv` runs against both engines: "btree" is the hash engine plus an
    ordered index, so everything here must behave identically (README "Engines")."""
    store = shmkv.attach(name, size="16MiB", engine=request.param)
    yield store
    store.close()


def test_put_get_delete_roundtrip(kv):
    kv[b"user:42"] = b"payload"
    assert kv[b"user:42"] == b"payload"
    assert kv.get(b"user:42") == b"payload"
    del kv[b"user:42"]
    assert kv.get(b"user:42") is None
    with pytest.raises(KeyError):
        kv[b"user:42"]
    with pytest.raises(KeyError):
        del kv[b"user:42"]


def test_str_keys_are_utf8_of_the_same_bytes(kv):
    kv["clé"] = b"v"
    assert kv["clé".encode()] == b"v"
    assert "clé" in kv
    assert list(kv.keys()) == ["clé".encode()]


def test_values_may_be_any_bytes_like(kv):
    kv.put("a", bytearray(b"abc"))
    kv.put("b", memoryview(b"xyz123")[1:4])
    kv.put("empty", b"")
    assert kv["a"] == b"abc" and type(kv["a"]) is bytes
    assert kv["b"] == b"yz1"
    assert kv["empty"] == b""


def test_get_default_and_contains(kv):
    assert kv.get("missing", default=b"d") == b"d"
    assert "missing" not in kv
    kv.put("k", b"v")
    assert "k" in kv


def test_delete_reports_presence(kv):
    kv.put("k", b"v")
    assert kv.delete("k") is True
    assert kv.delete("k") is False


def test_overwrite_keeps_one_item(kv):
    for i in range(100):
        kv.put("k", str(i).encode() * (i % 7 + 1))
    assert kv["k"] == b"99" * 2
    assert len(kv) == 1
    assert kv.verify() == []


def test_len_counts_items(kv):
    for i in range(500):
        kv.put(f"k{i}", b"x" * (i % 300))
    assert len(kv) == 500
    kv.delete_many([f"k{i}" for i in range(100)])
    assert len(kv) == 400


def test_add_stores_only_when_absent(kv):
    assert kv.add("k", b"1") is True
    assert kv.add("k", b"2") is False
    assert kv["k"] == b"1"


def test_incr_counts_from_zero_and_reads_back_as_decimal(kv):
    assert kv.incr("hits") == 1
    assert kv.incr("hits", 41) == 42
    assert kv.incr("hits", -50) == -8
    assert kv["hits"] == b"-8"
    kv.put("n", b"100")
    assert kv.incr("n") == 101


def test_incr_on_a_non_number_raises_and_keeps_value(kv):
    kv.put("s", b"abc")
    with pytest.raises(shmkv.NotACounter):
        kv.incr("s")
    assert kv["s"] == b"abc"


def test_incr_overflow_raises(kv):
    kv.put("n", str(2**63 - 1).encode())
    with pytest.raises(shmkv.NotACounter):
        kv.incr("n")
    assert kv["n"] == str(2**63 - 1).encode()


def test_get_many_put_many_delete_many(kv):
    kv.put_many({f"k{i}": f"v{i}".encode() for i in range(200)})
    got = kv.get_many([f"k{i}" for i in range(0, 300, 10)])
    assert got == {f"k{i}": f"v{i}".encode() for i in range(0, 200, 10)}
    kv.put_many([("p1", b"1"), ("p2", b"2")])
    assert kv.get_many(["p1", "p2"]) == {"p1": b"1", "p2": b"2"}
    assert kv.delete_many([f"k{i}" for i in range(250)]) == 200
    assert len(kv) == 2


def test_put_many_with_bad_item_stores_nothing(kv):
    with pytest.raises(shmkv.InvalidType):
        kv.put_many({"a": b"1", "b": 2})
    with pytest.raises(shmkv.KeyTooLarge):
        kv.put_many({"a": b"1", "": b"2"})
    assert len(kv) == 0


def test_keys_and_items_scan_everything(kv):
    data = {f"key{i}".encode(): bytes([i % 256]) * (i % 50) for i in range(1000)}
    kv.put_many(data)
    assert sorted(kv.keys()) == sorted(data)
    assert dict(kv.items()) == data
    assert sorted(kv) == sorted(data)
    assert sorted(kv.values()) == sorted(data.values())


def test_clear_empties_the_store(kv):
    kv.put_many({f"k{i}": b"v" for i in range(300)})
    kv.clear()
    assert len(kv) == 0
    assert list(kv.keys()) == []
    kv.put("after", b"ok")
    assert kv["after"] == b"ok"
    assert kv.verify() == []


def test_ttl_expires_items(kv):
    kv.put("short", b"v", ttl=0.2)
    kv.put("long", b"v", ttl=60)
    kv.put("forever", b"v")
    assert kv["short"] == b"v"
    time.sleep(0.35)
    assert kv.get("short") is None
    assert "short" not in kv
    assert kv["long"] == b"v" and kv["forever"] == b"v"
    assert sorted(kv.keys()) == [b"forever", b"long"]
    assert kv.stats()["expired"] >= 1


def test_ttl_never_expires_early(kv):
    kv.put("k", b"v", ttl=1)
    time.sleep(0.9)
    assert kv.get("k") == b"v"


def test_add_succeeds_over_an_expired_item(kv):
    kv.put("k", b"old", ttl=0.1)
    time.sleep(0.2)
    assert kv.add("k", b"new") is True
    assert kv["k"] == b"new"


def test_context_manager_closes(name):
    with shmkv.attach(name, size="8MiB") as kv:
        kv.put("k", b"v")
    assert kv.closed
    with shmkv.attach(name) as again:
        assert again["k"] == b"v"


def test_data_outlives_a_handle(name):
    a = shmkv.attach(name, size="8MiB")
    a.put("k", b"v")
    a.close()
    b = shmkv.attach(name, size="8MiB")
    assert b["k"] == b"v"
    b.close()


def test_two_handles_in_one_process_share_data(name):
    a = shmkv.attach(name, size="8MiB")
    b = shmkv.attach(name)
    a.put("k", b"v")
    assert b["k"] == b"v"
    # the handles of one process share its one slot (segment.c: proc_slots)
    assert b.stats()["processes"].count(os.getpid()) == 1
    a.close()
    # closing one handle keeps the slot, and its liveness lock, for the other
    assert b.stats()["processes"].count(os.getpid()) == 1
    b.put("k2", b"v2")
    assert b["k2"] == b"v2"
    b.close()


def test_unlink_and_list_stores(name):
    kv = shmkv.attach(name, size="8MiB")
    assert name in shmkv.list_stores()
    kv.close()
    shmkv.unlink(name)
    assert name not in shmkv.list_stores()
    with pytest.raises(shmkv.StoreNotFound):
        shmkv.unlink(name)
    with pytest.raises(shmkv.StoreNotFound):
        shmkv.attach(name, create=False)


def test_stats_report_counters_and_geometry(kv):
    kv.put("a", b"1")
    kv.get("a")
    kv.get("b")
    s = kv.stats()
    assert s["puts"] == 1 and s["gets"] == 2 and s["hits"] == 1 and s["misses"] == 1
    assert s["items"] == 1
    assert s["segment_bytes"] == 16 * 1024 * 1024
    assert s["hit_ratio"] == 0.5
    assert s["processes"] and s["classes"]
    # no other process: nothing ever had to wait for a lock
    assert s["lock_waits"] == 0
    assert s["lock_wait"] == {
        kind: {"waits": 0, "longest_ms": 0.0} for kind in ("stripe", "class", "page", "registry")
    }


def test_pickle_codec_stores_objects(name):
    with shmkv.attach(name, size="8MiB", codec="pickle") as kv:
        kv["obj"] = {"a": [1, 2, 3], "b": ("x", 2.5)}
        kv.put("n", 7, ttl=30)
        assert kv["obj"] == {"a": [1, 2, 3], "b": ("x", 2.5)}
        assert kv.get("n") == 7
        assert kv.get("missing", 5) == 5
        kv.put_many({"x": [1], "y": None})
        assert kv.get_many(["x", "y"]) == {"x": [1], "y": None}
        assert dict(kv.items())[b"x"] == [1]
    # codec=None takes the store's codec
    with shmkv.attach(name) as again:
        assert again.codec == "pickle"
        assert again["n"] == 7


def test_unpicklable_value_raises_codec_error(name):
    with shmkv.attach(name, size="8MiB", codec="pickle") as kv:
        with pytest.raises(shmkv.CodecError):
            kv.put("f", lambda: 1)
        kv.put("ok", 1)
        assert kv["ok"] == 1


def test_big_values_up_to_the_item_limit(name):
    with shmkv.attach(name, size="32MiB") as kv:
        limit = kv.max_item - 36 - 3
        big = bytes(range(256)) * (limit // 256) + b"x" * (limit % 256)
        kv.put("big", big)
        assert kv["big"] == big
        assert kv.verify() == []
