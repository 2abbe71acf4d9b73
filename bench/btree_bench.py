"""The btree engine against the hash engine, LMDB and sortedcontainers.SortedDict, in one run.

Run (from the repository root, extension built or package installed)::

    python bench/btree_bench.py                  # ~1 minute on 2 cores
    python bench/btree_bench.py --keys 200000 --seconds 2 --repeat 3
    python bench/btree_bench.py --repeat 5 --stat best   # on a shared, noisy machine
    python bench/btree_bench.py --repeat 5 --clock cpu   # op costs, whatever the load

N keys of 16 B (b"key:%012d"), values of 100 B, filled in key order shuffled. For each
backend and 1 and 2 processes (started together, each with its own handle; SortedDict runs
in 1 process only: it is the in-process bound, not shared), for `--seconds` per cell:

- get:        point gets of random present keys, ops/s over all processes;
- put:        overwrites of random present keys (same size), ops/s;
- scan100:    a scan of 100 (key, value) pairs from a random key, keys/s;
- scan10k:    a scan of 10,000 pairs from a random key, keys/s;

and bytes per item after the fill: shmkv -- chunk bytes of the items in use + the bucket
array (+ the tree nodes in use, btree); LMDB -- used pages x page size; SortedDict -- what
tracemalloc saw the fill allocate (keys, values and the structure). Each cell is the median
of `--repeat` runs (`--stat best`: the fastest of them -- other jobs on the machine only ever
slow a run down, so on a shared machine the best is the steadier estimate, and every backend
gets the same chances). `--clock cpu` divides each process's count by its own CPU time instead
of the wall time: what an op costs, whatever share of the cores other jobs left it -- but a
process asleep on a lock is not charged for the wait, so contended 2-process cells (btree puts)
look better than they are; read scaling from `--clock wall`. Prints Markdown with same-run
ratios. Scans return (key, value) bytes
pairs everywhere (LMDB: one read transaction and cursor per scan, as a Python user writes it),
and the loop drops each pair before the next (``sum(1 for _ in ...)``): shmkv then refills the
pair it made two steps back in place (README "Engines"). ``--keep`` collects every pair of a
scan in a list instead (``len(list(...))``), so each one is a new object in every backend.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import statistics
import tempfile
import time
import tracemalloc
import uuid
from itertools import islice
from typing import Any

CTX = mp.get_context("fork")
VALUE = b"v" * 100
BACKENDS = ("hash", "btree", "lmdb", "sorteddict")
OPS = ("get", "put", "scan100", "scan10k")


def key(i: int) -> bytes:
    return b"key:%012d" % i


class Backend:
    """One store, opened per process (after fork) by open()."""

    def __init__(self, kind: str, n: int) -> None:
        self.kind, self.n = kind, n
        self.name = f"bbench-{os.getpid()}-{uuid.uuid4().hex[:6]}-{kind}"
        self.dir = tempfile.mkdtemp(prefix="bbench-lmdb-") if kind == "lmdb" else None
        self.sd: Any = None

    def create(self) -> float:
        """Create and fill; returns bytes per item."""
        order = list(range(self.n))
        random.Random(1).shuffle(order)
        if self.kind in ("hash", "btree"):
            import shmkv

            size = max(64 << 20, self.n * 600)
            kv = shmkv.attach(self.name, size=size, engine=self.kind)
            for i in order:
                kv[key(i)] = VALUE
            st = kv.stats()
            used = sum(c["chunk_size"] * c["used"] for c in st["classes"]) + st["buckets"] * 4
            if self.kind == "btree":
                bt = st["btree"]
                used += (bt["nodes"] - bt["nodes_free"]) * bt["node_bytes"]
            kv.close()
            return float(used) / self.n
        if self.kind == "lmdb":
            import lmdb

            assert self.dir is not None
            env = lmdb.open(self.dir, map_size=4 << 30, writemap=True, sync=False, metasync=False)
            with env.begin(write=True) as txn:
                for i in order:
                    txn.put(key(i), VALUE)
            info, stat = env.info(), env.stat()
            env.close()
            return (info["last_pgno"] + 1) * stat["psize"] / self.n
        from sortedcontainers import SortedDict

        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        sd = SortedDict()
        for i in order:
            sd[key(i)] = bytes(VALUE)  # a value object per item, as a store returns
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        self.sd = sd
        return (after - before) / self.n

    def destroy(self) -> None:
        if self.kind in ("hash", "btree"):
            import shmkv

            shmkv.unlink(self.name)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def ops(self, keep: bool = False) -> tuple[Any, Any, Any]:
        """(get, put, scan(start, n) -> pairs) for this process; `keep`: a scan lists its pairs."""
        if self.kind in ("hash", "btree"):
            import shmkv

            kv = shmkv.attach(self.name)

            def scan(start: bytes, n: int) -> int:
                if keep:
                    return len(list(kv.scan(start, limit=n)))
                return sum(1 for _ in kv.scan(start, limit=n))

            return kv.get, kv.put, scan
        if self.kind == "lmdb":
            import lmdb

            assert self.dir is not None
            env = lmdb.open(self.dir, map_size=4 << 30, writemap=True, sync=False, metasync=False)
            begin = env.begin

            def get(k: bytes) -> Any:
                with begin() as txn:
                    return txn.get(k)

            def put(k: bytes, v: bytes) -> Any:
                with begin(write=True) as txn:
                    return txn.put(k, v)

            def lscan(start: bytes, n: int) -> int:
                with begin() as txn:
                    cur = txn.cursor()
                    if not cur.set_range(start):
                        return 0
                    if keep:
                        return len(list(islice(cur.iternext(), n)))
                    return sum(1 for _ in islice(cur.iternext(), n))

            return get, put, lscan
        sd = self.sd
        items = sd.items()

        def sscan(start: bytes, n: int) -> int:
            i = sd.bisect_left(start)
            return len(items[i : i + n])

        return sd.get, sd.__setitem__, sscan


def worker(b: Backend, op: str, seconds: float, seed: int, go: Any, out: Any, cpu: bool,
           keep: bool) -> None:
    try:
        run(b, op, seconds, seed, go, out, cpu, keep)
    except BaseException as e:
        out.put(f"{b.kind} {op}: {e!r}")
        raise


def run(b: Backend, op: str, seconds: float, seed: int, go: Any, out: Any, cpu: bool,
        keep: bool) -> None:
    get, put, scan = b.ops(keep)
    rng = random.Random(seed)
    ks = [key(rng.randrange(b.n)) for _ in range(4096)]
    done = 0
    go.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    end = t0 + seconds
    while time.perf_counter() < end:
        if op == "get":
            for k in ks:
                get(k)
            done += len(ks)
        elif op == "put":
            for k in ks:
                put(k, VALUE)
            done += len(ks)
        else:  # one scan per deadline check: the hash engine's take a sort of every key
            done += scan(ks[rng.randrange(len(ks))], 100 if op == "scan100" else 10_000)
    out.put(done / ((time.process_time() - c0) if cpu else (time.perf_counter() - t0)))


def cell(b: Backend, op: str, procs: int, seconds: float, cpu: bool, keep: bool) -> float:
    go, out = CTX.Event(), CTX.Queue()
    ps = [CTX.Process(target=worker, args=(b, op, seconds, s, go, out, cpu, keep)) for s in range(procs)]
    for p in ps:
        p.start()
    time.sleep(0.2)
    go.set()
    rates = [out.get(timeout=seconds + 60) for _ in ps]
    for p in ps:
        p.join(30)
    errors = [r for r in rates if isinstance(r, str)]
    if errors:
        raise RuntimeError("; ".join(errors))
    return float(sum(rates))


def fmt(x: float) -> str:
    return f"{x:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--stat", choices=("median", "best"), default="median",
                    help="what a cell reports of its --repeat runs")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="rates per second of wall time, or of each process's own CPU time")
    ap.add_argument("--keep", action="store_true",
                    help="scans list their pairs (len(list(...))) instead of dropping each one")
    args = ap.parse_args()
    kinds = args.backends.split(",")
    cpu = args.clock == "cpu"
    load0 = os.getloadavg()
    t_start = time.time()
    backends = {k: Backend(k, args.keys) for k in kinds}
    mem = {k: b.create() for k, b in backends.items()}
    res: dict[tuple[str, str, int], list[float]] = {}
    try:
        for _ in range(args.repeat):
            for op in OPS:
                for procs in (1, 2):
                    for k, b in backends.items():  # interleaved: load hits every backend alike
                        if k == "sorteddict" and procs > 1:
                            continue
                        res.setdefault((k, op, procs), []).append(
                            cell(b, op, procs, args.seconds, cpu, args.keep))
    finally:
        for b in backends.values():
            b.destroy()
    pick = max if args.stat == "best" else statistics.median
    med = {c: float(pick(v)) for c, v in res.items()}
    load1 = os.getloadavg()
    stat = (("" if args.stat == "median" else f" --stat {args.stat}") + (" --clock cpu" if cpu else "")
            + (" --keep" if args.keep else "") + ("" if kinds == list(BACKENDS) else f" --backends {args.backends}"))
    print(f"`python bench/btree_bench.py --keys {args.keys} --seconds {args.seconds:g} --repeat {args.repeat}{stat}`"
          f" -- {time.time() - t_start:.0f} s; {os.cpu_count()} cores; load average "
          f"{' '.join(f'{x:.2f}' for x in load0)} before, {' '.join(f'{x:.2f}' for x in load1)} after.\n")
    print(f"{args.keys:,} keys of 16 B, values of 100 B; get/put in ops/s, scans in keys/s "
          f"(all processes{', per CPU second of each' if cpu else ''}), "
          f"{'best' if args.stat == 'best' else 'median'} of {args.repeat}.\n")
    print("| op | procs | " + " | ".join(kinds) + " | btree ÷ hash | btree ÷ LMDB | 2 procs ÷ 1 (btree) |")
    print("|---|---:|" + "---:|" * len(kinds) + "---:|---:|---:|")
    for op in OPS:
        for procs in (1, 2):
            row = [fmt(med[(k, op, procs)]) if (k, op, procs) in med else "-" for k in kinds]
            bt = med.get(("btree", op, procs))
            r_hash = f"{bt / med[('hash', op, procs)]:.2f}x" if bt and ("hash", op, procs) in med else "-"
            r_lmdb = f"{bt / med[('lmdb', op, procs)]:.2f}x" if bt and ("lmdb", op, procs) in med else "-"
            scale = (f"{med[('btree', op, 2)] / med[('btree', op, 1)]:.2f}x"
                     if procs == 2 and ("btree", op, 1) in med and bt else "")
            print(f"| {op} | {procs} | " + " | ".join(row) + f" | {r_hash} | {r_lmdb} | {scale} |")
    print("\n| bytes per item | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    print("| after the fill | " + " | ".join(f"{mem[k]:.0f}" for k in kinds) + " |")


if __name__ == "__main__":
    main()
