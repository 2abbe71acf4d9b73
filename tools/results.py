"""Rerun every bench whose figures README.md quotes, each with the command the README names.

    python tools/results.py --list                   # the runs and their commands, nothing run
    python tools/results.py                          # all of them, in order (~45 min on 2 cores)
    python tools/results.py --only tier_puts,lsm     # some of them

Each run's output goes to ``bench/results/<name>.txt``: a first line with the exact command, the
start time and the load average before and after, then what the command printed (the ``--json``
reports land beside it). The README is then updated by hand from those files -- figures only
from runs made, as same-run ratios against the peer. ``results`` is ``bench/make_results.py``,
which reruns the shmkv-bench scenarios and ``bench/core_ops.py`` and rewrites bench/RESULTS.md
itself. Keep the machine otherwise idle (say what else ran when quoting a figure).

A run that fails stops nothing: its status is written to its file and printed, and the exit status
is 1 if any failed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Bench:
    name: str
    quoted_in: str  # where the figures appear
    argv: tuple[str, ...]  # after ``python``, relative to the repository root
    also: tuple[str, ...] = ()  # commands the run makes itself (make_results.py's)

    @property
    def command(self) -> str:
        return "python " + " ".join(self.argv)


# In the README's order. The commands are the README's own (plus --json where it has one).
BENCHES: tuple[Bench, ...] = (
    Bench("results", "README 'Speed and memory'; bench/RESULTS.md (scenarios, core report)",
          ("bench/make_results.py", "--repeat", "3"),
          also=("shmkv-bench --repeat 3", "python bench/core_ops.py --repeat 3",
                "python bench/session_cache.py --repeat 3", "python bench/counters.py --repeat 3",
                "python bench/mixed_sizes.py --repeat 3",
                "python bench/eviction_churn.py --repeat 3")),
    Bench("tier", "README 'A persistent store' speed table",
          ("bench/tier_bench.py", "--spill-gb", "1", "--json", "bench/results/tier.json")),
    Bench("tier_puts", "README 'A persistent store' puts marked with a dagger",
          ("bench/tier_bench.py", "--only", "puts,fsync_procs", "--budget", "3",
           "--json", "bench/results/tier_puts.json")),
    Bench("lsm", "README 'A persistent store', the engine alone",
          ("bench/lsm_bench.py", "--json", "bench/results/lsm.json")),
    Bench("paused_writer", "bench/RESULTS.md 'A paused writer'",
          ("bench/paused_writer.py", "--pauses", "20", "--pause-s", "1", "--seconds", "32")),
    Bench("cluster", "README 'The Redis-protocol front' speed; bench/RESULTS.md 'Cluster'",
          ("bench/cluster_bench.py", "--json", "bench/results/cluster.json")),
    Bench("daemon_cpu", "README 'Where the daemon's time goes' (daemon CPU per request, 3 nodes)",
          ("bench/daemon_cpu.py", "--nodes", "3", "--requests", "40000", "--tests", "set,get")),
    Bench("daemon_cpu_1", "README 'Where the daemon's time goes' (daemon CPU per request, 1 node)",
          ("bench/daemon_cpu.py", "--nodes", "1", "--requests", "100000")),
    Bench("client_cpu", "README 'Sync client' (CPU per call); bench/RESULTS.md 'Cluster: the Python client'",
          ("bench/client_cpu.py", "--json", "bench/results/client_cpu.json")),
    Bench("cluster_local", "README 'Zero-hop local reads'; bench/RESULTS.md",
          ("bench/cluster_local.py", "--duration", "3", "--clients", "4",
           "--json", "bench/results/cluster_local.json")),
    Bench("cluster_failures", "README 'Failure handling: gossip and hinted handoff'",
          ("bench/cluster_failures.py", "--rounds", "3", "--keys", "20000")),
    Bench("cluster_faults", "README 'Failure handling' and 'Anti-entropy': issue 12's figures from one run",
          ("bench/cluster_faults.py", "--json", "bench/results/cluster_faults.json")),
    Bench("cluster_antientropy", "README 'Anti-entropy: Merkle trees, tombstones with a grace period'",
          ("bench/cluster_antientropy.py", "--keys", "1000000", "--window", "5", "--limited-window", "60",
           "--json", "bench/results/cluster_antientropy.json")),
    Bench("cluster_antientropy_bytes", "README 'Anti-entropy' (the byte limit, 4 KiB values)",
          ("bench/cluster_antientropy.py", "--keys", "50000", "--value-size", "4096", "--diff", "200",
           "--window", "5", "--limit", "bytes", "--limited-window", "20",
           "--json", "bench/results/cluster_antientropy_bytes.json")),
    Bench("btree", "README 'An ordered engine' numbers",
          ("bench/btree_bench.py", "--keys", "100000", "--seconds", "1", "--repeat", "5", "--clock", "cpu")),
    Bench("btree_wall", "README 'An ordered engine', the idle-machine wall-clock runs",
          ("bench/btree_bench.py", "--keys", "100000", "--seconds", "1", "--repeat", "3")),
    Bench("btree_keep", "README 'An ordered engine', scans that keep every pair",
          ("bench/btree_bench.py", "--keys", "100000", "--seconds", "1", "--repeat", "3", "--keep",
           "--backends", "btree,lmdb")),
    Bench("btree_put_scaling", "README 'An ordered engine', puts across processes",
          ("bench/btree_put_scaling.py", "--keys", "100000", "--seconds", "1", "--repeat", "5")),
    Bench("config_commit", "README 'Configuration in etcd' commit latency",
          ("bench/config_commit.py",)),
    Bench("cluster_scaling", "README 'Raft configuration service' live scaling figures",
          ("bench/cluster_scaling.py", "--json", "bench/results/cluster_scaling.json")),
)  # fmt: skip


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_one(b: Bench) -> int:
    """Run ``b`` from the repository root; its output (with the command) to bench/results/."""
    OUT.mkdir(exist_ok=True)
    out = OUT / f"{b.name}.txt"
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    before, t0 = _load(), time.monotonic()
    with open(out, "w") as f:
        f.write(f"# {b.command}  (started {started}, load average {before})\n")
        f.flush()
        r = subprocess.run([sys.executable, *b.argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        f.write(
            f"\n# exit status {r.returncode}, {time.monotonic() - t0:.0f} s, "
            f"load average {_load()} after\n"
        )
    return r.returncode


@click.command()
@click.option("--list", "list_only", is_flag=True, help="print the runs and commands only")
@click.option("--only", default=None, help="comma-separated run names (see --list)")
def main(list_only: bool, only: str | None) -> None:
    """Rerun the benches README.md quotes, each with its command."""
    chosen = list(BENCHES)
    if only:
        names = only.split(",")
        unknown = sorted(set(names) - {b.name for b in BENCHES})
        if unknown:
            raise click.UsageError(f"unknown run(s) {unknown}; --list shows them")
        chosen = [b for b in BENCHES if b.name in names]
    if list_only:
        for b in chosen:
            click.echo(f"{b.name:<14} {b.command}")
            for c in b.also:
                click.echo(f"{'':<14}   runs: {c}")
            click.echo(f"{'':<14} ({b.quoted_in})")
        return
    failed = []
    for b in chosen:
        click.echo(f"{b.name}: {b.command}", err=True)
        rc = run_one(b)
        if rc != 0:
            failed.append(b.name)
            click.echo(f"{b.name}: exit status {rc} (see bench/results/{b.name}.txt)", err=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
