"""The results of a run: the JSON document, the table, the ratios to shmkv and the plot.

The JSON document (``--json``) is the source of truth; the table and the plot are drawn from it,
so what a person reads and what a machine reads cannot disagree. Its shape (``SCHEMA``)::

    {"schema": "shmkv-bench/1", "command": str, "started": iso, "seconds": float,
     "machine": {...}, "versions": {...}, "workload": {...}, "procs": [int],
     "results": [{"backend", "procs", "ops_per_s", "ratio_to_shmkv", "hit_ratio",
                  "counters": {name: int} (e.g. shmkv's "store_full" in eviction runs),
                  "runs": [{"ops", "seconds", "ops_per_s", "per_process_ops_per_s"}],
                  "latency_ns": {"all"|"get"|...: {"count", "p50", "p99", "p99.9", "max"}}}],
     "skipped": [{"backend", "reason"}], "failed": [{"backend", "error"}],
     "backends": {name: description}, "fill_seconds": {name: s}, "notes": [str]}

``ops_per_s`` is keys per second, the median over repeats; ``ratio_to_shmkv`` is this row's
``ops_per_s`` divided by shmkv's at the same process count (``null`` without a shmkv row).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from .adapters import NAMES, adapter_class
from .runner import Outcome
from .stats import PERCENTILES
from .workload import Workload

SCHEMA = "shmkv-bench/1"
PACKAGES = ("shmkv", "lmdb", "diskcache", "redis", "pymemcache", "matplotlib", "click")


def machine_info() -> dict[str, Any]:
    """Facts that decide how far numbers travel: CPU, cores, memory, OS, Python, load."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }
    if hasattr(os, "sched_getaffinity"):
        info["cores_usable"] = len(os.sched_getaffinity(0))
    try:
        import psutil

        info["memory_bytes"] = psutil.virtual_memory().total
    except ImportError:  # pragma: no cover -- psutil is a dependency
        pass
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
            if name == "shmkv":  # a source tree with the extension built in place
                import shmkv

                out[name] = f"{shmkv.__version__} (source tree)"
    return out


def _order(backend: str) -> int:
    return NAMES.index(backend) if backend in NAMES else len(NAMES)


