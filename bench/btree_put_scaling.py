"""Put scaling across processes: the btree engine against the hash engine, in one run.

Run (from the repository root, extension built or package installed)::

    python bench/btree_put_scaling.py                       # ~1 minute on 2 cores
    python bench/btree_put_scaling.py --repeat 5 --seconds 1.5

N keys of 16 B (b"key:%012d"), values of 100 B, filled in shuffled order. Each cell is 1 or 2
processes (started together, each with its own handle, each pinned to its own core so that
two processes really run at once -- unpinned, on a loaded 2-core machine the scheduler often
runs both on one core, which hides every cross-core cost) overwriting keys for `--seconds`:

- shared: random keys of the whole set, every value 100 B -- the workload of
  bench/btree_bench.py's put row. Every put then takes the same slab class's lock (the
  overwrite's chunk moves to that class's LRU head), for both engines alike;
- own: process s overwrites only keys i with i % 2 == s, its values in a size class of its
  own (100 B, and 500 B for the second process; one untimed pass first moves its keys
  there). No lock is then shared but by the index: what the index's writers cost.

Reported per cell: ops/s of wall time over all processes, and each op's CPU cost (CPU time
of the processes / ops; what an op costs whatever share of the cores other jobs left, and a
spinning waiter is charged for its spin). "2 ÷ 1 wall" is the measured scaling; "2 ÷ 1
projected" is 1-process CPU cost ÷ 2-process CPU cost x 2: the scaling on two cores no other
job uses (a process asleep on a lock is not charged, so read it with the wall ratio). Cells
are interleaved (every engine and mode each repeat), and each reports the best of
`--repeat` (other jobs only ever slow a run down). Prints Markdown.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import time
import uuid

CTX = mp.get_context("fork")
MODES = ("shared", "own")


def key(i: int) -> bytes:
    return b"key:%012d" % i


def worker(name: str, n: int, mode: str, procs: int, s: int, seconds: float, go, out) -> None:
    import shmkv

    try:
        if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= procs:
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[s]})
        kv = shmkv.attach(name)
        put = kv.put
        rng = random.Random(s)
        if mode == "own":
            mine = list(range(s, n, 2)) if procs == 2 else list(range(0, n, 2))
            value = b"v" * (100 + 400 * s)
            for i in mine:  # untimed: this process's keys into its value's class
                put(key(i), value)
            ks = [key(rng.choice(mine)) for _ in range(4096)]
        else:
            value = b"v" * 100
            ks = [key(rng.randrange(n)) for _ in range(4096)]
        out.put("ready")
        go.wait()
        t0, c0 = time.perf_counter(), time.process_time()
        end, done = t0 + seconds, 0
        while time.perf_counter() < end:
            for k in ks:
                put(k, value)
            done += len(ks)
        out.put((done, time.perf_counter() - t0, time.process_time() - c0))
        kv.close()
    except BaseException as e:
        out.put(f"{mode}: {e!r}")
        raise


def cell(name: str, n: int, mode: str, procs: int, seconds: float) -> tuple[float, float]:
    """(ops/s of wall time, summed over the processes; CPU ns per op)."""
    go, out = CTX.Event(), CTX.Queue()
    ps = [CTX.Process(target=worker, args=(name, n, mode, procs, s, seconds, go, out)) for s in range(procs)]
    for p in ps:
        p.start()
    for _ in ps:
        r = out.get(timeout=120)
        if r != "ready":
            raise RuntimeError(r)
    go.set()
    rs = [out.get(timeout=seconds + 60) for _ in ps]
    for p in ps:
        p.join(30)
    if any(isinstance(r, str) for r in rs):
        raise RuntimeError("; ".join(r for r in rs if isinstance(r, str)))
    ops = sum(d for d, _, _ in rs)
    return sum(d / w for d, w, _ in rs), sum(c for _, _, c in rs) / ops * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--engines", default="hash,btree")
    args = ap.parse_args()
    import shmkv

    engines = args.engines.split(",")
    load0, t_start = os.getloadavg(), time.time()
    names = {}
    order = list(range(args.keys))
    random.Random(1).shuffle(order)
    for e in engines:
        names[e] = f"pscale-{os.getpid()}-{uuid.uuid4().hex[:6]}-{e}"
        kv = shmkv.attach(names[e], size=max(64 << 20, args.keys * 1200), engine=e)
        for i in order:
            kv[key(i)] = b"v" * 100
        kv.close()
    res: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    try:
        for _ in range(args.repeat):
            for mode in MODES:
                for procs in (1, 2):
                    for e in engines:
                        res.setdefault((e, mode, procs), []).append(cell(names[e], args.keys, mode, procs, args.seconds))
    finally:
        for nm in names.values():
            shmkv.unlink(nm)
    load1 = os.getloadavg()
    print(f"`python bench/btree_put_scaling.py --keys {args.keys} --seconds {args.seconds:g} --repeat {args.repeat}`"
          f" -- {time.time() - t_start:.0f} s; {os.cpu_count()} cores; load average "
          f"{' '.join(f'{x:.2f}' for x in load0)} before, {' '.join(f'{x:.2f}' for x in load1)} after.\n")
    print(f"{args.keys:,} keys of 16 B; overwrites; best of {args.repeat} (wall: the highest rate; CPU: the lowest cost).\n")
    print("| mode | engine | 1 proc ops/s | 2 procs ops/s | 2 ÷ 1 wall | CPU ns/op, 1 | CPU ns/op, 2 | 2 ÷ 1 projected |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for mode in MODES:
        for e in engines:
            w1 = max(w for w, _ in res[(e, mode, 1)])
            w2 = max(w for w, _ in res[(e, mode, 2)])
            c1 = min(c for _, c in res[(e, mode, 1)])
            c2 = min(c for _, c in res[(e, mode, 2)])
            print(f"| {mode} | {e} | {w1:,.0f} | {w2:,.0f} | {w2 / w1:.2f}x | {c1:.0f} | {c2:.0f} | {2 * c1 / c2:.2f}x |")


if __name__ == "__main__":
    main()
