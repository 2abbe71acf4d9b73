"""The core speed report: the fixed set of numbers the shared-memory core is judged by.

1. Plain Python loop, 100,000 keys of 16 B, uniform keys, values of 100 B and 1 KiB: get and
   put ops/s for shmkv at 1 and 2 processes, beside a ``dict`` (1 process) and LMDB
   (writemap, sync=False, metasync=False) at 1 and 2 processes, in the same run.
2. ``get_many`` / ``put_many`` of 100 keys against the per-key loop (1 process).
3. Bytes of store per item at 100 B and 1 KiB values (see ``memory.py``), beside LMDB,
   memcached and Redis where installed.

Printed as Markdown (for an issue or bench/RESULTS.md); ``--json`` keeps every raw report.
Run: ``python bench/core_ops.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import sys
import time
import uuid
from typing import Any

import click

from .adapters import BackendConfig
from .cli import _sigterm
from .memory import MemoryResult, measure
from .progress import LineProgress
from .report import build_report, command_line, fmt_ratio, fmt_us, machine_info, package_versions
from .runner import NullProgress, run_benchmark
from .workload import KeyDist, Mix, SizeDist, Workload, format_size

KEYS = 100_000
KEY_SIZE = 16
VALUE_SIZES = (100, 1024)
BACKENDS = ("shmkv", "dict", "lmdb")
MEMORY_CAPACITY = 64 << 20


def _workload(value_size: int, op: str, batch: int, duration: float) -> Workload:
    return Workload(
        keys=KEYS,
        key_size=KEY_SIZE,
        value_size=SizeDist("fixed", (value_size,)),
        mix=Mix.parse(f"{op}=100"),
        dist=KeyDist("uniform"),
        batch=batch,
        duration=duration,
    )


def run(duration: float, repeat: int, memory: bool, quiet: bool) -> dict[str, Any]:
    """Every workload of the report; returns ``{"speed": [...], "memory": [...], ...}``."""
    progress = NullProgress() if quiet else LineProgress(sys.stderr)
    machine = machine_info()
    started = dt.datetime.now(dt.timezone.utc)
    speed: list[dict[str, Any]] = []
    for vs in VALUE_SIZES:
        for batch, procs in ((1, [1, 2]), (100, [1])):
            for op in ("get", "put"):
                w = _workload(vs, op, batch, duration)
                cfg = BackendConfig(
                    keys=KEYS, key_size=KEY_SIZE, item_bytes=w.item_bytes,
                    max_item_bytes=KEY_SIZE + vs, run_id=uuid.uuid4().hex[:8],
                )  # fmt: skip
                progress.note(f"-- {w.describe()}")
                t0 = time.monotonic()
                out = run_benchmark(w, BACKENDS, procs, cfg, repeat, progress)
                rep = build_report(
                    w, out, procs, command=command_line(), started=started,
                    seconds=time.monotonic() - t0, machine=machine,
                )  # fmt: skip
                rep["core"] = {"value_size": vs, "op": op, "batch": batch}
                speed.append(rep)
    mem: list[MemoryResult] = []
    mem_skipped: list[tuple[str, str]] = []
    if memory:
        progress.note("-- memory per item")
        mem, mem_skipped = measure(list(VALUE_SIZES), MEMORY_CAPACITY)
    return {
        "schema": "shmkv-bench-core/1",
        "command": command_line(),
        "started": started.isoformat(timespec="seconds"),
        "machine": machine,
        "versions": package_versions(),
        "duration": duration,
        "repeat": repeat,
        "speed": speed,
        "memory": [m.to_json() for m in mem],
        "memory_skipped": [{"backend": b, "reason": r} for b, r in mem_skipped],
    }


def _row(rep: dict[str, Any], backend: str, procs: int) -> dict[str, Any] | None:
    return next(
        (r for r in rep["results"] if r["backend"] == backend and r["procs"] == procs), None
    )


def _rate(r: dict[str, Any] | None) -> str:
    return "-" if r is None else f"{r['ops_per_s']:,.0f}"


def _lat(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    a = r["latency_ns"]["all"]
    return f"{fmt_us(a.get('p50'))} / {fmt_us(a.get('p99'))} / {fmt_us(a.get('p99.9'))}"


def _div(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if a is None or b is None or not b["ops_per_s"]:
        return "-"
    return fmt_ratio(a["ops_per_s"] / b["ops_per_s"])


def render_markdown(doc: dict[str, Any]) -> str:
    m, v = doc["machine"], doc["versions"]
    runs = (
        f"median of {doc['repeat']} runs of {doc['duration']:g} s"
        if doc["repeat"] > 1
        else f"one run of {doc['duration']:g} s"
    )
    out = [
        "## shmkv core speed report",
        "",
        f"`{doc['command']}` — {doc['started']}",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('os')}, {m.get('python')}; "
        f"load average at start {m.get('loadavg_start', ['?'])[0]}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        f"### Plain Python loop: {KEYS:,} keys of {KEY_SIZE} B, uniform keys (ops/s, {runs})",
        "",
        "Every key was written before the timed run, so every get hits. `dict` is one process's "
        "private dict (the in-process bound); LMDB is opened with writemap=True, sync=False, "
        "metasync=False and uses one transaction per op. Latency: every 16th call timed, "
        "p50 / p99 / p99.9 in µs.",
        "",
        f"Harness: {doc['speed'][0].get('harness_ns_per_call') or 0:.0f} ns per call of the timed loop "
        "itself (a no-op through the same loop), which bounds the dict column.",
        "",
        "| value | op | procs | shmkv | dict | LMDB | shmkv ÷ dict | shmkv ÷ LMDB | shmkv µs p50/p99/p99.9 | LMDB µs p50/p99/p99.9 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    loops = [r for r in doc["speed"] if r["core"]["batch"] == 1]
    for rep in loops:
        c = rep["core"]
        for procs in rep["procs"]:
            s, d, lm = _row(rep, "shmkv", procs), _row(rep, "dict", procs), _row(rep, "lmdb", procs)
            out.append(
                f"| {format_size(c['value_size'])} | {c['op']} | {procs} | {_rate(s)} | "
                f"{_rate(d) if procs == 1 else '(1 process only)'} | {_rate(lm)} | {_div(s, d)} | "
                f"{_div(s, lm)} | {_lat(s)} | {_lat(lm)} |"
            )
    out += [
        "",
        "### Batches of 100 keys against the per-key loop, 1 process (keys/s)",
        "",
        "`get_many`/`put_many` for shmkv; one transaction of 100 ops for LMDB; a comprehension "
        "/ `dict.update` for dict. Latency is per call of 100 keys.",
        "",
        "| value | op | shmkv loop | shmkv batch | batch ÷ loop | shmkv batch µs p50/p99/p99.9 | LMDB loop | LMDB batch | dict batch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rep in (r for r in doc["speed"] if r["core"]["batch"] > 1):
        c = rep["core"]
        loop = next(
            (
                x
                for x in loops
                if x["core"]["value_size"] == c["value_size"] and x["core"]["op"] == c["op"]
            ),
            None,
        )
        sl = _row(loop, "shmkv", 1) if loop else None
        ll = _row(loop, "lmdb", 1) if loop else None
        sb, lb, db = _row(rep, "shmkv", 1), _row(rep, "lmdb", 1), _row(rep, "dict", 1)
        out.append(
            f"| {format_size(c['value_size'])} | {c['op']}_many | {_rate(sl)} | {_rate(sb)} | "
            f"{_div(sb, sl)} | {_lat(sb)} | {_rate(ll)} | {_rate(lb)} | {_rate(db)} |"
        )
    skipped = {s["backend"]: s["reason"] for rep in doc["speed"] for s in rep["skipped"]}
    failed = {f["backend"]: f["error"] for rep in doc["speed"] for f in rep["failed"]}
    out += (
        [""]
        + [f"skipped {b}: {r}" for b, r in skipped.items()]
        + [f"FAILED {b}: {e}" for b, e in failed.items()]
    )
    if doc["memory"]:
        out += [
            f"### Memory: bytes of store per item ({MEMORY_CAPACITY >> 20} MiB store, {KEY_SIZE} B keys)",
            "",
            "shmkv, memcached and Redis: capacity ÷ items held at the first eviction (every "
            "overhead counted). LMDB cannot evict: used pages ÷ items, filled with as many items "
            "as shmkv held. Payload = key + value bytes.",
            "",
            "| value | payload | shmkv | memcached (-m) | Redis (maxmemory) | LMDB (used pages) | shmkv items held |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for vs in VALUE_SIZES:
            by = {r["backend"]: r for r in doc["memory"] if r["value_size"] == vs}

            def cell(name: str, by: dict[str, Any] = by) -> str:
                return f"{by[name]['bytes_per_item']:,.0f} B" if name in by else "-"

            held = f"{by['shmkv']['items']:,}" if "shmkv" in by else "-"
            out.append(
                f"| {format_size(vs)} | {KEY_SIZE + vs} B | {cell('shmkv')} | {cell('memcached')} | "
                f"{cell('redis')} | {cell('lmdb')} | {held} |"
            )
        for s in doc["memory_skipped"]:
            out.append(f"\nmemory: skipped {s['backend']}: {s['reason']}")
    return "\n".join(out).rstrip() + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--duration", "-t", type=float, default=2.0, show_default=True, help="Seconds per run."
)
@click.option(
    "--repeat", "-r", type=int, default=1, show_default=True, help="Runs per cell (median)."
)
@click.option(
    "--memory/--no-memory", default=True, show_default=True, help="Measure bytes per item."
)
@click.option("--json", "json_path", default=None, help="Also write every raw report to FILE.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
def main(duration: float, repeat: int, memory: bool, json_path: str | None, quiet: bool) -> None:
    """The core speed report: shmkv get/put beside dict and LMDB, batches, bytes per item."""
    old = signal.signal(signal.SIGTERM, _sigterm)  # unwind like Ctrl-C: stores torn down
    try:
        doc = run(duration, repeat, memory, quiet)
    except KeyboardInterrupt:
        print("\ninterrupted: stores and servers cleaned up", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, old)
    sys.stdout.write(render_markdown(doc))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")


if __name__ == "__main__":  # pragma: no cover
    main()
