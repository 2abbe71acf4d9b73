"""Memory pressure: LRU eviction that honours reads, TTL reclaim, pages moving between classes."""

from __future__ import annotations

import bisect
import multiprocessing as mp
import random
import time

import pytest

import shmkv


def fill_until_evicting(kv, prefix, size, start=0, reading=None):
    i = start
    while kv.stats()["evictions"] == 0:
        for _ in range(100):
            kv.put(f"{prefix}{i}", b"v" * size)
            i += 1
        if reading is not None:
            kv.get(reading)
    return i


def test_full_store_evicts_instead_of_failing(name):
    with shmkv.attach(name, size="4MiB") as kv:
        for i in range(100_000):
            kv.put(f"k{i}", b"x" * 100)
        s = kv.stats()
        assert s["evictions"] > 0
        assert 0 < len(kv) < 100_000
        assert kv[f"k{99_999}"] == b"x" * 100  # the newest survive
        assert kv.get("k0") is None  # the oldest went
        assert kv.verify() == []


def test_recently_read_key_outlives_a_stream_of_one_time_writes(name):
    with shmkv.attach(name, size="4MiB") as kv:
        kv.put("hot", b"h" * 100)
        n = fill_until_evicting(kv, "cold", 100, reading="hot")
        # keep reading the hot key while writing several store-fulls of one-time keys
        for i in range(n, n + 5 * n):
            kv.put(f"cold{i}", b"v" * 100)
            if i % 100 == 0:
                assert kv.get("hot") == b"h" * 100, f"hot key evicted after {i - n} writes"
        assert kv.get("hot") == b"h" * 100
        assert kv.verify() == []


def test_unread_key_is_evicted_by_the_same_stream(name):
    with shmkv.attach(name, size="4MiB") as kv:
        kv.put("idle", b"h" * 100)
        n = fill_until_evicting(kv, "cold", 100)
        for i in range(n, n + 3 * n):
            kv.put(f"cold{i}", b"v" * 100)
        assert kv.get("idle") is None


