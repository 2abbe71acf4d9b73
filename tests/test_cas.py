"""Store.cas: compare-and-swap under the key's stripe lock (memory, and through the disk tier).

The cluster's --workers K merge a key's version set with a read -> merge -> cas loop; these tests
pin the primitive itself: its answers against a dict model, and that concurrent read-modify-write
loops in several processes lose no update.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import shmkv

CTX = mp.get_context("fork")


def test_cas_stores_only_over_the_expected_value(kv: shmkv.Store) -> None:
    assert kv.cas(b"k", None, b"1") is True  # absent -> stored
    assert kv.cas(b"k", None, b"2") is False  # present: "absent" does not match
    assert kv.cas(b"k", b"0", b"2") is False  # another value
    assert kv[b"k"] == b"1"
    assert kv.cas(b"k", b"1", b"2") is True
    assert kv.cas("k", bytearray(b"2"), memoryview(b"3")) is True  # str keys, buffers
    assert kv[b"k"] == b"3"
    assert kv.cas(b"k", b"3", b"") is True and kv[b"k"] == b""  # an empty value is a value
    assert kv.cas(b"k", None, b"x") is False


def test_cas_treats_an_expired_key_as_absent(kv: shmkv.Store) -> None:
    kv.put(b"t", b"old", ttl=0.001)
    import time

    time.sleep(0.01)
    assert kv.cas(b"t", b"old", b"new") is False
    assert kv.cas(b"t", None, b"new", ttl=60) is True
    assert kv[b"t"] == b"new"


def test_cas_refuses_bad_input_and_changes_nothing(kv: shmkv.Store) -> None:
    kv.put(b"k", b"v")
    with pytest.raises(shmkv.InvalidType):
        kv.cas(b"k", "v", b"w")  # a str value
    with pytest.raises(shmkv.InvalidType):
        kv.cas(b"k", b"v", 5)
    with pytest.raises(shmkv.KeyTooLarge):
        kv.cas(b"x" * (kv.max_key + 1), None, b"w")
    with pytest.raises(shmkv.ValueTooLarge):
        kv.cas(b"k", b"v", b"x" * kv.max_item)
    assert kv[b"k"] == b"v"


def test_cas_is_refused_by_a_pickle_store(name: str) -> None:
    with shmkv.attach(name, size="8MiB", codec="pickle") as kv:
        with pytest.raises(shmkv.InvalidArgument, match="raw store"):
            kv.cas(b"k", None, 1)


def test_cas_with_a_disk_tier_compares_with_disk_and_holds_values_too_big_for_memory(
    name: str, tmp_path: Path
) -> None:
    with shmkv.attach(name, size="8MiB", path=tmp_path / "d", durability="none") as kv:
        big = b"b" * (kv.max_item * 2)  # lives on disk only
        assert kv.cas(b"k", None, big) is True
        assert kv[b"k"] == big
        assert kv.cas(b"k", b"other", b"x") is False
        assert kv.cas(b"k", big, big + b"!") is True
        assert kv.cas(b"k", big + b"!", b"small") is True
        assert kv[b"k"] == b"small"
    shmkv.unlink(name)
    # the segment is gone: the value comes back from disk, and cas compares against it
    with shmkv.attach(name, size="8MiB", path=tmp_path / "d") as kv:
        assert kv.cas(b"k", None, b"x") is False
        assert kv.cas(b"k", b"small", b"after") is True
        assert kv[b"k"] == b"after"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(
    st.sampled_from([b"a", b"b", b"c"]),
    st.one_of(st.none(), st.sampled_from([b"", b"1", b"2", b"x" * 300])),
    st.sampled_from([b"", b"1", b"2", b"x" * 300]),
    st.booleans(),  # True: a plain put instead of a cas
), max_size=40))
def test_cas_matches_a_dict_model(kv: shmkv.Store, ops: list[tuple[bytes, bytes | None, bytes, bool]]) -> None:
    kv.clear()
    model: dict[bytes, bytes] = {}
    for key, expected, new, plain in ops:
        if plain:
            kv.put(key, new)
            model[key] = new
            continue
        want = model.get(key) == expected if expected is not None else key not in model
        assert kv.cas(key, expected, new) is want
        if want:
            model[key] = new
        assert kv.get(key) == model.get(key)
    assert dict(kv.items()) == model


def _cas_increments(name: str, path: str | None, key: bytes, count: int, q: mp.Queue[int]) -> None:
    kv = shmkv.attach(name, path=path) if path else shmkv.attach(name)
    retries = 0
    for _ in range(count):
        while True:  # the read-modify-write the cluster's replica does, on a decimal counter
            old = kv.get(key)
            new = str(int(old or b"0") + 1).encode()
            if kv.cas(key, old, new):
                break
            retries += 1
    kv.close()
    q.put(retries)


@pytest.mark.multiprocess
@pytest.mark.parametrize("tiered", [False, True], ids=["memory", "disk-tier"])
def test_concurrent_read_modify_write_loops_in_four_processes_lose_no_update(
    name: str, tmp_path: Path, tiered: bool
) -> None:
    path = str(tmp_path / "d") if tiered else None
    count = 300 if tiered else 3000
    setup = shmkv.attach(name, size="16MiB", path=path, durability="none") if tiered else shmkv.attach(name, size="16MiB")
    q: mp.Queue[int] = CTX.Queue()
    procs = [CTX.Process(target=_cas_increments, args=(name, path, b"n", count, q)) for _ in range(4)]
    for p in procs:
        p.start()
    [q.get(timeout=120) for _ in procs]  # each process's retries (contention), not asserted
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert setup[b"n"] == str(4 * count).encode()  # every increment counted once
    assert setup.verify() == []
    setup.close()
