"""The runner: the timed loop's counting and sampling, cells across spawned workers, and
failures reported instead of hanging."""

from __future__ import annotations

import pytest
from bench_helpers import small_config

from shmkv.bench.adapters.pydict import DictAdapter
from shmkv.bench.runner import (
    SAMPLE_EVERY,
    NullProgress,
    WorkerFailed,
    bind_stream,
    cell_from_runs,
    fill,
    harness_ns_per_call,
    run_benchmark,
    run_cell,
    timed_loop,
)
from shmkv.bench.workload import Mix, Workload, build_stream


def _open_dict(w: Workload) -> DictAdapter:
    a = DictAdapter(small_config(keys=w.keys))
    a.open()
    fill(a, w)
    return a


def test_blocks_sample_the_first_of_every_sixteen_calls() -> None:
    w = Workload(keys=100, ops=1000, duration=None)
    a = _open_dict(w)
    segments = bind_stream(a, build_stream(w, 0, length_keys=1000))
    blocks = [b for seg in segments for b in seg]
    assert sum(1 + len(rest) for _, _, rest in blocks) == 1000
    assert all(len(rest) == SAMPLE_EVERY - 1 for _, _, rest in blocks[:-1])


def test_op_count_run_does_at_least_the_ops_and_samples_one_call_in_sixteen() -> None:
    w = Workload(keys=100, ops=5000, duration=None, mix=Mix.parse("get=80,put=20"))
    a = _open_dict(w)
    segments = bind_stream(a, build_stream(w, 0, length_keys=1024))
    r = timed_loop(segments, 1, None, 5000)
    assert 5000 <= r.calls < 5000 + 1024
    samples = sum(len(b) // 8 for b in r.lat)
    assert samples == r.calls // SAMPLE_EVERY
    assert r.asked > 0 and r.hits == r.asked  # every key was filled
    assert r.end_ns > r.start_ns


def test_duration_run_stops_near_the_deadline() -> None:
    w = Workload(keys=100, duration=0.2)
    a = _open_dict(w)
    r = timed_loop(bind_stream(a, build_stream(w, 0)), 1, 0.2, None)
    assert 0.2 <= (r.end_ns - r.start_ns) / 1e9 < 0.5


def test_batched_run_counts_keys_not_calls() -> None:
    w = Workload(keys=1000, batch=50, ops=10_000, duration=None, mix=Mix.parse("get=1"))
    a = _open_dict(w)
    stream = build_stream(w, 0)
    r = timed_loop(bind_stream(a, stream), stream.keys_per_op, None, 200)
    assert r.keys == 50 * r.calls and r.hits == r.asked == 50 * (r.calls // SAMPLE_EVERY)


def test_cell_throughput_spans_first_start_to_last_end() -> None:
    from shmkv.bench.runner import WorkerResult

    ws = [
        WorkerResult(
            index=0,
            calls=100,
            keys=1000,
            start_ns=0,
            end_ns=1_000_000_000,
            lat=[b"", b"", b"", b""],
        ),
        WorkerResult(
            index=1,
            calls=100,
            keys=1000,
            start_ns=500_000_000,
            end_ns=2_000_000_000,
            lat=[b"", b"", b"", b""],
        ),
    ]
    cell = cell_from_runs("x", 2, [ws])
    assert cell.ops_per_s == pytest.approx(1000.0)  # 2000 keys over 2 s
    assert cell.runs[0]["per_process_ops_per_s"] == pytest.approx([1000.0, 1000.0 / 1.5])


class FailingAdapter(DictAdapter):
    """Raises in the worker's open(): the runner must report it, not wait for the barrier."""

    name = "failing"

    def open(self) -> None:
        raise OSError("backend exploded on open")


@pytest.mark.multiprocess
def test_worker_failure_is_reported_with_its_error_not_a_hang() -> None:
    w = Workload(keys=10, ops=100, duration=None)
    with pytest.raises(WorkerFailed, match="backend exploded on open"):
        run_cell(FailingAdapter(small_config(keys=10)), w, 2, NullProgress())


@pytest.mark.multiprocess
@pytest.mark.bench
def test_benchmark_runs_every_backend_at_every_process_count() -> None:
    w = Workload(keys=500, ops=3000, duration=None)
    names = ["shmkv", "dict", "lmdb"]
    config = small_config(keys=w.keys)
    out = run_benchmark(w, names, [1, 2], config)
    assert not out.failed, out.failed
    ran = {(c.backend, c.procs) for c in out.cells}
    expected = {(n, p) for n in names for p in (1, 2) if not (n == "dict" and p == 2)}
    skipped = {n for n, _ in out.skipped}
    assert ran == {(n, p) for n, p in expected if n not in skipped}
    for c in out.cells:
        assert c.runs[0]["ops"] >= 3000 * c.procs
        assert c.hit_ratio is not None and c.hit_ratio > 0.9
        assert c.latency_ns["all"]["count"] > 0
        assert c.latency_ns["get"]["p50"] <= c.latency_ns["get"]["p99"]
    assert any("1 process only" in n for n in out.notes)


@pytest.mark.multiprocess
@pytest.mark.bench
def test_shared_backends_see_one_store_across_workers() -> None:
    # Workers only read; the fill ran in the parent, so hits prove the workers share its store.
    w = Workload(keys=300, ops=2000, duration=None, mix=Mix.parse("get=1"))
    out = run_benchmark(w, ["shmkv", "lmdb", "diskcache"], [2], small_config(keys=300))
    assert not out.failed
    for c in out.cells:
        assert c.hit_ratio == 1.0, c.backend


def test_unavailable_backend_is_skipped_with_its_reason() -> None:
    w = Workload(keys=10, ops=10, duration=None)
    out = run_benchmark(w, ["dict"], [2], small_config(keys=10))
    assert out.skipped == [("dict", "runs at 1 process only; asked for [2]")]
    out = run_benchmark(w, ["lmdb"], [1], small_config(keys=10, capacity=1 << 20))
    assert out.skipped and "bound its memory" in out.skipped[0][1]


def test_harness_cost_per_call_is_measured_and_small() -> None:
    ns = harness_ns_per_call(0.05)
    assert 1 < ns < 5_000


@pytest.mark.multiprocess
@pytest.mark.bench
def test_eviction_run_counts_refused_writes_instead_of_failing() -> None:
    # An eviction run (a capacity) counts StoreFull per worker and sums it into the cell, so
    # the report can say how many writes were refused; here, with room to evict, none.
    w = Workload(
        keys=60_000, key_size=16, ops=20_000, duration=None, mix=Mix.parse("get=50,put=50")
    )
    out = run_benchmark(w, ["shmkv"], [2], small_config(keys=w.keys, capacity=4 << 20))
    assert not out.failed, out.failed
    (cell,) = out.cells
    assert cell.counters == {"store_full": 0}
    assert cell.hit_ratio is not None and cell.hit_ratio < 1.0  # it did evict
