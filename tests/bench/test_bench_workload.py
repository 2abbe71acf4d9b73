"""The workload generator: size specs, mixes, key distributions, streams and the fill."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shmkv.bench.workload import (
    DELETE,
    GET,
    INCR,
    PUT,
    KeyChooser,
    KeyDist,
    Mix,
    SizeDist,
    Workload,
    build_stream,
    fill_batches,
    format_size,
    make_key,
    parse_size,
)

# -- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n"),
    [
        ("100", 100),
        ("1k", 1024),
        ("1KiB", 1024),
        ("10 KB", 10240),
        ("64MiB", 64 << 20),
        ("2G", 2 << 30),
        (7, 7),
    ],
)
def test_parse_size_accepts_binary_units(text: str | int, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "abc", "10 parsecs", "0", "-5", "1.5.2k"])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size_is_exact_and_short() -> None:
    assert [format_size(n) for n in (100, 1024, 1536, 10240, 64 << 20)] == [
        "100B",
        "1KiB",
        "1536B",
        "10KiB",
        "64MiB",
    ]


def test_size_dist_fixed_range_and_choice() -> None:
    rng = random.Random(1)
    assert SizeDist.parse("100").sample(rng, 3) == [100, 100, 100]
    r = SizeDist.parse("100-10KiB")
    assert r.kind == "range" and r.max_size == 10240
    assert all(100 <= s <= 10240 for s in r.sample(rng, 1000))
    c = SizeDist.parse("100:70,1KiB:20,10KiB:10")
    counts = Counter(c.sample(rng, 20_000))
    assert set(counts) == {100, 1024, 10240}
    assert counts[100] / 20_000 == pytest.approx(0.70, abs=0.02)
    assert counts[10240] / 20_000 == pytest.approx(0.10, abs=0.02)
    assert c.mean_size == pytest.approx(0.7 * 100 + 0.2 * 1024 + 0.1 * 10240)


@pytest.mark.parametrize("text", ["10KiB-100", "100:0,1k:1", "x-1k"])
def test_size_dist_rejects_bad_specs(text: str) -> None:
    with pytest.raises(ValueError):
        SizeDist.parse(text)


# -- mixes -------------------------------------------------------------------------------------


def test_mix_normalises_to_percent() -> None:
    m = Mix.parse("get=9,put=1")
    assert m.weights() == pytest.approx((90.0, 10.0, 0.0, 0.0, 0.0))
    assert Mix.parse("incr=80, get=20").describe() == "get 20% incr 80%"
    assert Mix.parse("get=1,scan=1").describe() == "get 50% scan 50%"


@pytest.mark.parametrize("text", ["get=0", "read=5", "get=-1,put=2", "get90"])
def test_mix_rejects_bad_specs(text: str) -> None:
    with pytest.raises(ValueError):
        Mix.parse(text)


def test_stream_follows_the_mix() -> None:
    w = Workload(keys=1000, mix=Mix.parse("get=50,put=30,delete=20"))
    counts = build_stream(w, 0).counts()
    total = sum(counts)
    assert counts[GET] / total == pytest.approx(0.50, abs=0.02)
    assert counts[PUT] / total == pytest.approx(0.30, abs=0.02)
    assert counts[DELETE] / total == pytest.approx(0.20, abs=0.02)
    assert counts[INCR] == 0


# -- key distributions -------------------------------------------------------------------------


def test_key_dist_parse() -> None:
    assert KeyDist.parse("uniform") == KeyDist("uniform")
    assert KeyDist.parse("zipf") == KeyDist("zipf", 0.99)
    assert KeyDist.parse("zipf:1.2") == KeyDist("zipf", 1.2)
    for bad in ("zipf:0", "normal", "uniform:3"):
        with pytest.raises(ValueError):
            KeyDist.parse(bad)


def test_uniform_keys_cover_the_key_space_evenly() -> None:
    ch = KeyChooser(KeyDist("uniform"), 100, seed=1)
    counts = Counter(ch.draw(random.Random(2), 100_000))
    assert set(counts) == set(range(100))
    assert max(counts.values()) < 1.2 * 1000 and min(counts.values()) > 0.8 * 1000


@pytest.mark.parametrize("s", [0.8, 0.99, 1.3])
def test_zipf_rank_frequencies_match_the_exact_pmf(s: float) -> None:
    n, draws = 1000, 200_000
    ch = KeyChooser(KeyDist("zipf", s), n, seed=3)
    counts = Counter(ch.draw(random.Random(4), draws))
    for rank in (0, 1, 9, 99):
        p = ch.rank_probability(rank)
        got = counts[ch.key_of_rank(rank)] / draws
        # Within 5 standard deviations of a binomial count.
        assert abs(got - p) < 5 * (p * (1 - p) / draws) ** 0.5 + 1e-4, (rank, got, p)
    # The pmf is 1/r**s normalised.
    assert ch.rank_probability(0) / ch.rank_probability(1) == pytest.approx(2**s)


def test_zipf_hot_keys_are_shared_by_workers_but_scattered_in_key_order() -> None:
    w = Workload(keys=10_000, dist=KeyDist("zipf", 0.99))
    hot = [Counter(op[1] for op in build_stream(w, i).ops).most_common(5) for i in (0, 1)]
    assert {k for k, _ in hot[0]} & {k for k, _ in hot[1]}
    ch = KeyChooser(w.dist, w.keys, w.seed)
    assert [ch.key_of_rank(r) for r in range(5)] != list(range(5))


# -- streams, keys, fill -----------------------------------------------------------------------


def test_keys_have_exactly_the_key_size() -> None:
    assert make_key(42, 16) == b"k000000000000042"
    w = Workload(keys=5000, key_size=8)
    assert {len(op[1]) for op in build_stream(w, 0).ops if op[0] != PUT} == {8}
    with pytest.raises(ValueError, match="cannot hold"):
        Workload(keys=10**6, key_size=4)


def test_stream_is_deterministic_per_worker_and_differs_between_workers() -> None:
    w = Workload(keys=1000)
    assert build_stream(w, 0).ops == build_stream(w, 0).ops
    assert build_stream(w, 0).ops != build_stream(w, 1).ops


def test_batched_stream_holds_key_lists_and_put_dicts() -> None:
    w = Workload(keys=1000, batch=100, mix=Mix.parse("get=50,put=50"))
    s = build_stream(w, 0, length_keys=10_000)
    assert s.keys_per_op == 100 and len(s.ops) == 100
    for code, arg in s.ops:
        assert len(arg) == 100
        assert isinstance(arg, dict) if code == PUT else isinstance(arg, list)


def test_counter_workloads_store_decimal_zero() -> None:
    w = Workload(keys=100, mix=Mix.parse("incr=50,put=50"), value_size=SizeDist.parse("1KiB"))
    assert w.counters
    assert {v for code, (k, v) in (op for op in build_stream(w, 0).ops if op[0] == PUT)} == {b"0"}
    assert {v for batch in fill_batches(w) for v in batch.values()} == {b"0"}
    with pytest.raises(ValueError, match="batch"):
        Workload(keys=100, batch=10, mix=Mix.parse("incr=1"))


def test_fill_writes_every_key_once_with_distribution_sizes() -> None:
    w = Workload(keys=2500, value_size=SizeDist.parse("100-200"))
    batches = list(fill_batches(w, batch=1000))
    assert [len(b) for b in batches] == [1000, 1000, 500]
    keys = [k for b in batches for k in b]
    assert len(set(keys)) == 2500 and keys[0] == make_key(0, 16)
    assert all(100 <= len(v) <= 200 for b in batches for v in b.values())


def test_workload_needs_exactly_one_of_duration_and_ops() -> None:
    with pytest.raises(ValueError):
        Workload(duration=None, ops=None)
    with pytest.raises(ValueError):
        Workload(duration=1.0, ops=10)
    assert Workload(duration=None, ops=10).describe().endswith("10 ops per process")
