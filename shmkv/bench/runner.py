"""Runs a workload against each backend at each process count, and times it.

In the parent, every backend is ``setup()`` and filled once (shared backends) first; then, for
each repeat, each process count, each backend in turn, one *cell run*: N workers started with
the ``spawn`` context (a fresh interpreter: no inherited handles, locks or shared-memory
mappings), each of which opens the backend itself, builds its op stream, and waits at a barrier
with the parent. After the barrier every worker runs its timed loop for the same duration (or op
count) and sends back its counts and sampled latencies. ``teardown()`` always runs, also on an
error or Ctrl-C.

Timing contract:

- Throughput of a cell run = keys done by all workers / (last worker's end - first worker's
  start), on ``perf_counter_ns`` (CLOCK_MONOTONIC: one clock for all processes on Linux).
- Every ``SAMPLE_EVERY``-th call is timed alone with ``perf_counter_ns``; those samples are the
  latency percentiles. A batched call (``get_many`` of 100 keys) is one sample.
- The loop calls ``functools.partial`` objects prebuilt over the adapter's bound ops, so every
  backend pays the same small harness cost per call, and a backend whose op is a C method
  (shmkv, dict) pays no Python wrapper.
- ``gc.freeze()`` after building the stream keeps the collector from rescanning it.

A backend that fails mid-run is recorded with its error and the run goes on to the next one.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import time
import traceback
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import cycle
from threading import BrokenBarrierError
from typing import Any, Protocol

from . import adapters
from .adapters.base import Adapter, BackendConfig
from .stats import median, summarize
from .workload import GET, OP_NAMES, PUT, SCAN, OpStream, Workload, build_stream, fill_batches

SAMPLE_EVERY = 16
# Calls between two deadline checks (and progress updates) in the timed loop.
CHECK_EVERY = 1024
# Seconds a worker may take from spawn to the barrier (import, open, in-process fill, stream).
READY_TIMEOUT = 120.0
# Seconds past the planned end before a cell run is declared hung.
HANG_GRACE = 60.0
# An op-count run has no planned end: it may take at most this long.
OPS_RUN_LIMIT = 600.0


class WorkerFailed(RuntimeError):
    """A worker raised or died; the message has its traceback or exit code."""


@dataclass
class WorkerResult:
    """What one worker sends back. ``lat[code]`` is ``array('q')`` bytes of sampled ns."""

    index: int
    calls: int = 0
    keys: int = 0
    start_ns: int = 0
    end_ns: int = 0
    lat: list[bytes] = field(default_factory=list)
    hits: int = 0
    asked: int = 0
    error: str | None = None
    counters: dict[str, int] = field(default_factory=dict)  # Adapter.counters()


@dataclass
class CellResult:
    """One backend at one process count, over all repeats."""

    backend: str
    procs: int
    runs: list[dict[str, Any]]
    latency_ns: dict[str, dict[str, int]]
    hit_ratio: float | None
    counters: dict[str, int] = field(default_factory=dict)  # summed over workers and runs

    @property
    def ops_per_s(self) -> float:
        """Median over repeats of keys per second."""
        return median([r["ops_per_s"] for r in self.runs])


@dataclass
class Outcome:
    """Everything a report needs from a run."""

    cells: list[CellResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)
    fill_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    harness_ns: float | None = None


class Progress(Protocol):
    """Where the runner reports what it is doing (see ``progress.py``)."""

    def begin(self, backend: str, procs: int, repeat: int, repeats: int) -> None: ...

    def update(self, keys_done: int, elapsed: float, planned: float | None) -> None: ...

    def end(self, ops_per_s: float) -> None: ...

    def note(self, message: str) -> None: ...


class NullProgress:
    def begin(self, backend: str, procs: int, repeat: int, repeats: int) -> None:
        pass

    def update(self, keys_done: int, elapsed: float, planned: float | None) -> None:
        pass

    def end(self, ops_per_s: float) -> None:
        pass

    def note(self, message: str) -> None:
        pass


# -- the worker side ---------------------------------------------------------------------------


Block = tuple[int, Callable[[], Any], tuple[Callable[[], Any], ...]]


def bind_stream(adapter: Adapter, stream: OpStream) -> list[list[Block]]:
    """The stream as segments of blocks ``(code of first call, first call, other calls)``.

    Each block has ``SAMPLE_EVERY`` calls (the last may have fewer); the first is the sampled
    one. REQUIRES: adapter open.
    """
    if stream.keys_per_op == 1:
        fns: tuple[Callable[..., Any], ...] = (
            adapter.get,
            adapter.put,
            adapter.delete,
            adapter.incr,
            adapter.scan,
        )
    else:
        fns = (adapter.get_many, adapter.put_many, adapter.delete_many, adapter.incr, adapter.scan)
    calls: list[Callable[[], Any]] = []
    codes: list[int] = []
    for code, arg in stream.ops:
        fn = fns[code]
        calls.append(
            partial(fn, *arg)
            if code in (PUT, SCAN) and stream.keys_per_op == 1
            else partial(fn, arg)
        )
        codes.append(code)
    blocks: list[Block] = [
        (codes[i], calls[i], tuple(calls[i + 1 : i + SAMPLE_EVERY]))
        for i in range(0, len(calls), SAMPLE_EVERY)
    ]
    per_segment = max(1, CHECK_EVERY // SAMPLE_EVERY)
    return [blocks[i : i + per_segment] for i in range(0, len(blocks), per_segment)]


def timed_loop(
    segments: Sequence[Sequence[Block]],
    keys_per_call: int,
    duration: float | None,
    max_calls: int | None,
    counter: Any = None,
    index: int = 0,
) -> WorkerResult:
    """Run ``segments`` cyclically until ``duration`` seconds or at least ``max_calls`` calls.

    ``counter[index]``, if given, is updated with keys done after each segment (progress).
    """
    pc = time.perf_counter_ns
    lat = [array("q") for _ in OP_NAMES]
    append = [a.append for a in lat]
    sizes = [sum(1 + len(rest) for _, _, rest in seg) for seg in segments]
    hits = asked = calls = 0
    start = pc()
    deadline = start + int(duration * 1e9) if duration is not None else None
    limit = max_calls if max_calls is not None else -1
    for seg, size in cycle(zip(segments, sizes, strict=True)):
        for code, first, rest in seg:
            t0 = pc()
            r = first()
            append[code](pc() - t0)
            if code == GET:
                if keys_per_call == 1:
                    hits += r is not None
                    asked += 1
                else:
                    hits += len(r)
                    asked += keys_per_call
            for call in rest:
                call()
        calls += size
        if counter is not None:
            counter[index] = calls * keys_per_call
        if deadline is not None and pc() >= deadline:
            break
        if calls >= limit >= 0:
            break
    end = pc()
    return WorkerResult(
        index=index,
        calls=calls,
        keys=calls * keys_per_call,
        start_ns=start,
        end_ns=end,
        lat=[a.tobytes() for a in lat],
        hits=hits,
        asked=asked,
    )


def harness_ns_per_call(seconds: float = 0.2) -> float:
    """Nanoseconds per call of the timed loop itself: a C no-op (``bool(key)``) driven exactly
    like a backend's ops, in this process. It bounds what any row can show (the dict row is
    close to it), so the report prints it."""
    keys = [b"k%015d" % i for i in range(4096)]
    calls = [partial(bool, k) for k in keys]
    blocks: list[Block] = [
        (GET, calls[i], tuple(calls[i + 1 : i + SAMPLE_EVERY]))
        for i in range(0, len(calls), SAMPLE_EVERY)
    ]
    per = CHECK_EVERY // SAMPLE_EVERY
    r = timed_loop([blocks[i : i + per] for i in range(0, len(blocks), per)], 1, seconds, None)
    return (r.end_ns - r.start_ns) / r.calls


def fill(adapter: Adapter, workload: Workload) -> float:
    """Write every key once with ``put_many`` batches; returns the seconds it took.

    REQUIRES: adapter open."""
    t0 = time.perf_counter()
    for batch in fill_batches(workload):
        adapter.put_many(batch)
    return time.perf_counter() - t0


def _work(
    adapter: Adapter, workload: Workload, index: int, barrier: Any, counter: Any
) -> WorkerResult:
    adapter.open()
    try:
        if not adapter.shared and workload.fill:
            fill(adapter, workload)
        stream = build_stream(workload, index)
        segments = bind_stream(adapter, stream)
        max_calls = None
        if workload.ops is not None:
            max_calls = -(-workload.ops // stream.keys_per_op)
        gc.collect()
        gc.freeze()
        barrier.wait(READY_TIMEOUT)
        result = timed_loop(
            segments, stream.keys_per_op, workload.duration, max_calls, counter, index
        )
        result.counters = adapter.counters()
        return result
    finally:
        adapter.close()


def worker_main(
    adapter: Adapter, workload: Workload, index: int, barrier: Any, counter: Any, conn: Any
) -> None:
    """Entry point of a spawned worker: always sends one WorkerResult (maybe with ``error``)."""
    try:
        result = _work(adapter, workload, index, barrier, counter)
    except BaseException:  # noqa: BLE001 -- reported to the parent, which decides
        result = WorkerResult(index=index, error=traceback.format_exc(limit=8))
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001 -- the parent may be gone already
            pass
    try:
        conn.send(result)
    except (BrokenPipeError, OSError):
        pass
    finally:
        conn.close()


# -- the parent side ---------------------------------------------------------------------------


def run_cell(
    adapter: Adapter,
    workload: Workload,
    procs: int,
    progress: Progress,
    ctx: Any = None,
) -> list[WorkerResult]:
    """One timed run of ``procs`` workers. :raises WorkerFailed: a worker raised or died."""
    ctx = ctx or multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs + 1)
    counter = ctx.RawArray("q", procs)
    pipes = [ctx.Pipe(duplex=False) for _ in range(procs)]
    workers = [
        ctx.Process(
            target=worker_main,
            args=(adapter, workload, i, barrier, counter, pipes[i][1]),
            name=f"shmkv-bench-{adapter.name}-{i}",
            daemon=True,
        )
        for i in range(procs)
    ]
    results: dict[int, WorkerResult] = {}
    try:
        for w in workers:
            w.start()
        for _, send in pipes:
            send.close()
        try:
            barrier.wait(READY_TIMEOUT)
        except BrokenBarrierError:
            _collect(pipes, workers, results, deadline=time.monotonic() + 10)
            raise WorkerFailed(
                _errors(results, workers) or "a worker did not reach the start barrier"
            ) from None
        t0 = time.monotonic()
        planned = workload.duration
        deadline = t0 + (planned + HANG_GRACE if planned is not None else OPS_RUN_LIMIT)
        while len(results) < procs:
            _collect(pipes, workers, results, deadline=time.monotonic() + 0.25)
            progress.update(sum(counter), time.monotonic() - t0, planned)
            if time.monotonic() > deadline:
                raise WorkerFailed(f"workers still running {deadline - t0:.0f} s after the start")
            dead = [w for i, w in enumerate(workers) if i not in results and w.exitcode is not None]
            if dead:
                _collect(pipes, workers, results, deadline=time.monotonic() + 1)
                if len(results) < procs:
                    raise WorkerFailed(
                        f"worker {dead[0].name} died with exit code {dead[0].exitcode}"
                    )
        msg = _errors(results, workers)
        if msg:
            raise WorkerFailed(msg)
        return [results[i] for i in range(procs)]
    finally:
        for w in workers:
            if w.pid is None:
                continue
            w.join(5)
            if w.is_alive():
                w.terminate()
                w.join(5)
            if w.is_alive():
                w.kill()
                w.join()
            w.close()
        for recv, _ in pipes:
            recv.close()


def _collect(
    pipes: list[tuple[Any, Any]],
    workers: list[Any],
    results: dict[int, WorkerResult],
    deadline: float,
) -> None:
    """Receive what has arrived (waiting until ``deadline`` for at least something)."""
    pending = {pipes[i][0]: i for i in range(len(pipes)) if i not in results}
    while pending:
        ready = multiprocessing.connection.wait(
            list(pending), max(0.0, deadline - time.monotonic())
        )
        if not ready:
            return
        for conn in ready:
            i = pending.pop(conn)
            try:
                results[i] = conn.recv()  # type: ignore[union-attr,call-arg,assignment]
            except EOFError:
                results[i] = WorkerResult(index=i, error=f"worker {i} exited without a result")
        if time.monotonic() >= deadline:
            return


def _errors(results: dict[int, WorkerResult], workers: list[Any]) -> str:
    errs = [r.error for r in results.values() if r.error]
    return errs[0].strip() if errs else ""


def cell_from_runs(backend: str, procs: int, runs: list[list[WorkerResult]]) -> CellResult:
    """Merge repeats of one cell: median-able per-run throughputs, pooled latency samples."""
    run_stats = []
    pooled: list[array[int]] = [array("q") for _ in OP_NAMES]
    hits = asked = 0
    counters: dict[str, int] = {}
    for workers in runs:
        keys = sum(w.keys for w in workers)
        seconds = (max(w.end_ns for w in workers) - min(w.start_ns for w in workers)) / 1e9
        run_stats.append(
            {
                "ops": keys,
                "seconds": round(seconds, 6),
                "ops_per_s": keys / seconds if seconds > 0 else 0.0,
                "per_process_ops_per_s": [
                    w.keys / ((w.end_ns - w.start_ns) / 1e9) if w.end_ns > w.start_ns else 0.0
                    for w in workers
                ],
            }
        )
        for w in workers:
            for code, raw in enumerate(w.lat):
                pooled[code].frombytes(raw)
            hits += w.hits
            asked += w.asked
            for k, n in w.counters.items():
                counters[k] = counters.get(k, 0) + n
    latency = {
        name: summarize(pooled[code]) for code, name in enumerate(OP_NAMES) if len(pooled[code])
    }
    latency["all"] = summarize(x for a in pooled for x in a)
    return CellResult(backend, procs, run_stats, latency, hits / asked if asked else None, counters)


def run_benchmark(
    workload: Workload,
    backends: Sequence[str],
    procs_list: Sequence[int],
    config: BackendConfig,
    repeat: int = 1,
    progress: Progress | None = None,
) -> Outcome:
    """Run every (backend, process count) cell ``repeat`` times. Never raises for a backend's
    failure (recorded in ``Outcome.failed``); Ctrl-C stops the run after teardown.

    Every backend is set up and filled first, then the cells are interleaved: for each repeat,
    for each process count, each backend in turn. Load from outside the benchmark drifts over
    a run; interleaving spreads it over all backends instead of charging it to whichever ran
    while it peaked. (Rejected: one backend at a time, which kept one server up at a time but
    made ratios depend on when each backend happened to run.)
    """
    progress = progress or NullProgress()
    out = Outcome()
    out.harness_ns = round(harness_ns_per_call(), 1)
    ctx = multiprocessing.get_context("spawn")
    ready: list[Adapter] = []
    runs: dict[tuple[str, int], list[list[WorkerResult]]] = {}
    try:
        for name in backends:
            adapter = adapters.make(name, config)
            reason = adapter.unavailable()
            if reason is None and workload.mix.scan and not adapter.scans:
                reason = "no ordered scan (a --mix with scan needs one)"
            if (
                reason is None
                and adapter.max_procs is not None
                and min(procs_list) > adapter.max_procs
            ):
                reason = f"runs at {adapter.max_procs} process only; asked for {list(procs_list)}"
            if reason:
                out.skipped.append((name, reason))
                progress.note(f"skipped {name}: {reason}")
                continue
            if adapter.max_procs is not None and max(procs_list) > adapter.max_procs:
                out.notes.append(f"{name}: {adapter.label}")
            try:
                adapter.setup()
                ready.append(adapter)
                out.info[name] = adapter.describe()
                if adapter.shared and workload.fill:
                    with adapter:
                        out.fill_seconds[name] = round(fill(adapter, workload), 3)
            except Exception as e:  # noqa: BLE001 -- one backend's failure is a result
                _fail(out, progress, name, e)
        failed: set[str] = {name for name, _ in out.failed}
        for rep in range(repeat):
            for procs in procs_list:
                for adapter in ready:
                    name = adapter.name
                    if name in failed or (
                        adapter.max_procs is not None and procs > adapter.max_procs
                    ):
                        continue
                    progress.begin(name, procs, rep + 1, repeat)
                    try:
                        workers = run_cell(adapter, workload, procs, progress, ctx)
                    except Exception as e:  # noqa: BLE001 -- one backend's failure is a result
                        _fail(out, progress, name, e)
                        failed.add(name)
                        continue
                    runs.setdefault((name, procs), []).append(workers)
                    progress.end(cell_from_runs(name, procs, [workers]).ops_per_s)
    finally:
        for adapter in reversed(ready):
            adapter.teardown()
    out.cells = [cell_from_runs(name, procs, rs) for (name, procs), rs in runs.items()]
    return out


def _fail(out: Outcome, progress: Progress, name: str, e: BaseException) -> None:
    text = str(e).strip()
    msg = text.splitlines()[-1] if text else type(e).__name__
    out.failed.append((name, msg))
    progress.note(f"{name} failed: {msg}")


__all__ = [
    "CellResult",
    "Outcome",
    "WorkerResult",
    "WorkerFailed",
    "bind_stream",
    "timed_loop",
    "fill",
    "run_cell",
    "run_benchmark",
    "cell_from_runs",
]
