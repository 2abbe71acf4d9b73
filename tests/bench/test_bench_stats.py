"""Percentiles (nearest rank) and medians."""

from __future__ import annotations

import pytest

from shmkv.bench.stats import median, percentile, summarize


def test_nearest_rank_percentiles_are_observed_values() -> None:
    s = list(range(1, 1001))  # 1..1000
    assert percentile(s, 50) == 500
    assert percentile(s, 99) == 990
    assert percentile(s, 99.9) == 999
    assert percentile(s, 100) == 1000
    assert percentile([7], 99.9) == 7


def test_summarize_gives_count_percentiles_and_max() -> None:
    out = summarize([5, 1, 3, 2, 4])
    assert out == {"count": 5, "p50": 3, "p99": 5, "p99.9": 5, "max": 5}
    assert summarize([]) == {"count": 0}


def test_median_of_odd_and_even_counts() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_errors() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1], 0)
    with pytest.raises(ValueError):
        median([])


def test_the_tier_engine_reports_the_same_nearest_rank_percentile() -> None:
    # One definition for every published number: index arithmetic (s[int(p * n)]) gave 991 here.
    from shmkv.bench.tier import pct

    s = list(range(1, 1001))  # ns
    assert pct(s, 0.99) == percentile(s, 99) / 1000.0 == 0.99
    assert pct(s, 0.50) == 0.5 and pct(s, 1.0) == 1.0
    assert pct([], 0.99) != pct([], 0.99)  # NaN: no samples
