"""CPU cost of the daemon per request: what the speed work on the daemon measures between steps.

    python bench/daemon_cpu.py [--nodes 1|3] [--requests 20000] [--clients 50] [--pipeline 1]
                               [--tests set,get] [--workers 1] [--profile PREFIX]

Starts an N-node shmkv with ``--resp`` (tools/cluster.py; N=W=R=1 for one node, N=3 W=2 R=2 for
three), runs ``redis-benchmark -t TEST`` against node 1's RESP port, and reports per test the
ops/s redis-benchmark saw and the CPU time (user + system) every daemon process of the cluster
spent per request, in microseconds (user + system, and per node for three: node 1 takes every
request and coordinates it, the others replicate). On a shared machine the ops/s move with the
load; the CPU
per request moves much less, so it is the figure to compare between two versions of the code
(bench/cluster_bench.py gives the same-run ratios against Redis the targets are about).

``--profile PREFIX`` runs the daemons under cProfile (daemon.py's ``SHMKV_PROFILE``) and leaves
``PREFIX.<pid>.prof`` per process, timed by CPU clock (read them with ``python -m pstats``); the
CPU figures are then the profiled ones. ``--redis`` first measures a redis-server the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _run import cluster_tool

tc = cluster_tool()


def _procs(state: dict) -> list[list[psutil.Process]]:
    """Per node, its processes (the daemon and its workers)."""
    out = []
    for node in state["nodes"]:
        p = psutil.Process(node["pid"])
        out.append([p, *p.children(recursive=True)])
    return out


def _cpu(procs: list[psutil.Process]) -> tuple[float, float]:
    """(user, system) CPU seconds of ``procs`` so far."""
    user = system = 0.0
    for p in procs:
        t = p.cpu_times()
        user += t.user
        system += t.system
    return user, system


def _bench(port: str, test: str, a: argparse.Namespace, nodes: list[list[psutil.Process]]) -> tuple[str, str, float]:
    before, t0 = [_cpu(ps) for ps in nodes], time.perf_counter()
    p = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", port, "-t", test, "-n", str(a.requests),
         "-c", str(a.clients), "-r", str(a.keys), "-P", str(a.pipeline), "--csv"],
        capture_output=True, text=True, timeout=600,
    )
    wall = time.perf_counter() - t0
    rps = [ln for ln in p.stdout.splitlines() if ln.startswith('"' + test.upper())]
    per = [(u1 - u0, s1 - s0) for (u0, s0), (u1, s1) in zip(before, [_cpu(ps) for ps in nodes], strict=True)]
    us, ss = sum(u for u, _ in per) / a.requests * 1e6, sum(s for _, s in per) / a.requests * 1e6
    text = f"{us + ss:.1f} us/req ({us:.1f} user + {ss:.1f} sys)"
    if len(per) > 1:  # node 1 takes every request (it coordinates or forwards); the others replicate
        text += " = " + " + ".join(f"{(u + s) / a.requests * 1e6:.1f}" for u, s in per) + " per node"
    return (rps[0] if rps else p.stdout[-200:]), text, wall


def _redis(a: argparse.Namespace) -> None:
    port = str(tc.free_ports(1)[0])
    d = tempfile.mkdtemp(prefix="shmkv-daemon-cpu-redis-")
    proc = subprocess.Popen(["redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.5)
        for test in a.tests.split(","):
            row, cpu, wall = _bench(port, test, a, [[psutil.Process(proc.pid)]])
            print(f"redis-server P={a.pipeline} {test.upper()}: {row}  CPU {cpu} "
                  f"(wall {wall:.1f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1, choices=(1, 3))
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--pipeline", type=int, default=1)
    ap.add_argument("--tests", default="set,get")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--redis", action="store_true",
                    help="also a redis-server's CPU per request on the same tests (the same measure)")
    a = ap.parse_args(argv)
    if a.redis:
        _redis(a)
    if a.profile:
        os.environ["SHMKV_PROFILE"] = a.profile
    nwr = dict(n=1, w=1, r=1) if a.nodes == 1 else dict(n=3, w=2, r=2)
    d = Path(tempfile.mkdtemp(prefix="shmkv-daemon-cpu-"))
    s = tc.start(a.nodes, d, size="128MiB", resp=True, workers=a.workers, **nwr)
    try:
        time.sleep(0.5)
        port = s["nodes"][0]["resp"].rsplit(":", 1)[1]
        procs = _procs(s)
        for test in a.tests.split(","):
            row, cpu, wall = _bench(port, test, a, procs)
            print(f"nodes={a.nodes} workers={a.workers} P={a.pipeline} {test.upper()}: {row}  "
                  f"daemon CPU {cpu} (wall {wall:.1f} s, load {os.getloadavg()[0]:.1f})",
                  flush=True)
    finally:
        tc.stop(d, grace=10)
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
