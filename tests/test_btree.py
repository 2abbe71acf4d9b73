"""The btree engine: an ordered index over the hash table's items (ext/core/btree.c).

- a model test against sortedcontainers.SortedDict: puts, deletes, TTLs, scans (bounds,
  prefix, reverse, limit), first/last/floor/ceiling;
- scans concurrent with writers in other processes: every key live during the whole scan is
  returned exactly once, in order;
- SIGKILL inside a split, a merge and a root growth (named crash points): the next locker
  rebuilds the index, verify() is clean and a full ordered scan equals the acknowledged writes;
- eviction, the disk tier under it, engine selection and bad input.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import random
import signal
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sortedcontainers import SortedDict

import shmkv

CTX = mp.get_context("fork")


@pytest.fixture
def bt(name):
    store = shmkv.attach(name, size="16MiB", engine="btree")
    yield store
    store.close()


def keys_of(pairs):
    return [k for k, _ in pairs]


def scan_until(kv, seconds: float) -> int:
    """Full scans, forward and reverse in turn, for ``seconds``; each must hold every key once,
    in order. Returns how many ran."""
    scans = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = keys_of(kv.scan(reverse=scans % 2 == 1))
        if scans % 2:
            got.reverse()
        assert all(a < b for a, b in zip(got, got[1:], strict=False)), "out of order or repeated"
        scans += 1
    return scans


def model_range(model, lo, hi, reverse=False, limit=None):
    ks = list(model.irange(lo, hi, inclusive=(True, False)))
    if reverse:
        ks.reverse()
    return [(k, model[k]) for k in ks[:limit]]


# -- the model test ---------------------------------------------------------------------

# Short keys over a small alphabet: many shared prefixes (8-byte prefix ties compare the
# full key in the item), keys shorter and longer than the 8-byte prefix, and b"\0" bytes.
KEYS = st.binary(min_size=1, max_size=12).map(lambda b: bytes(x % 4 + 0x61 if x > 3 else x for x in b))
BOUND = st.one_of(st.none(), KEYS)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), KEYS, st.binary(max_size=40)),
        st.tuples(st.just("put_many"), st.lists(KEYS, min_size=1, max_size=80)),
        st.tuples(st.just("del"), KEYS),
        st.tuples(st.just("del_prefix"), KEYS),
        st.tuples(st.just("expire"), KEYS),
        st.tuples(st.just("ttl_long"), KEYS),
        st.tuples(st.just("scan"), BOUND, BOUND, st.booleans(), st.one_of(st.none(), st.integers(1, 70))),
        st.tuples(st.just("prefix"), KEYS, st.booleans()),
        st.tuples(st.just("near"), KEYS),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_btree_matches_a_sorted_dict_model(bt, ops):
    bt.clear()
    model: SortedDict = SortedDict()
    for op in ops:
        kind = op[0]
        if kind == "put":
            bt[op[1]] = op[2]
            model[op[1]] = op[2]
        elif kind == "put_many":
            batch = {k: k * 3 for k in op[1]}
            bt.put_many(batch)
            model.update(batch)
        elif kind == "del":
            assert bt.delete(op[1]) == (op[1] in model)
            model.pop(op[1], None)
        elif kind == "del_prefix":  # many deletes in a row: merges, root shrinks
            for k in [k for k in model if k.startswith(op[1][:1])]:
                del bt[k]
                del model[k]
        elif kind == "expire":
            bt.put(op[1], b"short", ttl=0.001)
            time.sleep(0.002)  # expired now: a miss everywhere, and still in the index until removed
            model.pop(op[1], None)
        elif kind == "ttl_long":
            bt.put(op[1], b"long", ttl=1000)
            model[op[1]] = b"long"
        else:
            if kind == "scan":
                _, lo, hi, rev, limit = op
                if lo is not None and hi is not None and lo > hi:
                    lo, hi = hi, lo
                got = list(bt.scan(lo, hi, reverse=rev, limit=limit))
                assert got == model_range(model, lo, hi, rev, limit)
            elif kind == "prefix":
                p, rev = op[1], op[2]
                want = [(k, model[k]) for k in model.irange(p) if k.startswith(p)]
                assert list(bt.scan(prefix=p, reverse=rev)) == (want[::-1] if rev else want)
            else:
                k = op[1]
                i = model.bisect_left(k)
                ceil = model.peekitem(i) if i < len(model) else None
                j = model.bisect_right(k)
                floor = model.peekitem(j - 1) if j > 0 else None
                assert bt.ceiling(k) == ceil
                assert bt.floor(k) == floor
                assert bt.first() == (model.peekitem(0) if model else None)
                assert bt.last() == (model.peekitem(-1) if model else None)
    assert list(bt.scan()) == list(model.items())
    assert list(bt.scan(reverse=True)) == list(reversed(model.items()))
    assert bt.verify() == []


def test_large_random_workload_splits_merges_and_shrinks(bt):
    rng = random.Random(7)
    model: SortedDict = SortedDict()
    for _ in range(30_000):
        k = b"user:%06d" % rng.randrange(20_000)
        if rng.random() < 0.6:
            bt[k] = k[-3:]
            model[k] = k[-3:]
        else:
            bt.delete(k)
            model.pop(k, None)
    assert bt.stats()["btree"]["height"] >= 2
    assert list(bt.scan()) == list(model.items())
    assert bt.verify() == []
    for k in list(model):
        del bt[k]
    assert bt.stats()["btree"]["height"] == 1 and bt.stats()["btree"]["keys"] == 0
    assert list(bt.scan()) == [] and bt.first() is None and bt.last() is None
    assert bt.verify() == []


def test_batches_resume_after_the_last_key(bt):
    for i in range(5000):
        bt[b"k%05d" % i] = b"v"
    st = bt.stats()["btree"]  # ascending keys: the last leaf splits 38/5, not in halves
    assert (st["nodes"] - st["nodes_free"]) * st["node_bytes"] / st["keys"] < 32
    assert keys_of(bt.scan(b"k00100", b"k04000")) == [b"k%05d" % i for i in range(100, 4000)]
    assert keys_of(bt.scan(b"k00100", b"k04000", reverse=True, limit=1500)) == [
        b"k%05d" % i for i in range(3999, 2499, -1)]
    assert keys_of(bt.scan(prefix=b"k012")) == [b"k%05d" % i for i in range(1200, 1300)]
    assert keys_of(bt.scan(b"k04990", limit=1 << 70)) == [b"k%05d" % i for i in range(4990, 5000)]
    it = bt.scan()
    assert next(it) == (b"k00000", b"v")  # lazy: nothing else read yet


def test_pairs_refilled_in_place_never_change_what_a_consumer_kept(bt):
    # A scan rewrites a (key, value) tuple and its bytes once only it holds them (the consumer
    # dropped them): whatever the consumer kept -- a tuple, a key, a value, a view, a hash --
    # must stay what it was, and every pair read must be the right one with the right hash.
    want = [(b"p%05d" % i, b"%07d" % (i * 7)) for i in range(2500)]  # same lengths: refillable
    want += [(b"q", b"v"), (b"r" * 40, b""), (b"s%d" % 5, b"x" * 300)]  # odd sizes after them
    bt.put_many(want)
    hashes = [hash(k) for k, _ in want]
    tuples, keys, values, views = [], [], [], []
    for i, pair in enumerate(bt.scan()):
        assert pair == want[i]
        assert hash(pair[0]) == hashes[i]  # caches the key's hash: a refill must reset it
        if i % 7 == 0:
            tuples.append(pair)
        elif i % 7 == 1:
            keys.append(pair[0])
        elif i % 7 == 2:
            values.append(pair[1])
        elif i % 7 == 3:
            views.append(memoryview(pair[1]))
    assert tuples == want[::7] and keys == [k for k, _ in want[1::7]]
    assert not gc.is_tracked(tuples[0])  # two bytes make no cycle: the collector skips them
    assert values == [v for _, v in want[2::7]] and [bytes(m) for m in views] == [v for _, v in want[3::7]]
    for k, v in bt.scan(reverse=True):  # unpacked at once: the tuple is free, its bytes are not
        assert bt[k] == v
    assert list(bt.scan(b"p00100", limit=50)) == want[100:150]


def test_big_values_are_read_in_batches_under_a_byte_budget(name):
    # 300 values of 20 KB: ~6 MB, far over one batch's 256 KiB (the batch stops early and the
    # next resumes after its last key), in both directions and with a limit across batches
    with shmkv.attach(name, size="32MiB", engine="btree", max_item="64KiB") as kv:
        want = [(b"b%04d" % i, bytes([i % 251]) * 20_000) for i in range(300)]
        kv.put_many(want)
        assert list(kv.scan()) == want
        assert list(kv.scan(reverse=True)) == want[::-1]
        assert list(kv.scan(b"b0010", limit=250)) == want[10:260]


def test_expired_runs_are_skipped_across_batches(bt):
    for i in range(3000):
        bt.put(b"x%05d" % i, b"v", ttl=0.001 if 100 <= i < 2900 else None)
    time.sleep(0.01)
    live = [b"x%05d" % i for i in range(3000) if not 100 <= i < 2900]
    assert keys_of(bt.scan()) == live
    assert keys_of(bt.scan(b"x00050", limit=60)) == live[50:110]
    assert bt.ceiling(b"x00100") == (b"x02900", b"v") and bt.floor(b"x02899") == (b"x00099", b"v")


def test_scans_interleave_and_a_closed_store_stops_them(name):
    kv = shmkv.attach(name, size="16MiB", engine="btree")
    for i in range(3000):
        kv[b"k%05d" % i] = b"%d" % i
    a, b = kv.scan(), kv.scan(reverse=True)  # two at once: each has its own batch buffer
    got_a, got_b = [], []
    for _ in range(2500):
        got_a.append(next(a)[0])
        got_b.append(next(b)[0])
    assert got_a == [b"k%05d" % i for i in range(2500)]
    assert got_b == [b"k%05d" % i for i in range(2999, 499, -1)]
    c = kv.scan()
    next(c)
    kv.close()
    with pytest.raises(shmkv.StoreClosed):
        list(c)  # its batch is copied out, but the next one needs the store
    with pytest.raises(shmkv.StoreClosed):
        kv.scan()


def test_engine_is_recorded_and_reported(name):
    with shmkv.attach(name, size="16MiB", engine="btree") as kv:
        assert kv.engine == "btree" and kv.stats()["engine"] == "btree"
    with shmkv.attach(name) as kv:  # engine=None takes the store's
        assert kv.engine == "btree"
        kv[b"a"] = b"1"
        assert kv.first() == (b"a", b"1")


def test_engine_mismatch_names_both(name):
    shmkv.attach(name, size="16MiB", engine="btree").close()
    with pytest.raises(shmkv.EngineMismatch, match="'btree'.*'hash'") as e:
        shmkv.attach(name, engine="hash")
    assert isinstance(e.value, shmkv.SegmentMismatch) and isinstance(e.value, shmkv.Error)


def test_unknown_engine_is_refused(name):
    with pytest.raises(shmkv.InvalidArgument, match="engine must be one of .*'hash'.*'btree'.*'lsm'"):
        shmkv.attach(name, size="16MiB", engine="lsm")
    assert name not in shmkv.list_stores()


@pytest.mark.parametrize("engine", ["hash", "btree"])
def test_bad_scan_input_raises_clear_errors(name, engine):
    with shmkv.attach(name, size="16MiB", engine=engine) as kv:
        with pytest.raises(shmkv.InvalidArgument, match="greater than stop"):
            kv.scan(b"b", b"a")
        with pytest.raises(shmkv.InvalidType, match="scan start must be bytes"):
            kv.scan(5, b"a")
        with pytest.raises(shmkv.InvalidType, match="scan stop must be bytes"):
            kv.scan(None, 3.5)
        with pytest.raises(shmkv.InvalidArgument, match="limit must be > 0"):
            kv.scan(limit=0)
        with pytest.raises(shmkv.InvalidArgument, match="limit must be > 0"):
            kv.scan(limit=-3)
        with pytest.raises(shmkv.InvalidType, match="limit must be an int"):
            kv.scan(limit=1.5)
        with pytest.raises(shmkv.InvalidArgument, match="either prefix"):
            kv.scan(b"a", prefix=b"x")
        with pytest.raises(shmkv.InvalidType):
            kv.floor(None)
        with pytest.raises(TypeError):  # the built-in class catches it too
            kv.ceiling(7)
        assert list(kv.scan(b"a", b"a")) == []  # start == stop: empty, not an error


def test_hash_engine_answers_ordered_queries_by_sorting(kv):
    for k in (b"b", b"a", b"c"):
        kv[k] = k
    assert keys_of(kv.scan(reverse=True, limit=2)) == [b"c", b"b"]
    assert kv.floor(b"bb") == (b"b", b"b") and kv.ceiling(b"bb") == (b"c", b"c")


def test_pickle_codec_scans_decode(name):
    with shmkv.attach(name, size="16MiB", engine="btree", codec="pickle") as kv:
        kv["x"] = {"a": 1}
        kv["y"] = [2]
        assert list(kv.scan()) == [(b"x", {"a": 1}), (b"y", [2])]
        assert kv.last() == (b"y", [2])


def test_eviction_removes_keys_from_the_index(name):
    with shmkv.attach(name, size="4MiB", engine="btree") as kv:
        for i in range(40_000):
            kv[b"e%06d" % i] = b"x" * 200
        assert kv.stats()["evictions"] > 0
        scanned = keys_of(kv.scan())
        assert scanned == sorted(scanned)
        present = [b"e%06d" % i for i in range(40_000) if kv.get(b"e%06d" % i) is not None]
        assert scanned == present
        assert kv.verify() == []


def test_a_full_node_region_takes_slab_pages_instead_of_refusing_puts(name):
    # 1 MiB, 64 KiB pages: the node region (63 nodes) holds ~1,500 keys; 100,000 small keys
    # need many times that. Nodes come from unassigned pages first, then from pages emptied
    # by eviction (a full store evicts, as for items): no put is refused.
    with shmkv.attach(name, size="1MiB", engine="btree", max_item="64KiB") as kv:
        region = kv.stats()["btree"]["nodes"]
        for i in range(100_000):
            kv[b"f%06d" % i] = b""
        bt = kv.stats()["btree"]
        assert bt["node_pages"] >= 2 and bt["nodes"] == region + bt["node_pages"] * 64
        assert kv.stats()["evictions"] > 0
        present = [b"f%06d" % i for i in range(100_000) if kv.get(b"f%06d" % i) is not None]
        assert len(present) > 5 * region
        assert keys_of(kv.scan()) == present == keys_of(kv.scan(reverse=True))[::-1]
        assert bt["keys"] == len(kv) == len(present)
        kv[present[0]] = b"overwritten"  # another class: it may take (evict) a page too
        del kv[present[1]]
        assert kv.first() == (present[0], b"overwritten")
        assert keys_of(kv.scan()) == [k for k in present if k != present[1] and kv.get(k) is not None]
        assert kv.verify() == []


def _grow_and_die(name):
    kv = shmkv.attach(name)
    kv._set_crash_point("BTREE_GROW")
    for i in range(100_000):
        kv[b"g%06d" % i] = b"v"
    os._exit(3)  # never grew


@pytest.mark.multiprocess
def test_killed_while_turning_a_page_into_nodes(name):
    kv = shmkv.attach(name, size="2MiB", engine="btree", max_item="64KiB")
    p = CTX.Process(target=_grow_and_die, args=(name,))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    present = [b"g%06d" % i for i in range(100_000) if kv.get(b"g%06d" % i) is not None]
    assert keys_of(kv.scan()) == present  # the next locker rebuilt: the page's nodes listed
    assert kv.verify() == []
    for i in range(len(present), len(present) + 5000):  # and the index keeps growing
        kv[b"g%06d" % i] = b"v"
    assert kv.stats()["btree"]["node_pages"] >= 2 and kv.verify() == []
    assert keys_of(kv.scan()) == [b"g%06d" % i for i in range(100_000) if kv.get(b"g%06d" % i) is not None]
    kv.close()


def test_with_a_path_scans_merge_memory_and_disk(name, tmp_path):
    """With a path every item is on disk (writes go through), so the ordered scan is the merge
    of the sorted runs there -- including what memory evicted and tombstoned keys."""
    model: SortedDict = SortedDict()
    with shmkv.attach(name, size="4MiB", engine="btree", path=tmp_path / "d", durability="none") as kv:
        for i in range(8000):
            k = b"p%05d" % i
            kv[k] = b"y" * 600
            model[k] = b"y" * 600
        for i in range(0, 8000, 3):
            del kv[b"p%05d" % i]
            del model[b"p%05d" % i]
        assert kv.stats()["evictions"] > 0
        assert list(kv.scan()) == list(model.items())
        assert list(kv.scan(b"p01000", b"p02000", reverse=True, limit=50)) == model_range(
            model, b"p01000", b"p02000", True, 50)
        assert kv.first()[0] == model.peekitem(0)[0] and kv.last()[0] == model.peekitem(-1)[0]
        assert kv.floor(b"p00003")[0] == b"p00002"
        assert kv.verify() == []
    shmkv.unlink(name)  # as after a reboot: the directory's record keeps the engine
    with pytest.raises(shmkv.EngineMismatch, match="'btree'.*'hash'"):
        shmkv.attach(name, path=tmp_path / "d", engine="hash")
    with shmkv.attach(name, path=tmp_path / "d") as kv:
        assert kv.engine == "btree"
        assert keys_of(kv.scan(limit=3)) == list(model.keys()[:3])


# -- concurrency: scans against writers in other processes -----------------------------------


def _churn(name, seed, seconds):
    kv = shmkv.attach(name)
    rng = random.Random(seed)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(200):
            k = b"k%06d" % (rng.randrange(6000) * 2 + 1)  # odd keys churn; even keys are stable
            if rng.random() < 0.55:
                kv[k] = b"c" * rng.randrange(1, 60)
            else:
                kv.delete(k)
    kv.close()
    os._exit(0)


@pytest.mark.multiprocess
def test_scans_see_every_stable_key_once_in_order_under_concurrent_writers(name):
    kv = shmkv.attach(name, size="32MiB", engine="btree")
    stable = [b"k%06d" % (i * 2) for i in range(6000)]
    for k in stable:
        kv[k] = b"s"
    writers = [CTX.Process(target=_churn, args=(name, s, 2.5)) for s in (1, 2)]
    for w in writers:
        w.start()
    scans = 0
    rng = random.Random(3)
    deadline = time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            rev = rng.random() < 0.5
            lo = b"k%06d" % rng.randrange(0, 6000)
            got = keys_of(kv.scan(lo, None, reverse=rev))
            want = [k for k in stable if k >= lo]
            if rev:
                got.reverse()
            assert all(a < b for a, b in zip(got, got[1:], strict=False)), "out of order or repeated"
            got_stable = [k for k in got if int(k[1:]) % 2 == 0]
            assert got_stable == want
            scans += 1
    finally:
        for w in writers:
            w.join(20)
    assert all(w.exitcode == 0 for w in writers)
    assert scans >= 3
    assert kv.stats()["btree"]["scan_retries"] + kv.stats()["btree"]["scan_locked"] > 0  # raced for real
    assert kv.verify() == []
    kv.close()


def _same_leaves(name, seed, seconds, out):
    # this writer's keys interleave with the other's (k%05d, i % 2 == seed): the two share
    # every leaf. Overwrites, new keys (leaf inserts and splits) and deletes (leaf deletes and
    # merges); the model is its keys as it saw them acknowledged, from the parent's prefill.
    kv = shmkv.attach(name)
    rng = random.Random(seed)
    model = {b"k%05d" % i: b"init" for i in range(0, 6000, 3) if i % 2 == seed}
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        for _ in range(200):
            k = b"k%05d" % (rng.randrange(3000) * 2 + seed)
            if rng.random() < 0.7:
                v = b"%d-%d" % (seed, n)
                kv[k] = v
                model[k] = v
            else:
                kv.delete(k)
                model.pop(k, None)
            n += 1
    kv.close()
    out.put((model, n))
    out.close()
    out.join_thread()  # the queue's feeder thread, before os._exit
    os._exit(0)


@pytest.mark.multiprocess
def test_writers_on_the_same_leaves_lose_no_put(name):
    # two processes write interleaved keys -- the same leaves, under leaf latches and, for
    # splits and merges, the tree lock -- while this one scans: every acknowledged write is
    # in the final tree, once, in order; scans meanwhile never repeat or misorder a key
    kv = shmkv.attach(name, size="32MiB", engine="btree")
    for i in range(0, 6000, 3):
        kv[b"k%05d" % i] = b"init"
    out = CTX.Queue()
    writers = [CTX.Process(target=_same_leaves, args=(name, s, 2.0, out)) for s in (0, 1)]
    for w in writers:
        w.start()
    scans = scan_until(kv, 1.8)
    results = [out.get(timeout=30) for _ in writers]
    for w in writers:
        w.join(30)
    assert all(w.exitcode == 0 for w in writers)
    truth = {}
    for model, _ in results:
        truth.update(model)
    assert kv.verify() == []
    assert list(kv.scan()) == sorted(truth.items())
    assert list(kv.scan(reverse=True)) == sorted(truth.items(), reverse=True)
    bt = kv.stats()["btree"]
    assert bt["keys"] == len(truth)
    assert bt["writes_latched"] > bt["writes_locked"] > 0  # both kinds of hold raced for real
    assert sum(n for _, n in results) > 1000 and scans >= 3
    kv.close()


def _mix_forever(name, seed):
    kv = shmkv.attach(name)
    rng = random.Random(seed)
    while True:
        k = b"m%05d" % rng.randrange(4000)
        if rng.random() < 0.6:
            kv[k] = b"v" * rng.randrange(1, 30)
        else:
            kv.delete(k)


@pytest.mark.multiprocess
def test_writers_killed_at_random_instants_leave_a_tree_equal_to_the_chains(name):
    # three processes put and delete keys of the same leaves (latched leaf changes, splits
    # and merges under the tree lock); one is SIGKILLed at a random instant, wherever it is,
    # and the others write on before they are killed too: the index then equals the hash
    # table, key for key and value for value, and verify() finds nothing left to repair
    rng = random.Random(5)
    for round_ in range(4):
        nm = f"{name}-r{round_}"
        kv = shmkv.attach(nm, size="8MiB", engine="btree")
        try:
            for i in range(0, 4000, 2):
                kv[b"m%05d" % i] = b"i"
            ps = [CTX.Process(target=_mix_forever, args=(nm, s + 10 * round_)) for s in range(3)]
            for p in ps:
                p.start()
            time.sleep(rng.uniform(0.05, 0.3))
            os.kill(ps[0].pid, signal.SIGKILL)
            ps[0].join(10)
            got = keys_of(kv.scan())  # while the other two write
            assert all(a < b for a, b in zip(got, got[1:], strict=False)), "out of order or repeated"
            time.sleep(0.05)
            for p in ps[1:]:
                os.kill(p.pid, signal.SIGKILL)
                p.join(10)
            # each died of its SIGKILL, none of its own (a SIGSEGV: a tree its writes broke)
            assert [p.exitcode for p in ps] == [-signal.SIGKILL] * 3
            kv.verify()  # may repair (rebuild) what a killed writer left
            scanned = list(kv.scan())
            assert keys_of(scanned) == sorted(kv.keys())
            assert all(kv.get(k) == v for k, v in scanned)
            assert kv.verify() == []
        finally:
            kv.close()
            shmkv.unlink(nm)


def _insert_new(name, seed, seconds):
    kv = shmkv.attach(name)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        for _ in range(200):
            kv[b"w%d-%07d" % (seed, i)] = b"x" * (i % 50)
            i += 1
    kv.close()
    os._exit(0)


@pytest.mark.multiprocess
def test_node_pages_are_taken_while_other_processes_insert_and_scan(name):
    # two writers of new keys in a small store: the index outgrows its region and takes pages
    # (unassigned ones, then ones emptied by eviction) while the other writer and a scanner
    # run -- no deadlock against the lock order, no repeated or misordered key, a sound tree
    kv = shmkv.attach(name, size="2MiB", engine="btree", max_item="64KiB")
    writers = [CTX.Process(target=_insert_new, args=(name, s, 1.5)) for s in (1, 2)]
    for w in writers:
        w.start()
    try:
        scan_until(kv, 1.5)
    finally:
        for w in writers:
            w.join(30)
    assert all(w.exitcode == 0 for w in writers)
    assert kv.stats()["btree"]["node_pages"] >= 1 and kv.stats()["evictions"] > 0
    assert kv.verify() == []
    assert keys_of(kv.scan()) == sorted(k for k in kv.keys())
    kv.close()


# -- SIGKILL inside split, merge and root growth ------------------------------------------


def _die_at(name, point, action):
    kv = shmkv.attach(name)
    kv._set_crash_point(point)
    action(kv)
    os._exit(3)  # the crash point was not reached


def _put_ascending(kv):
    for i in range(100_000):
        kv[b"n%06d" % i] = b"v%d" % i


def _delete_ascending(kv):
    for i in range(100_000):
        kv.delete(b"n%06d" % i)


def _put_ascending_new(kv):
    for i in range(100, 100_000):  # after a prefill of 100: new keys into a leaf with room
        kv[b"n%06d" % i] = b"v%d" % i


SCENARIOS = {
    # point[/variant] -> (keys the parent writes first, what the child does until it dies)
    "BTREE_ROOT_GROW": (0, _put_ascending),
    # under a leaf latch (no tree lock): an overwrite of an entry no separator copies, a new
    # key into a leaf with room (killed mid-shift: the leaf holds one entry twice), a delete
    # that leaves the leaf above its minimum
    "BTREE_LEAF_PUT": (100, _put_ascending),
    "BTREE_LEAF_PUT/new": (100, _put_ascending_new),
    "BTREE_LEAF_DEL": (3000, _delete_ascending),
    "BTREE_SPLIT": (200, _put_ascending),
    "BTREE_MERGE": (3000, _delete_ascending),
    "PUT_PUBLISHED": (100, _put_ascending),
    "REMOVE_UNLINKED": (100, _delete_ascending),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("point", sorted(SCENARIOS))
@pytest.mark.parametrize("verify_first", [False, True])
def test_killed_inside_a_tree_change_leaves_a_tree_equal_to_the_acknowledged_writes(name, point, verify_first):
    prefill, action = SCENARIOS[point]
    point = point.split("/")[0]
    kv = shmkv.attach(name, size="16MiB", engine="btree")
    for i in range(prefill):
        kv[b"n%06d" % i] = b"v%d" % i
    p = CTX.Process(target=_die_at, args=(name, point, action))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL, f"crash point {point} not reached (exit {p.exitcode})"
    # The truth is the hash table (the index is derived): the child's writes are a prefix of
    # its sequence, the one it died in applied or not.
    if verify_first:
        assert kv.verify() == []  # a dead tree writer: repaired (rebuilt), not reported
    present = [b"n%06d" % i for i in range(5000) if kv.get(b"n%06d" % i) is not None]
    t0 = time.monotonic()
    scanned = list(kv.scan())  # a dead writer left the tree lock owner-dead: rebuilt here
    assert time.monotonic() - t0 < 5
    assert keys_of(scanned) == present
    assert all(v == b"v%d" % int(k[1:]) for k, v in scanned)
    nums = [int(k[1:]) for k in present]
    if action in (_put_ascending, _put_ascending_new):
        assert nums == list(range(len(nums))) and len(nums) >= prefill
    else:
        assert nums == list(range(nums[0] if nums else prefill, prefill))
    assert kv.verify() == []
    if point.startswith("BTREE"):
        assert kv.stats()["btree"]["rebuilds"] >= 1  # the next locker rebuilt the index
    # and the store keeps working, tree and all
    kv[b"after"] = b"1"
    if present:
        del kv[present[-1]]
    assert keys_of(kv.scan(start=b"after")) == [b"after"] + [k for k in present[:-1] if k > b"after"]
    assert kv.verify() == []
    kv.close()


def _overwrite_first(kv):
    kv[b"n000000"] = b"again"


def _delete_from_the_end(name, keep, count):
    kv = shmkv.attach(name)
    for i in reversed(range(keep, count)):
        del kv[b"n%06d" % i]
    os._exit(0)


@pytest.mark.multiprocess
def test_a_rebuilt_tree_takes_deletes_at_its_right_edge(name):
    # a rebuild lays 38 entries per leaf and at most 32 children per inner node: 33 leaves
    # once gave an inner node of one child and no key on the right edge, and the first delete
    # there that emptied a leaf below its minimum read the sibling "before" child 0 (SIGSEGV)
    count = 33 * 38
    kv = shmkv.attach(name, size="16MiB", engine="btree")
    for i in range(count):
        kv[b"n%06d" % i] = b"v"
    p = CTX.Process(target=_die_at, args=(name, "BTREE_LEAF_PUT", _overwrite_first))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    assert kv.verify() == [] and kv.stats()["btree"]["rebuilds"] >= 1  # rebuilt
    d = CTX.Process(target=_delete_from_the_end, args=(name, 40, count))
    d.start()
    d.join(60)
    assert d.exitcode == 0, f"the deleting process ended with {d.exitcode}"
    assert keys_of(kv.scan()) == [b"n%06d" % i for i in range(40)]
    assert kv.verify() == []
    kv.close()


def test_crash_points_of_the_tree_are_named(bt):
    from shmkv._ext import _core

    assert {"BTREE_SPLIT", "BTREE_MERGE", "BTREE_ROOT_GROW", "BTREE_GROW", "BTREE_LEAF_PUT",
            "BTREE_LEAF_DEL"} <= set(_core.CRASH_POINTS)