def test_an_overwrite_counts_as_one_use_of_the_key(name):
    # A replacing put reuses the chunk of this process's previous replaced version where it
    # sits on the LRU, with no class lock (ext/core/slab.c shmkv_take_kept), and marks it
    # used: an overwrite earns the key one second chance, as a read does. Here the reused
    # chunk sits at the tail: the new "idle" survives the first eviction pass (written =
    # used) and, never read or written again, is gone after the second -- it must not keep
    # the bit of the version that chunk held before, nor earn a chance per pass.
    with shmkv.attach(name, size="4MiB") as kv:
        capacity = fill_until_evicting(kv, "probe", 100)
        kv.clear()
        kv.put("a", b"a" * 100)
        kv.put("idle", b"i" * 100)
        for i in range(capacity - 1000):
            kv.put(f"cold{i}", b"v" * 100)
        kv.put("a", b"A" * 100)  # its old version, at the tail, becomes the kept chunk
        kv.put("idle", b"I" * 100)  # written into that chunk
        # ~1,000 writes take free chunks, then eviction meets "idle" at the tail, gives it
        # its chance and moves it to the head: it lasts about capacity + 1,000 writes.
        for i in range(capacity // 2):
            kv.put(f"stream{i}", b"v" * 100)
        assert "idle" in kv  # `in` reads no value, so it sets no bit
        for i in range(capacity // 2, 2 * capacity + 2000):
            kv.put(f"stream{i}", b"v" * 100)
        assert kv.get("idle") is None
        assert kv.verify() == []


def test_expired_items_are_reclaimed_before_live_ones(name):
    with shmkv.attach(name, size="4MiB") as kv:
        n = fill_until_evicting(kv, "live", 100)
        capacity = len(kv)
        kv.clear()
        for i in range(capacity // 2):
            kv.put(f"ttl{i}", b"t" * 100, ttl=0.2)
        for i in range(capacity // 3):
            kv.put(f"keep{i}", b"k" * 100)
        time.sleep(0.3)
        for i in range(capacity // 3):
            kv.put(f"new{i}", b"n" * 100)
        # room came from the expired items: every live one is still here
        assert all(kv.get(f"keep{i}") is not None for i in range(capacity // 3))
        assert all(kv.get(f"new{i}") is not None for i in range(capacity // 3))
        assert n > 0


def test_memory_moves_to_the_class_that_needs_it(name):
    # Fill the store with small items, then write only large ones: pages must move from
    # the small class to the large one, or large items would keep evicting each other in
    # a sliver of memory while the small class sat on the rest.
    with shmkv.attach(name, size="16MiB") as kv:
        fill_until_evicting(kv, "small", 60)
        for i in range(20_000):
            kv.put(f"large{i}", b"L" * 3000)
        live_large = sum(kv.get(f"large{i}") is not None for i in range(20_000))
        seg = kv.stats()["segment_bytes"]
        # at least half of the segment now holds large items
        assert live_large * 3000 > seg / 2, live_large
        assert kv.stats()["automoves"] > 0
        assert kv.verify() == []


def test_a_new_size_gets_memory_even_when_all_pages_are_taken(name):
    with shmkv.attach(name, size="4MiB") as kv:
        fill_until_evicting(kv, "s", 40)
        for size in (200, 1000, 5000, 20000):
            kv.put(f"size{size}", b"z" * size)
            assert kv[f"size{size}"] == b"z" * size
        assert kv.verify() == []


# -- StoreFull only when nothing can be evicted (issue 8 A) -----------------------------------
#
# CLOCK is bounded: one sweep of the LRU clears every active bit, so a second chance must
# never turn into a refusal. These loads keep the tail full of recently read (or recently
# overwritten) items, with hot sets larger than any constant in ext/core, and count StoreFull.

CTX = mp.get_context("fork")


def _zipf_sampler(n, s, rnd):
    """Ranks 0..n-1 with P(rank k) ~ 1/(k+1)^s: bisect over the cumulative weights."""
    cum, total = [], 0.0
    for k in range(n):
        total += 1.0 / (k + 1) ** s
        cum.append(total)
    return lambda: min(bisect.bisect_left(cum, rnd.random() * total), n - 1)


def _hot_set_load(kv, prefix, writes, hot, every, value):
    """Write `hot` keys, then `writes` one-time keys, re-reading every hot key after each
    `every` writes. Returns (StoreFull count, hot reads, hot hits)."""
    full = reads = hits = 0
    for h in range(hot):
        kv.put(f"{prefix}hot{h}", value)
    for i in range(writes):
        try:
            kv.put(f"{prefix}cold{i}", value)
        except shmkv.StoreFull:
            full += 1
        if i % every == every - 1:
            for h in range(hot):
                reads += 1
                hits += kv.get(f"{prefix}hot{h}") is not None
    return full, reads, hits


@pytest.mark.parametrize("hot", [150, 3000])
def test_reread_hot_set_never_makes_eviction_refuse(name, hot):
    # 16 MiB of 1 KiB items holds ~14,000: the hot set, re-read every 2,000 writes, is all
    # active whenever eviction reaches it -- 150 and 3,000 in a row at the tail, far more
    # than any fixed budget of tries.
    with shmkv.attach(name, size="16MiB") as kv:
        full, reads, hits = _hot_set_load(kv, "", 45_000, hot, 2000, b"v" * 1000)
        s = kv.stats()
        assert full == 0 and s["store_full"] == 0, f"{full} StoreFull"
        assert s["evictions"] > 20_000
        assert hits / reads >= 0.95, f"hot-set hit ratio {hits / reads:.3f}"
        assert kv.verify() == []


def test_overwrites_just_over_capacity_never_make_eviction_refuse(name):
    # Only puts, over a key set 3 % larger than the store holds: almost every put replaces,
    # and a few evict. No reads at all, so no second chance is earned by anyone.
    rnd = random.Random(8)
    with shmkv.attach(name, size="16MiB") as kv:
        n = fill_until_evicting(kv, "o", 100)
        nkeys = int(n * 1.03)
        full = 0
        for _ in range(300_000):
            try:
                kv.put(f"o{rnd.randrange(nkeys)}", b"v" * 100)
            except shmkv.StoreFull:
                full += 1
        s = kv.stats()
        assert full == 0 and s["store_full"] == 0, f"{full} StoreFull in 300,000 puts"
        assert s["evictions"] > 0
        assert kv.verify() == []


def _cache_aside(kv, sample, ops, warmup, value=b"v" * 1000):
    """get, and put on a miss, of ``ops`` keys drawn by ``sample``; after ``warmup`` ops the
    hits count, and separately the 100 hottest keys' (ranks below 100). Returns (StoreFull
    count, gets, hits, head gets, head hits)."""
    full = gets = hits = head_gets = head_hits = 0
    for i in range(ops):
        k = sample()
        r = kv.get(f"z{k}")
        if i >= warmup:
            gets += 1
            hits += r is not None
            if k < 100:
                head_gets += 1
                head_hits += r is not None
        if r is None:
            try:
                kv.put(f"z{k}", value)
            except shmkv.StoreFull:
                full += 1
    return full, gets, hits, head_gets, head_hits


@pytest.mark.parametrize("skew", [0.99, 1.2])
def test_zipfian_cache_aside_never_makes_eviction_refuse(name, skew):
    # A cache of ~6,000 items in front of 200,000 keys: get, and put on a miss. The hot head
    # of the distribution is re-read all the time and must stay resident.
    rnd = random.Random(int(skew * 100))
    nkeys = 200_000
    sample = _zipf_sampler(nkeys, skew, rnd)
    with shmkv.attach(name, size="8MiB") as kv:
        full, gets, hits, head_gets, head_hits = _cache_aside(kv, sample, 150_000, 50_000)
        assert full == 0 and kv.stats()["store_full"] == 0, f"{full} StoreFull"
        assert kv.stats()["evictions"] > 0
        assert head_hits / head_gets >= 0.95, (
            f"hit ratio of the 100 hottest keys {head_hits / head_gets:.3f}"
        )
        assert kv.verify() == []


def _proc_hot_set(name, wid, barrier, q):
    kv = shmkv.attach(name)
    barrier.wait()
    # re-read every 250 own writes: ~1,000 writes of all four between two reads when they
    # run evenly, so even a process descheduled for most of a round keeps its hot set
    q.put(_hot_set_load(kv, f"w{wid}-", 12_000, 500, 250, b"v" * 1000))
    kv.close()


def _proc_overwrite(name, wid, nkeys, barrier, q):
    kv = shmkv.attach(name)
    barrier.wait()
    rnd = random.Random(wid)
    full = 0
    for _ in range(150_000):
        try:
            kv.put(f"o{rnd.randrange(nkeys)}", b"v" * 100)
        except shmkv.StoreFull:
            full += 1
    q.put((full, 0, 0))
    kv.close()


def _proc_zipf(name, wid, barrier, q):
    # cache-aside over one key space shared by the four (as workers share one cache): get,
    # put on a miss; the 100 hottest keys' hits count after a warm-up
    kv = shmkv.attach(name)
    rnd = random.Random(100 + wid)
    sample = _zipf_sampler(200_000, 0.99, rnd)
    barrier.wait()
    full, _gets, _hits, head_gets, head_hits = _cache_aside(kv, sample, 50_000, 15_000)
    q.put((full, head_gets, head_hits))
    kv.close()


@pytest.mark.multiprocess
@pytest.mark.parametrize("load", ["hot_set", "overwrite", "zipf"])
def test_four_processes_evicting_at_once_never_get_store_full(name, load):
    # Four writers on one class: each meets the others' IN FLIGHT chunks and held stripes
    # at the tail -- busy candidates, which are skipped and retried, never a refusal.
    with shmkv.attach(name, size="16MiB") as kv:
        if load == "hot_set":
            args = [(name, w) for w in range(4)]
            target = _proc_hot_set
        elif load == "zipf":
            args = [(name, w) for w in range(4)]
            target = _proc_zipf
        else:
            n = fill_until_evicting(kv, "o", 100)
            args = [(name, w, int(n * 1.03)) for w in range(4)]
            target = _proc_overwrite
        q = CTX.Queue()
        barrier = CTX.Barrier(len(args))
        procs = [CTX.Process(target=target, args=(*a, barrier, q)) for a in args]
        for p in procs:
            p.start()
        try:
            results = [q.get(timeout=120) for _ in procs]
        finally:
            for p in procs:
                p.join(30)
                if p.exitcode is None:
                    p.kill()
        assert all(p.exitcode == 0 for p in procs)
        full = sum(r[0] for r in results)
        reads = sum(r[1] for r in results)
        hits = sum(r[2] for r in results)
        assert full == 0 and kv.stats()["store_full"] == 0, f"{full} StoreFull"
        if reads:
            assert hits / reads >= 0.95, f"hot-set hit ratio {hits / reads:.3f}"
        if load == "zipf":
            assert kv.stats()["evictions"] > 0  # the cache did turn over
        assert kv.verify() == []


def _keep_a_chunk_and_idle(name, ready, done):
    kv = shmkv.attach(name)
    for i in range(3):  # the second and third puts replace: this process keeps a chunk
        kv.put("idler", b"%d" % i * 100)
    ready.set()
    done.wait(60)  # alive and idle: its kept chunk stays named by its slot
    kv.close()


def test_an_idle_process_kept_chunk_is_taken_back_by_eviction(name):
    # A process keeps the chunk of the version it last replaced (ext/core/slab.c
    # shmkv_take_kept); one that then goes idle must not pin it: eviction takes it back like
    # any leftover of a replaced item (shmkv_steal_kept_locked), so every chunk in use is a
    # reachable item again once the LRU has turned over.
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with shmkv.attach(name, size="4MiB") as kv:
        capacity = fill_until_evicting(kv, "probe", 100)
        kv.clear()
        ready, done = ctx.Event(), ctx.Event()
        p = ctx.Process(target=_keep_a_chunk_and_idle, args=(name, ready, done))
        p.start()
        try:
            assert ready.wait(30)
            for i in range(3 * capacity):
                kv.put(f"churn{i}", b"v" * 100)
            used = sum(c["used"] for c in kv.stats()["classes"])
            assert used == len(list(kv.keys())), "a live process's kept chunk stayed pinned"
        finally:
            done.set()
            p.join(30)
        assert p.exitcode == 0
        assert kv.verify() == []
