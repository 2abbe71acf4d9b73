"""Order statistics of sampled latencies and of repeated throughputs.

Percentiles use the nearest-rank method on the sorted samples: the reported value is always one
that was observed. Interpolating was the alternative; it invents values between two samples and
makes p99.9 of a few thousand samples look smoother than the data. No means anywhere: a mean
of latencies hides the tail, which is what a cache user pays for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import TypeVar

# Samples are ints (ns) in shmkv-bench, floats (seconds) in some scripts: the value comes back as is.
N = TypeVar("N", int, float)

# The percentiles every latency summary carries, as (JSON key, percent).
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9))


def percentile(sorted_samples: Sequence[N], pct: float) -> N:
    """Nearest-rank ``pct`` percentile. REQUIRES: samples sorted ascending, not empty.

    The one percentile of every bench (shmkv-bench, bench/*.py and the engines here): the sample
    of rank ceil(pct/100 * n), 1-based -- of 1..1000, p99 is 990 and p99.9 is 999.

    :raises ValueError: no samples, or pct outside (0, 100].
    """
    n = len(sorted_samples)
    if n == 0:
        raise ValueError("percentile of no samples")
    if not 0 < pct <= 100:
        raise ValueError(f"percentile out of range: {pct}")
    # Exact arithmetic: in floats 99.9 / 100 * 1000 is 999.0000000000001, rank 1000 not 999.
    rank = math.ceil(Fraction(repr(pct)) * n / 100)
    return sorted_samples[max(rank, 1) - 1]


def summarize(samples: Iterable[int]) -> dict[str, int]:
    """``{"count", "p50", "p99", "p99.9", "max"}`` in the samples' unit; ``{"count": 0}`` if none."""
    s = sorted(samples)
    if not s:
        return {"count": 0}
    out = {"count": len(s)}
    for key, pct in PERCENTILES:
        out[key] = percentile(s, pct)
    out["max"] = s[-1]
    return out


def median(values: Sequence[float]) -> float:
    """The median (mean of the middle two for an even count). :raises ValueError: empty."""
    s = sorted(values)
    n = len(s)
    if n == 0:
        raise ValueError("median of no values")
    mid = n // 2
    return float(s[mid]) if n % 2 else (s[mid - 1] + s[mid]) / 2.0
