"""Memory pressure: LRU eviction that honours reads, TTL reclaim, pages moving between classes."""

from __future__ import annotations

import time

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
