"""A paused writer and the others: two processes do fsync puts into one tiered store (default
1024 lock stripes, own new keys, 100 B values); writer A is SIGSTOPped ``--pauses`` times for
``--pause-s`` seconds at random instants. Prints how many puts writer B completed during each
pause (a stall shows as a count far below B's rate), B's worst put and B's total.

Exact command (from the repository root, ~35 s; the run in bench/RESULTS.md)::

    python bench/paused_writer.py --pauses 20 --pause-s 1 --seconds 32
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import signal
import tempfile
import time
from typing import Any

import shmkv


def writer(name: str, path: str, prefix: bytes, count: Any, q: Any, seconds: float) -> None:
    kv = shmkv.attach(name, size="32MiB", path=path, durability="fsync")
    worst, n, t_end = 0.0, 0, time.time() + seconds
    while time.time() < t_end:
        t = time.perf_counter()
        kv.put(b"%s%d" % (prefix, n), b"v" * 100)
        worst = max(worst, time.perf_counter() - t)
        n += 1
        count.value = n
    q.put((prefix, n, worst))
    kv.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--pauses", type=int, default=6)
    ap.add_argument("--pause-s", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=20.0, help="how long each writer runs")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    base = tempfile.mkdtemp(prefix="paused-writer-", dir=args.dir)
    name = f"pausedwriter-{os.getpid()}"
    ctx = mp.get_context("fork")
    try:
        shmkv.attach(name, size="32MiB", path=base).close()
        q = ctx.Queue()
        ca, cb = ctx.Value("l", 0, lock=False), ctx.Value("l", 0, lock=False)
        a = ctx.Process(target=writer, args=(name, base, b"a", ca, q, args.seconds))
        b = ctx.Process(target=writer, args=(name, base, b"b", cb, q, args.seconds))
        a.start()
        b.start()
        time.sleep(1)
        rnd, during = random.Random(1), []
        for _ in range(args.pauses):
            time.sleep(rnd.uniform(0.2, 0.6))
            os.kill(a.pid, signal.SIGSTOP)
            n0 = cb.value
            time.sleep(args.pause_s)
            during.append(cb.value - n0)
            os.kill(a.pid, signal.SIGCONT)
        res = {p: (n, w) for p, n, w in (q.get(timeout=120), q.get(timeout=120))}
        a.join(30)
        b.join(30)
        print(f"B's puts during each {args.pause_s:g} s pause of A: {during}")
        print(f"B: worst put {res[b'b'][1] * 1000:.0f} ms, {res[b'b'][0]} puts in total")
    finally:
        try:
            shmkv.unlink(name)
        except shmkv.StoreNotFound:
            pass
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
