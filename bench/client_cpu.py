"""CPU per call of the Python client and of its server, one thread, sequential calls: what the
speed work on ``shmkv.connect`` (and on a client request's path through the daemon) measures.

    python bench/client_cpu.py [--rounds 12] [--chunk 4000] [--ab OTHER_CHECKOUT] [--json PATH]

Starts a 1-node shmkv (N=W=R=1, tools/cluster.py) and a ``redis-server``, each in a worker
process of its own with its client (``shmkv.connect``, ``redis.Redis``), 10,000 keys of 3-byte
values written first. Then the workers take turns, ``--chunk`` SETs and then ``--chunk`` GETs
each per round (the order flips every round), so a load change on a shared machine falls on all
of them alike. Per call each turn gives the wall time, the client process's CPU time and the
server's (psutil: the daemon's, redis-server's); the report is the median over the rounds (and
the lower quartile), and the same-run ratios: calls/s of ``shmkv.connect`` against redis-py
(bench/cluster_bench.py's target, >= 0.5x) and the CPU per call of each side.

``--ab OTHER_CHECKOUT`` adds a worker that runs another checkout's code -- its client and its
daemon (``PYTHONPATH`` and the working directory set to it) -- interleaved with this one: the A/B
of a change. On a shared machine, CPU per call moves less than wall time (bench/RESULTS.md).
The psutil CPU counters tick in 10 ms steps: keep ``--chunk`` x the per-call CPU well above
that (4,000 calls x ~30 us = 120 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VALUE = b"x" * 3
KEYS = [b"key:%06d" % i for i in range(10_000)]


# -- a worker: one server, one client, turns on stdin ------------------------------------------


def _turns(server_pid: int, get: Any, put: Any) -> None:
    """Answer each stdin line ``SET n`` / ``GET n`` with ``wall client server`` (us per call)."""
    import psutil

    srv = psutil.Process(server_pid)
    pos = 0
    for k in KEYS:
        put(k, VALUE)
    print("ready", flush=True)
    for line in sys.stdin:
        op, count = line.split()
        n = int(count)
        ks = [KEYS[(pos + i) % len(KEYS)] for i in range(n)]
        pos += n
        s0, c0, w0 = srv.cpu_times(), time.process_time(), time.perf_counter()
        if op == "SET":
            for k in ks:
                put(k, VALUE)
        else:
            for k in ks:
                get(k)
        wall, cpu, s1 = time.perf_counter() - w0, time.process_time() - c0, srv.cpu_times()
        server = (s1.user - s0.user) + (s1.system - s0.system)
        print(f"{wall / n * 1e6:.3f} {cpu / n * 1e6:.3f} {server / n * 1e6:.3f}", flush=True)


def _worker_shmkv() -> None:
    from _run import cluster_tool

    import shmkv

    tc = cluster_tool()
    d = Path(tempfile.mkdtemp(prefix="shmkv-client-cpu-"))
    try:
        s = tc.start(1, d, n=1, w=1, r=1, size="64MiB")
        c = shmkv.connect(s["seeds"], n=1, w=1, r=1, timeout=2.0)
        try:
            _turns(s["nodes"][0]["pid"], c.get, c.put)
        finally:
            c.close()
    finally:
        tc.stop(d, grace=10)
        shutil.rmtree(d, ignore_errors=True)


def _worker_redis() -> None:
    import redis
    from _run import cluster_tool

    port = cluster_tool().free_ports(1)[0]
    d = tempfile.mkdtemp(prefix="shmkv-client-cpu-redis-")
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        r = redis.Redis(port=port, protocol=2)
        deadline = time.monotonic() + 30
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        try:
            _turns(proc.pid, r.get, r.set)
        finally:
            r.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)


# -- the driver --------------------------------------------------------------------------------


def _spawn(kind: str, tree: Path | None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    cwd = None
    if tree is not None:  # that checkout's client and daemon (``-m shmkv.cli`` looks in the cwd first)
        env["PYTHONPATH"] = str(tree)
        cwd = str(tree)
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", kind], env=env, cwd=cwd,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        raise RuntimeError(f"worker {kind} ({tree or 'this checkout'}) did not start: {line!r}")
    return p


def run(a: argparse.Namespace) -> dict[str, Any]:
    workers: dict[str, tuple[str, Path | None]] = {}
    if not a.no_redis:
        workers["redis-py -> redis-server"] = ("redis", None)
    workers["shmkv.connect -> shmkv-1"] = ("shmkv", None)
    if a.ab:
        workers[f"shmkv.connect -> shmkv-1 ({a.ab})"] = ("shmkv", Path(a.ab).resolve())
    procs: dict[str, subprocess.Popen[str]] = {}
    rows: dict[tuple[str, str], list[list[float]]] = {(w, op): [] for w in workers for op in ("SET", "GET")}
    load_before = os.getloadavg()
    try:
        for name, (kind, tree) in workers.items():
            procs[name] = _spawn(kind, tree)
        for rnd in range(a.rounds):
            order = list(workers) if rnd % 2 == 0 else list(workers)[::-1]
            for op in ("SET", "GET"):
                for name in order:
                    p = procs[name]
                    assert p.stdin is not None and p.stdout is not None
                    p.stdin.write(f"{op} {a.chunk}\n")
                    p.stdin.flush()
                    rows[(name, op)].append([float(x) for x in p.stdout.readline().split()])
    finally:
        for p in procs.values():
            if p.stdin is not None:
                p.stdin.close()
        for p in procs.values():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    out: dict[str, Any] = {"args": vars(a), "load_before": load_before, "load_after": os.getloadavg(),
                           "median": {}, "lower_quartile": {}}
    for (name, op), rs in rows.items():
        cols = list(zip(*rs, strict=True))
        out["median"].setdefault(name, {})[op] = dict(zip(("wall_us", "client_cpu_us", "server_cpu_us"),
                                                          (statistics.median(c) for c in cols), strict=True))
        out["lower_quartile"].setdefault(name, {})[op] = dict(zip(
            ("wall_us", "client_cpu_us", "server_cpu_us"),
            (statistics.quantiles(c, n=4)[0] if len(c) > 1 else c[0] for c in cols), strict=True))
    return out


def _ratio(a: float, b: float) -> str:
    """``a / b`` as "1.234x"; "n/a" when ``b`` is 0 (a CPU counter that did not tick in a turn)."""
    return f"{a / b:.3f}x" if b > 0 else "n/a"


def render(rep: dict[str, Any]) -> str:
    a = rep["args"]
    lines = [f"{a['rounds']} rounds x {a['chunk']} calls per op and client, taking turns; load "
             f"{rep['load_before'][0]:.2f} before, {rep['load_after'][0]:.2f} after",
             "", "medians per call (lower quartile)      op     wall us   client CPU us   server CPU us",
             "-" * 90]
    med, q1 = rep["median"], rep["lower_quartile"]
    for name in med:
        for op in ("SET", "GET"):
            m, q = med[name][op], q1[name][op]
            lines.append(f"{name:<38} {op:<4} {m['wall_us']:6.1f} ({q['wall_us']:5.1f})   "
                         f"{m['client_cpu_us']:5.1f} ({q['client_cpu_us']:5.1f})    "
                         f"{m['server_cpu_us']:5.1f} ({q['server_cpu_us']:5.1f})")
    lines.append("(server: the shmkv daemon's CPU, or redis-server's, per call)")
    base = "redis-py -> redis-server"
    if base in med:
        lines += ["", "same-run ratios against redis-py (calls/s = 1 / median wall time)"]
        for name in med:
            if name == base:
                continue
            for op in ("SET", "GET"):
                m, r = med[name][op], med[base][op]
                lines.append(f"  {op}: {name} {_ratio(r['wall_us'], m['wall_us'])}  (client CPU "
                             f"{_ratio(m['client_cpu_us'], r['client_cpu_us'])}, server CPU "
                             f"{_ratio(m['server_cpu_us'], r['server_cpu_us'])} redis-py's / redis-server's)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--chunk", type=int, default=4000)
    ap.add_argument("--ab", default=None, help="another checkout whose client and daemon take turns with these")
    ap.add_argument("--no-redis", action="store_true", help="leave redis-py and redis-server out")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", choices=("shmkv", "redis"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker == "shmkv":
        _worker_shmkv()
        return 0
    if a.worker == "redis":
        _worker_redis()
        return 0
    if not a.no_redis and shutil.which("redis-server") is None:
        print("error: redis-server not found (apt-get install redis-server), or --no-redis", file=sys.stderr)
        return 2
    rep = run(a)
    text = render(rep)
    rep["text"] = text
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
