"""``shmkv-bench``: is shmkv worth switching to? Measure it against the alternatives, here.

With no arguments: 10,000 keys of 16 B with 100 B values, 90% get / 10% put, uniform keys,
2 s per run at 1 and 2 processes, against every peer that is installed; under a minute on two
cores. Prints the table to stdout (or stderr when ``--json -`` takes stdout).

Exit status: 0 when every backend that could run ran; 1 when one failed during the run
(the table still shows the others); 2 on bad arguments.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import sys
import time
import uuid
from types import FrameType
from typing import Any

import click

from .adapters import NAMES, BackendConfig
from .progress import LineProgress
from .report import (
    build_report,
    command_line,
    machine_info,
    render_table,
    validate,
    write_plot,
)
from .runner import NullProgress, run_benchmark
from .workload import KeyDist, Mix, SizeDist, Workload, parse_size

DEFAULT_DURATION = 2.0


def parse_procs(text: str) -> list[int]:
    """``1,2,4`` or ``1-4`` / ``1..4`` (every count in the range). :raises ValueError:"""
    out: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:(?:-|\.\.)\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"bad process count {part!r}: expected e.g. 1,2,4 or 1-4")
        lo = int(m.group(1))
        hi = int(m.group(2) or lo)
        if lo < 1 or hi < lo:
            raise ValueError(f"bad process range {part!r}")
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


def parse_backends(text: str) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}: choose from {', '.join(NAMES)}")
    return sorted(set(names), key=NAMES.index)


def _convert(fn: Any, value: Any, name: str) -> Any:
    try:
        return fn(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=name) from None


def _sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into the same unwinding as Ctrl-C, so servers and stores are torn down.
    raise KeyboardInterrupt


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--backends",
    "-b",
    default=",".join(NAMES),
    show_default=True,
    help="Comma-separated backends to run.",
)
@click.option("--keys", "-n", type=int, default=10_000, show_default=True, help="Distinct keys.")
@click.option("--key-size", type=int, default=16, show_default=True, help="Bytes per key.")
@click.option(
    "--value-size",
    "-s",
    default="100",
    show_default=True,
    help="Value bytes: 100 | 100-10KiB (uniform) | 100:70,1KiB:20,10KiB:10 (weighted).",
)
@click.option(
    "--mix",
    "-m",
    default="get=90,put=10",
    show_default=True,
    help="Op shares, of get, put, delete, incr, scan (incr stores decimal counters; scan "
    "reads --scan-length pairs in key order: shmkv, shmkv-btree, lmdb).",
)
@click.option(
    "--scan-length",
    type=int,
    default=100,
    show_default=True,
    help="Pairs read by each scan op of the mix.",
)
@click.option(
    "--dist",
    "-d",
    default="uniform",
    show_default=True,
    help="Key distribution: uniform | zipf | zipf:S (S = exponent, default 0.99).",
)
@click.option(
    "--procs",
    "-p",
    default="1,2",
    show_default=True,
    help="Process counts: 1,2,4 or 1-4. dict runs at 1 only.",
)
@click.option(
    "--duration",
    "-t",
    type=float,
    default=None,
    help=f"Seconds per run [default: {DEFAULT_DURATION:g}].",
)
@click.option(
    "--ops", type=int, default=None, help="Ops per process per run, instead of --duration."
)
@click.option(
    "--batch",
    type=int,
    default=1,
    show_default=True,
    help="Keys per call: >1 uses get_many/put_many/delete_many (MGET/MSET for Redis).",
)
@click.option(
    "--fill/--no-fill",
    default=True,
    show_default=True,
    help="Write every key once before the timed runs.",
)
@click.option(
    "--capacity",
    default=None,
    help="Store size, e.g. 64MiB: shmkv segment, memcached -m, Redis maxmemory "
    "(allkeys-lru), diskcache size_limit. Backends that cannot evict are skipped.",
)
@click.option(
    "--repeat",
    "-r",
    type=int,
    default=1,
    show_default=True,
    help="Runs per cell; ops/s is their median.",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--json", "json_path", default=None, help="Write the JSON report to FILE ('-' = stdout)."
)
@click.option(
    "--plot", "plot_path", default=None, help="Write throughput vs processes to FILE.png."
)
@click.option(
    "--redis-url",
    default=None,
    help="Use this Redis instead of a private redis-server (its workload keys are "
    "overwritten, then deleted: use a scratch database).",
)
@click.option(
    "--memcached",
    "memcached_addr",
    default=None,
    help="Use this memcached HOST:PORT instead of a private one.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress line.")
def main(
    backends: str,
    keys: int,
    key_size: int,
    value_size: str,
    mix: str,
    scan_length: int,
    dist: str,
    procs: str,
    duration: float | None,
    ops: int | None,
    batch: int,
    fill: bool,
    capacity: str | None,
    repeat: int,
    seed: int,
    json_path: str | None,
    plot_path: str | None,
    redis_url: str | None,
    memcached_addr: str | None,
    quiet: bool,
) -> None:
    """Measure shmkv against the stores a Python user would pick instead, in one run.

    Every backend gets the same workload, filled first, then timed at each process count with
    the workers started together; the table gives ops/s, p50/p99/p99.9 latency and each
    backend's ratio to shmkv. Missing peers are skipped with a reason
    (pip install 'shmkv[bench]'; apt-get install redis-server memcached).
    """
    if duration is not None and ops is not None:
        raise click.UsageError("give --duration or --ops, not both")
    if duration is None and ops is None:
        duration = DEFAULT_DURATION
    if repeat < 1:
        raise click.BadParameter("must be >= 1", param_hint="--repeat")
    workload = _convert(
        lambda _: Workload(
            keys=keys,
            key_size=key_size,
            value_size=SizeDist.parse(value_size),
            mix=Mix.parse(mix),
            dist=KeyDist.parse(dist),
            batch=batch,
            duration=duration,
            ops=ops,
            fill=fill,
            seed=seed,
            scan_length=scan_length,
        ),
        None,
        "workload",
    )
    procs_list = _convert(parse_procs, procs, "--procs")
    names = _convert(parse_backends, backends, "--backends")
    cap = _convert(parse_size, capacity, "--capacity") if capacity else None
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError("--plot needs matplotlib: pip install 'shmkv[bench]'") from None

    out = sys.stderr if json_path == "-" else sys.stdout
    config = BackendConfig(
        keys=workload.keys,
        key_size=workload.key_size,
        item_bytes=workload.item_bytes,
        max_item_bytes=workload.key_size + workload.value_size.max_size,
        capacity=cap,
        redis_url=redis_url,
        memcached_addr=memcached_addr,
        run_id=uuid.uuid4().hex[:8],
    )
    progress = NullProgress() if quiet else LineProgress(sys.stderr)
    started = dt.datetime.now(dt.timezone.utc)
    machine = machine_info()  # before the run: its load average is the load we started under
    t0 = time.monotonic()
    print(f"shmkv-bench: {workload.describe()}; processes {procs_list}", file=sys.stderr)
    old = signal.signal(signal.SIGTERM, _sigterm)
    try:
        outcome = run_benchmark(workload, names, procs_list, config, repeat, progress)
    except KeyboardInterrupt:
        print("\ninterrupted: servers and stores cleaned up", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, old)
    report = build_report(
        workload,
        outcome,
        procs_list,
        command=command_line(),
        started=started,
        seconds=time.monotonic() - t0,
        machine=machine,
    )
    validate(report)
    print(render_table(report), file=out)
    if json_path:
        text = json.dumps(report, indent=2)
        if json_path == "-":
            sys.stdout.write(text + "\n")
        else:
            with open(json_path, "w") as f:
                f.write(text + "\n")
            print(f"JSON report: {os.path.abspath(json_path)}", file=sys.stderr)
    if plot_path:
        write_plot(report, plot_path)
        print(f"plot: {os.path.abspath(plot_path)}", file=sys.stderr)
    if outcome.failed:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
