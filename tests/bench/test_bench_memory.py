"""Bytes per item: capacity over items held at the first eviction."""

from __future__ import annotations

import pytest
from bench_helpers import small_config

from shmkv.bench import memory
from shmkv.bench.adapters import make


def _need(name: str) -> None:
    reason = make(name, small_config()).unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("name", ["shmkv", "memcached", "redis"])
def test_evicting_store_is_filled_until_its_first_eviction(name: str) -> None:
    _need(name)
    fn = getattr(memory, f"{name}_per_item")
    r = fn(1024, 16 << 20)
    assert r.payload_per_item == 16 + 1024
    # Full: at least 60% of the capacity is items, and no store needs 2x the payload at 1 KiB.
    assert r.payload_per_item <= r.bytes_per_item < 2 * r.payload_per_item
    assert r.bytes_per_item == pytest.approx(r.capacity_bytes / r.items)


def test_lmdb_counts_used_pages_for_a_given_item_count() -> None:
    _need("lmdb")
    r = memory.lmdb_per_item(100, 5000)
    assert r.items == 5000 and r.capacity_bytes % r.extra["psize"] == 0
    assert 116 <= r.bytes_per_item < 400