def build_report(
    workload: Workload,
    outcome: Outcome,
    procs: Sequence[int],
    *,
    command: str,
    started: dt.datetime,
    seconds: float,
    machine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document of a run (see the module docstring)."""
    machine = dict(machine if machine is not None else machine_info())
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    shmkv_rate = {c.procs: c.ops_per_s for c in outcome.cells if c.backend == "shmkv"}
    results = []
    for c in sorted(outcome.cells, key=lambda c: (c.procs, _order(c.backend))):
        base = shmkv_rate.get(c.procs)
        results.append(
            {
                "backend": c.backend,
                "procs": c.procs,
                "ops_per_s": c.ops_per_s,
                "ratio_to_shmkv": c.ops_per_s / base if base else None,
                "hit_ratio": c.hit_ratio,
                "counters": c.counters,
                "runs": c.runs,
                "latency_ns": c.latency_ns,
            }
        )
    return {
        "schema": SCHEMA,
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "machine": machine,
        "versions": package_versions(),
        "workload": workload.to_json(),
        "workload_text": workload.describe(),
        "procs": list(procs),
        "results": results,
        "skipped": [{"backend": b, "reason": r} for b, r in outcome.skipped],
        "failed": [{"backend": b, "error": e} for b, e in outcome.failed],
        "backends": outcome.info,
        "fill_seconds": outcome.fill_seconds,
        "notes": outcome.notes,
        "harness_ns_per_call": outcome.harness_ns,
    }


_RESULT_KEYS = {
    "backend",
    "procs",
    "ops_per_s",
    "ratio_to_shmkv",
    "hit_ratio",
    "runs",
    "latency_ns",
}
_TOP_KEYS = {
    "schema",
    "command",
    "machine",
    "versions",
    "workload",
    "procs",
    "results",
    "skipped",
    "failed",
}


def validate(report: dict[str, Any]) -> None:
    """Check a report against the schema. :raises ValueError: naming the first problem."""
    if report.get("schema") != SCHEMA:
        raise ValueError(f"schema is {report.get('schema')!r}, expected {SCHEMA!r}")
    missing = _TOP_KEYS - report.keys()
    if missing:
        raise ValueError(f"report lacks {sorted(missing)}")
    for i, r in enumerate(report["results"]):
        if _RESULT_KEYS - r.keys():
            raise ValueError(f"results[{i}] lacks {sorted(_RESULT_KEYS - r.keys())}")
        if not (isinstance(r["procs"], int) and r["procs"] >= 1):
            raise ValueError(f"results[{i}].procs is {r['procs']!r}")
        if not (isinstance(r["ops_per_s"], float | int) and r["ops_per_s"] >= 0):
            raise ValueError(f"results[{i}].ops_per_s is {r['ops_per_s']!r}")
        if r["ratio_to_shmkv"] is not None and not isinstance(r["ratio_to_shmkv"], float | int):
            raise ValueError(f"results[{i}].ratio_to_shmkv is {r['ratio_to_shmkv']!r}")
        if not r["runs"]:
            raise ValueError(f"results[{i}] has no runs")
        lat = r["latency_ns"].get("all", {})
        if lat.get("count"):
            ps = [lat[k] for k, _ in PERCENTILES]
            if ps != sorted(ps) or ps[-1] > lat["max"]:
                raise ValueError(f"results[{i}] percentiles out of order: {lat}")
    for key in ("skipped", "failed"):
        for e in report[key]:
            if "backend" not in e or not ({"reason", "error"} & e.keys()):
                raise ValueError(f"{key} entry malformed: {e}")


# -- the table ---------------------------------------------------------------------------------


def fmt_us(ns: int | None) -> str:
    """Nanoseconds as microseconds with 3 significant digits (``0.412``, ``12.3``, ``1,234``)."""
    if ns is None:
        return "-"
    us = ns / 1000.0
    if us < 1:
        return f"{us:.3f}"
    if us < 10:
        return f"{us:.2f}"
    if us < 100:
        return f"{us:.1f}"
    return f"{us:,.0f}"


def fmt_ratio(r: float | None) -> str:
    """A ratio with 3 significant digits (2 below 1): ``1.68x``, ``12.4x``, ``559x``, ``0.0018x``."""
    if r is None:
        return "-"
    if r >= 100:
        return f"{r:,.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    if r >= 1:
        return f"{r:.2f}x"
    return f"{r:#.2g}x" if r > 0 else "0x"  # "#": keep trailing zeros (0.10x, not 0.1x)


def _label(backend: str) -> str:
    try:
        return adapter_class(backend).label
    except (KeyError, ImportError):
        return backend


def render_table(report: dict[str, Any]) -> str:
    """The human report: workload line, the table grouped by process count, notes, verdict."""
    m = report["machine"]
    lines = [
        f"workload: {report['workload_text']}",
        f"machine:  {m.get('cpu') or '?'}, {m.get('cores')} cores, {m.get('os')}, {m.get('python')}"
        + (f", load {m['loadavg_start'][0]} at start" if m.get("loadavg_start") else ""),
        "",
    ]
    head = f"{'backend':<10} {'procs':>5} {'ops/s':>12} {'vs shmkv':>9} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} {'hits':>5}"
    lines += [head, "-" * len(head)]
    prev = None
    for r in report["results"]:
        if prev is not None and r["procs"] != prev:
            lines.append("")
        prev = r["procs"]
        lat = r["latency_ns"].get("all", {})
        hits = "-" if r["hit_ratio"] is None else f"{100 * r['hit_ratio']:.0f}%"
        lines.append(
            f"{r['backend']:<10} {r['procs']:>5} {r['ops_per_s']:>12,.0f} {fmt_ratio(r['ratio_to_shmkv']):>9}"
            f" {fmt_us(lat.get('p50')):>8} {fmt_us(lat.get('p99')):>8} {fmt_us(lat.get('p99.9')):>9} {hits:>5}"
        )
    lines += _latency_by_op(report)
    counted = [r for r in report["results"] if r.get("counters")]
    if counted:
        lines += ["", "counted events, all runs together:"]
        for r in counted:
            text = ", ".join(f"{k} {v:,}" for k, v in r["counters"].items())
            lines.append(f"{r['backend']:<10} {r['procs']:>5} {text}")
    repeats = max((len(r["runs"]) for r in report["results"]), default=1)
    lines += [
        "",
        "ops/s: keys per second over all processes"
        + (f", median of {repeats} runs" if repeats > 1 else "")
        + "; latency: per call, 1 call in 16 sampled; hits: sampled gets that found their key.",
        "vs shmkv: this row's ops/s / shmkv's at the same process count (above 1 = faster than shmkv).",
    ]
    if report.get("harness_ns_per_call"):
        ns = report["harness_ns_per_call"]
        lines.append(
            f"harness: {ns:.0f} ns per call of the timed loop itself (a no-op through the same "
            f"loop: at most {1e9 / ns:,.0f} calls/s per process); it bounds the dict row."
        )
    names = sorted({r["backend"] for r in report["results"]}, key=_order)
    for name in names:
        desc = report.get("backends", {}).get(name)
        lines.append(f"  {name:<10} {_label(name)}" + (f" [{desc}]" if desc else ""))
    for s in report["skipped"]:
        lines.append(f"skipped {s['backend']}: {s['reason']}")
    for f in report["failed"]:
        lines.append(f"FAILED {f['backend']}: {f['error']}")
    verdict = render_verdict(report)
    if verdict:
        lines += ["", verdict]
    return "\n".join(lines)


def _latency_by_op(report: dict[str, Any]) -> list[str]:
    """For a mix of several ops: each op's p50/p99/p99.9 per row (none for a single-op mix)."""
    ops = [op for op in ("get", "put", "delete", "incr") if report["workload"]["mix"].get(op)]
    if len(ops) < 2 or not report["results"]:
        return []
    out = ["", "latency by op, us p50 / p99 / p99.9:"]
    out.append(f"{'backend':<10} {'procs':>5} " + " ".join(f"{op:<24}" for op in ops).rstrip())
    for r in report["results"]:
        cells = []
        for op in ops:
            lat = r["latency_ns"].get(op)
            cells.append(
                "-" if not lat or not lat.get("count")
                else f"{fmt_us(lat['p50'])} / {fmt_us(lat['p99'])} / {fmt_us(lat['p99.9'])}"
            )  # fmt: skip
        out.append(
            f"{r['backend']:<10} {r['procs']:>5} " + " ".join(f"{c:<24}" for c in cells).rstrip()
        )
    return out


def render_verdict(report: dict[str, Any]) -> str:
    """One line per process count: shmkv's ops/s and how many times each peer's it is."""
    out = []
    for procs in report["procs"]:
        rows = [r for r in report["results"] if r["procs"] == procs]
        base = next((r for r in rows if r["backend"] == "shmkv"), None)
        if base is None:
            continue
        peers = [r for r in rows if r["backend"] != "shmkv" and r["ops_per_s"] > 0]
        if not peers:
            continue
        parts = [f"{fmt_ratio(base['ops_per_s'] / r['ops_per_s'])} {r['backend']}" for r in peers]
        out.append(
            f"shmkv at {procs} process{'es' if procs > 1 else ''}: {base['ops_per_s']:,.0f} ops/s"
            f" = {', '.join(parts)}"
        )
    if not out:
        return ""
    return "\n".join(out)


# -- the plot ----------------------------------------------------------------------------------


def write_plot(report: dict[str, Any], path: str) -> None:
    """Throughput against process count, one line per backend, log scale, to a PNG.

    :raises ImportError: matplotlib is not installed (``pip install 'shmkv[bench]'``).
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(7, 4.5), dpi=120)
    ax = fig.add_subplot()
    for name in sorted({r["backend"] for r in report["results"]}, key=_order):
        rows = sorted(
            (r for r in report["results"] if r["backend"] == name), key=lambda r: r["procs"]
        )
        xs = [r["procs"] for r in rows]
        ys = [r["ops_per_s"] for r in rows]
        style = "-o" if name == "shmkv" else "--s" if name == "dict" else "-^"
        ax.plot(
            xs,
            ys,
            style,
            label=name + (" (1 process, not shared)" if name == "dict" else ""),
            linewidth=2.5 if name == "shmkv" else 1.2,
        )
    ax.set_yscale("log")
    ax.set_xlabel("processes")
    ax.set_ylabel("ops/s (keys per second, log scale)")
    ax.set_xticks(report["procs"])
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("shmkv-bench: " + report["workload_text"], fontsize=7, wrap=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def command_line() -> str:
    """The command as typed, for the report (``shmkv-bench`` + arguments)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv else "shmkv-bench"
    return " ".join([prog, *sys.argv[1:]])
