"""Zero-hop local reads and `--workers K`, against redis-py and each other, in one run.

Run::

    python bench/cluster_local.py [--duration 3] [--clients 4] [--json bench/results/cluster_local.json]

What it starts, all on 127.0.0.1 and all stopped at the end: a ``redis-server`` (no persistence),
a 3-node shmkv cluster (N=3, tools/cluster.py, one worker per node) and, one after the other, a
1-node shmkv cluster (N=W=R=1) with ``--workers 1`` and with ``--workers 2``.

1. **GET of one 100-byte value, one Python thread**: redis-py ``GET`` against the redis-server;
   ``shmkv.connect(seeds, r=1, local=True).get`` (zero-hop: the node's shared memory); the same
   client without ``local`` (an R=1 read over the network). ops/s from an untimed loop; p50/p99
   from a second loop that times every call (the timer's ~0.1 us is included).
2. **K=1 vs K=2 workers**: ``--clients`` processes, each with its own shmkv client (its own
   connection, which SO_REUSEPORT hashes to one worker), 50% get / 50% put of 1,000 keys of 100 B
   for ``--duration`` s; total ops/s of all processes. The machine's cores are shared by the
   client processes and the workers, so this measures what a second worker buys on *this* host.

Every number of a table comes from the same run; ratios are computed from them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _run import cluster_tool

import shmkv
from shmkv.bench.stats import percentile

tc = cluster_tool()  # tools/cluster.py

VALUE = b"x" * 100


def _rate(fn: Any, duration: float) -> float:
    n, t0 = 0, time.perf_counter()
    end = t0 + duration
    while True:
        for _ in range(1000):
            fn()
        n += 1000
        t = time.perf_counter()
        if t >= end:
            return n / (t - t0)


def _percentiles(fn: Any, count: int) -> tuple[float, float]:
    lat = []
    pc = time.perf_counter_ns
    for _ in range(count):
        t = pc()
        fn()
        lat.append(pc() - t)
    lat.sort()
    return percentile(lat, 50) / 1000, percentile(lat, 99) / 1000


def _measure(name: str, fn: Any, duration: float, samples: int) -> dict[str, Any]:
    fn()
    ops = _rate(fn, duration)
    p50, p99 = _percentiles(fn, samples)
    print(f"  {name:<34} {ops:>12,.0f} ops/s   p50 {p50:8.2f} us   p99 {p99:8.2f} us", flush=True)
    return {"name": name, "ops": ops, "p50_us": p50, "p99_us": p99}


def _redis(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = tc.free_ports(1)[0]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import redis

    r = redis.Redis(port=port)
    for _ in range(200):
        try:
            r.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.025)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def bench_gets(tmp: Path, duration: float) -> list[dict[str, Any]]:
    import redis

    rows = []
    proc, port = _redis(tmp)
    d = tmp / "c3"
    try:
        rc = redis.Redis(port=port)
        rc.set(b"k", VALUE)
        print("GET of a 100 B value, one thread:")
        rows.append(_measure("redis-py GET (redis-server)", lambda: rc.get(b"k"), duration, 20000))
        st = tc.start(3, d, n=3, w=3, r=1, size="64MiB", workers=1)
        with shmkv.connect(st["seeds"], n=3, w=3, r=1, local=True, timeout=2.0) as loc, \
             shmkv.connect(st["seeds"], n=3, w=3, r=1, timeout=2.0) as net:
            loc.put(b"k", VALUE)
            assert loc.get(b"k") == VALUE and net.get(b"k") == VALUE
            rows.append(_measure("shmkv get, local=True (zero-hop)", lambda: loc.get(b"k"), duration, 200000))
            rows.append(_measure("shmkv get, r=1 over the network", lambda: net.get(b"k"), duration, 5000))
    finally:
        tc.stop(d, grace=5)
        proc.terminate()
        proc.wait(10)
    return rows


def _client_proc(seeds: list[str], duration: float, start: Any, q: Any) -> None:
    c = shmkv.connect(seeds, n=1, w=1, r=1, timeout=5.0)
    keys = [b"key%d" % i for i in range(1000)]
    c.put_many({k: VALUE for k in keys[:10]})
    start.wait()
    n, i = 0, 0
    end = time.perf_counter() + duration
    while time.perf_counter() < end:
        for _ in range(50):
            k = keys[i % 1000]
            if i & 1:
                c.put(k, VALUE)
            else:
                c.get(k)
            i += 7
        n += 50
    c.close()
    q.put(n / duration)


def bench_workers(tmp: Path, duration: float, clients: int) -> list[dict[str, Any]]:
    rows = []
    print(f"1-node cluster, {clients} client processes, 50% get / 50% put:")
    ctx = mp.get_context("fork")
    for k in (1, 2):
        d = tmp / f"w{k}"
        try:
            st = tc.start(1, d, n=1, w=1, r=1, size="64MiB", workers=k)
            start = ctx.Barrier(clients)
            q = ctx.Queue()
            procs = [ctx.Process(target=_client_proc, args=(st["seeds"], duration, start, q)) for _ in range(clients)]
            for p in procs:
                p.start()
            total = sum(q.get(timeout=duration + 60) for _ in procs)
            for p in procs:
                p.join(30)
        finally:
            tc.stop(d, grace=5)
        print(f"  --workers {k}: {total:>12,.0f} ops/s", flush=True)
        rows.append({"workers": k, "clients": clients, "ops": total})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="shmkv-cluster-local-"))
    try:
        gets = bench_gets(tmp, a.duration)
        workers = bench_workers(tmp, a.duration, a.clients)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    by = {r["name"]: r for r in gets}
    redis_ops = by["redis-py GET (redis-server)"]["ops"]
    local_ops = by["shmkv get, local=True (zero-hop)"]["ops"]
    ratios = {
        "local_get_over_redis_py_get": local_ops / redis_ops,
        "network_get_over_redis_py_get": by["shmkv get, r=1 over the network"]["ops"] / redis_ops,
        "workers2_over_workers1": workers[1]["ops"] / workers[0]["ops"],
    }
    print("ratios (same run):", {k: round(v, 2) for k, v in ratios.items()})
    if a.json:
        Path(a.json).write_text(json.dumps({"gets": gets, "workers": workers, "ratios": ratios,
                                            "cpus": os.cpu_count(), "duration": a.duration}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
