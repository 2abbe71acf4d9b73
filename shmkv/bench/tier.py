"""The engine of bench/tier_bench.py: the tiered store (memory over the LSM,
``attach(..., path=)``) beside a memory-only store and LevelDB (plyvel).

What is measured, in one run, each store in its own temp dir under ``--dir`` (default /tmp):

1. **gets of keys resident in memory**: a tiered store (``path=``, durability "none", every
   key in memory: 256 MiB) against a memory-only store, same 100k keys x 16 B, 100 B values,
   uniform random keys, a plain Python loop. The memory-hit path is the same C code in both;
   the check is that the disk tier adds nothing to it (target: ratio >= 0.9).
2. **puts per durability mode** through a tiered store (new keys, 100 B values), beside
   LevelDB with ``sync=True`` for "fsync" and ``sync=False`` for "interval" and "none"
   (LevelDB has no group-commit mode).
2b. **fsync puts from 1, 2 and 4 processes at once** (``--procs``) into one tiered store, each
   process its own new keys, for ``--budget`` seconds; LevelDB beside it with as many threads
   on one handle (``sync=True``: a LevelDB directory takes one process). Total puts/s, p50/p99
   and the worst put, and fsyncs per put (below 1: group commit -- one fsync covered several
   processes' records).
3. **gets of keys only on disk**: 200k keys loaded, flushed to tables, then the memory
   segment is recreated empty (8 MiB) so every probe misses memory: each key is read once
   (random order, without replacement), read through the LSM and promoted. LevelDB is closed
   and reopened (its log is written to tables at open). **Negative lookups**: absent keys
   inside the key range (the bloom filters answer).
4. **scans** of ranges of ``--scan-len`` consecutive keys (``kv.scan(start, stop)`` against
   ``db.iterator(start=, stop=)``), keys/s.
5. **spill**: ``--spill-gb`` x 1M keys (16 B) with 1 KiB values (half random, ~2:1
   compressible), random key order, durability "none", 64 MiB of memory, through the tiered
   store; then the same into LevelDB (``sync=False``). After the load each engine is left
   until its compaction counter stops changing (2.5 s quiet, at most 60 s), then closed.
   Write amplification: shmkv's own ``stats()["disk"]["write_amplification"]``, and for both
   engines bytes handed to write(2) (``/proc/self/io`` ``wchar``, open -> close, background
   threads included) / key+value bytes put; ``write_bytes`` (bytes the kernel was asked to
   write back) beside it.

Method: contestants of a phase run interleaved in rounds (a block of ops of A then of B, the
next round B then A) so that load from other processes hits both alike. Throughput = median over blocks of the
block's rate (the block is timed as a whole: no per-op timer in the loop); the ratio is the
median of the per-round ratios. Latencies (p50/p99) come from a sample of ops timed one by
one after each block (they include ``perf_counter_ns`` overhead, reported as ``timer_ns``).
Never a mean.


The command and the last results are in bench/tier_bench.py's docstring.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import shmkv
from shmkv.bench.stats import percentile
from shmkv.lsm import LSM

pc = time.perf_counter_ns


# ---------------------------------------------------------------------------- helpers


def proc_io() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open("/proc/self/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                out[k] = int(v)
    except OSError:
        pass
    return out


def dir_bytes(path: str) -> int:
    n = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                n += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return n


def fs_type(path: str) -> str:
    """The file system type of the mount holding path (longest mount point prefix)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


def timer_overhead_ns() -> int:
    s = []
    for _ in range(20_000):
        t = pc()
        s.append(pc() - t)
    return int(statistics.median(s))


def pct(s: list[int], p: float) -> float:
    """The nearest-rank ``p`` quantile (0 < p <= 1) of sorted ns samples, in us (NaN if none)."""
    return percentile(s, p * 100) / 1000.0 if s else float("nan")


def value_of(rnd: random.Random, key: bytes, size: int) -> bytes:
    """Half random bytes, half the key repeated: compresses about 2:1 (as shmkv/bench/lsm.py)."""
    half = size // 2
    return (rnd.randbytes(half) + key * ((size - half) // len(key) + 1))[:size]


@dataclass
class Contestant:
    name: str
    fn: Callable[[Any], object]
    ops: Sequence[Any]
    pos: int = 0
    rates: list[float] = field(default_factory=list)
    lat: list[int] = field(default_factory=list)
    ops_done: int = 0


def race(
    contestants: list[Contestant],
    *,
    block: int,
    sample: int,
    budget_s: float,
    wrap: bool,
    units_per_op: int = 1,
    min_rounds: int = 3,
) -> dict[str, Any]:
    """Round-robin blocks of `block` ops per contestant (timed as a whole) each followed by
    `sample` ops timed one by one; until budget_s of wall time or an op list runs out."""
    need = block + sample
    for c in contestants:
        if len(c.ops) < need:
            raise ValueError(f"{c.name}: {len(c.ops)} ops < one block ({need})")
    deadline = time.perf_counter() + budget_s
    rounds: list[dict[str, float]] = []
    while True:
        row: dict[str, float] = {}
        # ABBA: who goes first alternates, so neither always runs on the other's warm caches
        for c in contestants if len(rounds) % 2 == 0 else contestants[::-1]:
            if c.pos + need > len(c.ops):
                c.pos = 0  # only reached with wrap=True (checked below)
            chunk = c.ops[c.pos : c.pos + block]
            fn = c.fn
            t0 = pc()
            for op in chunk:
                fn(op)
            dt = pc() - t0
            rate = block * units_per_op * 1e9 / max(dt, 1)
            c.rates.append(rate)
            row[c.name] = rate
            for op in c.ops[c.pos + block : c.pos + need]:
                t = pc()
                fn(op)
                c.lat.append(pc() - t)
            c.pos += need
            c.ops_done += need
        rounds.append(row)
        exhausted = not wrap and any(c.pos + need > len(c.ops) for c in contestants)
        if exhausted or (time.perf_counter() > deadline and len(rounds) >= min_rounds):
            break
    out: dict[str, Any] = {"rounds": len(rounds), "block": block, "sample": sample}
    for c in contestants:
        s = sorted(c.lat)
        out[c.name] = {
            "ops": c.ops_done,
            "ops_s_p50": statistics.median(c.rates),
            "ops_s_min": min(c.rates),
            "samples": len(s),
            "p50_us": pct(s, 0.50),
            "p99_us": pct(s, 0.99),
        }
    if len(contestants) == 2:
        a, b = (c.name for c in contestants)
        out["ratio_p50"] = statistics.median(r[a] / r[b] for r in rounds)
    return out


# ---------------------------------------------------------------------------- engines


def have_plyvel() -> bool:
    try:
        import plyvel  # noqa: F401
    except ImportError:
        return False
    return True


def open_leveldb(path: str) -> Any:
    import plyvel

    # 4 MiB write buffer (LevelDB's default) = shmkv's default memtable_bytes; 10-bit blooms
    # as shmkv's; LevelDB compresses with snappy, shmkv with lz4.
    return plyvel.DB(path, create_if_missing=True, bloom_filter_bits=10)


class Run:
    """Store names and temp dirs of one run, all removed by cleanup()."""

    def __init__(self, base_dir: str | None) -> None:
        self.base = tempfile.mkdtemp(prefix="tier-bench-", dir=base_dir)
        self.names: list[str] = []
        self.stores: list[Any] = []

    def dir(self, label: str) -> str:
        return os.path.join(self.base, label)

    def attach(self, label: str, size: str, **kw: Any) -> shmkv.Store:
        name = f"tierbench-{os.getpid()}-{label}"
        try:
            shmkv.unlink(name)
        except shmkv.StoreNotFound:
            pass
        kv = shmkv.attach(name, size=size, **kw)
        self.names.append(name)
        self.stores.append(kv)
        return kv

    def drop(self, kv: Any) -> None:
        kv.close()
        name = getattr(kv, "name", None)
        if name in self.names:
            self.names.remove(name)
            shmkv.unlink(name)

    def cleanup(self) -> None:
        for kv in self.stores:
            try:
                kv.close()
            except Exception:
                pass
        for n in self.names:
            try:
                shmkv.unlink(n)
            except shmkv.StoreNotFound:
                pass
        shutil.rmtree(self.base, ignore_errors=True)


def key16(i: int) -> bytes:
    return b"k%015d" % i


# ---------------------------------------------------------------------------- phases


def phase_memory_gets(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    rnd = random.Random(1)
    keys = [key16(i) for i in range(args.mem_keys)]
    items = [(k, value_of(rnd, k, 100)) for k in keys]
    mem = run.attach("mem", "256MiB")
    tier = run.attach("tiermem", "256MiB", path=run.dir("tiermem"), durability="none")
    for kv in (mem, tier):
        for i in range(0, len(items), 1000):
            kv.put_many(items[i : i + 1000])
    # put_many on a tiered store writes the batch to disk and leaves its keys out of memory
    # (ext/_core.pyx _put_many_through): one get each promotes them
    for k in keys:
        tier.get(k)
    resident = {"tiered": tier.stats()["items"], "memory_only": mem.stats()["items"]}
    if resident["tiered"] != len(keys):
        print(
            f"warning: {resident['tiered']} of {len(keys)} keys resident in the tiered store",
            file=sys.stderr,
        )
    # one probe sequence each (same distribution): the same list would hand the second
    # contestant key objects the first just pulled into the CPU caches
    probes = [rnd.choice(keys) for _ in range(max(200_000, args.mem_keys))]
    probes2 = [rnd.choice(keys) for _ in range(len(probes))]
    for k in probes[:1000]:
        assert tier.get(k) is not None and mem.get(k) is not None
    h0 = tier.stats()
    r = race(
        [Contestant("tiered", tier.get, probes), Contestant("memory_only", mem.get, probes2)],
        block=5000, sample=200, budget_s=args.budget * 2, wrap=True,
    )  # fmt: skip
    h1 = tier.stats()
    gets = h1["gets"] - h0["gets"]
    r["tiered_memory_hit_ratio"] = (h1["hits"] - h0["hits"]) / gets if gets else None
    r["tiered_memory_misses"] = h1["misses"] - h0["misses"]
    r["resident_items"] = resident
    r["keys"] = args.mem_keys
    run.drop(tier)
    run.drop(mem)
    return r


def putter(put: Callable[..., object], **kw: Any) -> Callable[[tuple[bytes, bytes]], object]:
    def f(kv: tuple[bytes, bytes]) -> object:
        return put(kv[0], kv[1], **kw)

    return f


def phase_puts(run: Run, args: argparse.Namespace, peer: bool) -> dict[str, Any]:
    rnd = random.Random(2)
    out: dict[str, Any] = {}
    for mode in ("fsync", "interval", "none"):
        n = args.durable_ops if mode == "fsync" else args.durable_ops * 20
        items = [
            (k, value_of(rnd, k, 100)) for k in (key16(rnd.randrange(10**15)) for _ in range(n))
        ]
        tier = run.attach(f"put{mode}", "256MiB", path=run.dir(f"put-{mode}"), durability=mode)
        cs = [Contestant("tiered", putter(tier.put), items)]
        db = None
        if peer:
            db = open_leveldb(run.dir(f"put-{mode}-leveldb"))
            sync = mode == "fsync"
            cs.append(Contestant("leveldb", putter(db.put, sync=sync), items))
        block, sample = (20, 20) if mode == "fsync" else (400, 100)
        out[mode] = race(cs, block=block, sample=sample, budget_s=args.budget, wrap=False)
        out[mode]["leveldb_sync"] = mode == "fsync"
        run.drop(tier)
        if db is not None:
            db.close()
    return out


def _fsync_worker(name: str, path: str, wid: int, go: Any, stop_at: Any, q: Any) -> None:
    """One process of phase 2b: fsync puts of its own new keys until ``stop_at``."""
    kv = shmkv.attach(name, path=path, durability="fsync")
    rnd = random.Random(100 + wid)
    val = value_of(rnd, b"w%d" % wid, 100)
    lat: list[int] = []
    n = 0
    go.wait()
    end = stop_at.value
    t_start = time.time()
    while time.time() < end:
        t = pc()
        kv.put(b"p%02d-%012d" % (wid, n), val)
        lat.append(pc() - t)
        n += 1
    elapsed = time.time() - t_start
    disk = kv.stats()["disk"]
    kv.close()
    q.put({"puts": n, "elapsed": elapsed, "lat": sorted(lat), "wal_syncs": disk.get("wal_syncs")})


def phase_fsync_procs(run: Run, args: argparse.Namespace, peer: bool) -> dict[str, Any]:
    """fsync puts from 1, 2 and 4 processes at once into one tiered store (each process its
    own new keys), beside LevelDB with as many threads on one handle (``sync=True``; a LevelDB
    directory cannot be opened by two processes). Total puts/s over ``--budget`` seconds,
    latency percentiles and the worst put over all processes, and fsyncs per put (below 1:
    one fsync covered several processes' records -- group commit)."""
    import multiprocessing as mp
    import threading

    ctx = mp.get_context("fork")
    out: dict[str, Any] = {}
    for nproc in args.procs:
        label = f"fsync{nproc}"
        kv = run.attach(label, "64MiB", path=run.dir(label), durability="fsync")
        go, q = ctx.Event(), ctx.Queue()
        stop_at = ctx.Value("d", 0.0, lock=False)
        ps = [ctx.Process(target=_fsync_worker, args=(kv.name, run.dir(label), i, go, stop_at, q))
              for i in range(nproc)]  # fmt: skip
        for p in ps:
            p.start()
        time.sleep(0.5)  # let every worker attach
        stop_at.value = time.time() + args.budget
        go.set()
        got = [q.get(timeout=args.budget + 60) for _ in ps]
        for p in ps:
            p.join()
        lat = sorted(x for g in got for x in g["lat"])
        puts = sum(g["puts"] for g in got)
        syncs = [g["wal_syncs"] for g in got]
        row: dict[str, Any] = {
            "tiered": {
                "ops_s": puts / max(g["elapsed"] for g in got),
                "p50_us": pct(lat, 0.50), "p99_us": pct(lat, 0.99), "max_us": pct(lat, 1.0),
                "puts": puts,
                "fsyncs_per_put": (sum(syncs) / puts) if puts and None not in syncs else None,
            }
        }  # fmt: skip
        run.drop(kv)
        if peer:
            db = open_leveldb(run.dir(label + "-leveldb"))
            counts = [0] * nproc
            tlat: list[list[int]] = [[] for _ in range(nproc)]
            t_end = time.time() + args.budget

            def thread_puts(
                i: int, db: Any = db, t_end: float = t_end, counts: list[int] = counts,
                tlat: list[list[int]] = tlat,
            ) -> None:  # fmt: skip
                v = value_of(random.Random(200 + i), b"t%d" % i, 100)
                n = 0
                while time.time() < t_end:
                    t = pc()
                    db.put(b"p%02d-%012d" % (i, n), v, sync=True)
                    tlat[i].append(pc() - t)
                    n += 1
                counts[i] = n

            t0 = time.time()
            ts = [threading.Thread(target=thread_puts, args=(i,)) for i in range(nproc)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            el = time.time() - t0
            db.close()
            ll = sorted(x for xs in tlat for x in xs)
            row["leveldb"] = {"ops_s": sum(counts) / el, "p50_us": pct(ll, 0.50),
                              "p99_us": pct(ll, 0.99), "max_us": pct(ll, 1.0), "puts": sum(counts)}  # fmt: skip
            row["ratio"] = row["tiered"]["ops_s"] / row["leveldb"]["ops_s"]
        out[str(nproc)] = row
    one = out.get("1")
    for r in out.values():
        r["tiered"]["x_one_process"] = (
            r["tiered"]["ops_s"] / one["tiered"]["ops_s"] if one else None
        )
    return out


def phase_disk(run: Run, args: argparse.Namespace, peer: bool) -> dict[str, Any]:
    rnd = random.Random(3)
    n = args.disk_keys
    keys = [key16(i) for i in range(n)]
    order = keys[:]
    rnd.shuffle(order)
    path = run.dir("disk")
    tier = run.attach("disk", "8MiB", path=path, durability="none")
    batch: list[tuple[bytes, bytes]] = []
    db = open_leveldb(run.dir("disk-leveldb")) if peer else None
    for k in order:
        batch.append((k, value_of(rnd, k, 100)))
        if len(batch) == 1000 or k is order[-1]:
            tier.put_many(batch)
            if db is not None:
                with db.write_batch() as wb:
                    for bk, bv in batch:
                        wb.put(bk, bv)
            batch = []
    run.drop(tier)
    lsm = LSM(path, durability="none")  # the public engine: push the memtable into tables
    lsm.flush()
    lsm.close()
    tier = run.attach("disk", "8MiB", path=path, durability="none")  # memory starts empty
    if db is not None:
        db.close()
        db = open_leveldb(run.dir("disk-leveldb"))
    out: dict[str, Any] = {"keys": n, "memory": "8MiB"}

    probes = keys[:]
    rnd.shuffle(probes)  # each key read once: every tiered get misses memory
    h0 = tier.stats()
    cs = [Contestant("tiered", tier.get, probes)]
    if db is not None:
        cs.append(Contestant("leveldb", db.get, probes))
    out["get"] = race(cs, block=400, sample=100, budget_s=args.budget, wrap=False)
    h1 = tier.stats()
    gets = h1["gets"] - h0["gets"]
    out["get"]["tiered_memory_hit_ratio"] = (h1["hits"] - h0["hits"]) / gets if gets else None
    out["get"]["tiered_memory_misses"] = h1["misses"] - h0["misses"]

    # "k" + 14 digits + "x" sorts between two stored keys: absent, inside the key range
    absent = [b"k%014dx" % rnd.randrange(max(1, n // 10)) for _ in range(max(50_000, n // 2))]
    cs = [Contestant("tiered", tier.get, absent)]
    if db is not None:
        cs.append(Contestant("leveldb", db.get, absent))
    out["get_absent"] = race(cs, block=400, sample=100, budget_s=args.budget, wrap=True)
    d = tier.stats()["disk"]
    out["bloom_false_positive_rate"] = d["bloom_false_positive_rate"]
    out["files_per_level"] = d["files_per_level"]
    out["disk_bytes"] = d["disk_bytes"]

    span = min(args.scan_len, n)
    starts = [rnd.randrange(n - span + 1) for _ in range(5000)]
    ranges = [(key16(s), key16(s + span)) for s in starts]

    def scan_tier(r: tuple[bytes, bytes]) -> int:
        c = 0
        for _ in tier.scan(r[0], r[1]):
            c += 1
        return c

    ldb: Any = db

    def scan_ldb(r: tuple[bytes, bytes]) -> int:
        c = 0
        for _ in ldb.iterator(start=r[0], stop=r[1]):
            c += 1
        return c

    assert scan_tier(ranges[0]) == span
    cs = [Contestant("tiered", scan_tier, ranges)]
    if db is not None:
        assert scan_ldb(ranges[0]) == span
        cs.append(Contestant("leveldb", scan_ldb, ranges))
    out["scan"] = race(cs, block=2, sample=1, budget_s=args.budget, wrap=True, units_per_op=span)
    out["scan"]["keys_per_scan"] = span
    run.drop(tier)
    if db is not None:
        db.close()
    return out


def settle(counter: Callable[[], object], quiet_s: float = 2.5, cap_s: float = 60.0) -> float:
    """Wait until counter() stops changing for quiet_s (at most cap_s); seconds waited."""
    t0 = time.perf_counter()
    last, since = counter(), time.perf_counter()
    while time.perf_counter() - t0 < cap_s:
        time.sleep(0.25)
        now = counter()
        if now != last:
            last, since = now, time.perf_counter()
        elif time.perf_counter() - since >= quiet_s:
            break
    return time.perf_counter() - t0


def spill_one(engine: str, run: Run, args: argparse.Namespace) -> dict[str, Any]:
    n = max(1000, int(args.spill_gb * 1_000_000))
    rnd = random.Random(5)
    ids = list(range(n))
    rnd.shuffle(ids)
    path = run.dir(f"spill-{engine}")
    io0 = proc_io()
    t_open = time.perf_counter()
    if engine == "tiered":
        kv = run.attach("spill", args.spill_memory, path=path, durability="none")
        put = kv.put
    else:
        db = open_leveldb(path)
        put = db.put  # sync=False is plyvel's default
    rates: list[float] = []
    lat: list[int] = []
    load_ns = 0
    user = 0
    B, S = 2000, 50
    for i in range(0, n, B + S):
        items = [(key16(j), value_of(rnd, key16(j), args.spill_value)) for j in ids[i : i + B + S]]
        user += sum(len(k) + len(v) for k, v in items)
        blk, smp = items[:B], items[B:]
        t0 = pc()
        for k, v in blk:
            put(k, v)
        dt = pc() - t0
        load_ns += dt
        rates.append(len(blk) * 1e9 / max(dt, 1))
        for k, v in smp:
            t = pc()
            put(k, v)
            d = pc() - t
            lat.append(d)
            load_ns += d
    out: dict[str, Any] = {"keys": n, "value_size": args.spill_value, "user_bytes": user}
    if engine == "tiered":
        out["write_amplification_at_load_end"] = kv.stats()["disk"]["write_amplification"]
        out["settle_s"] = settle(lambda: kv.stats()["disk"]["compactions"], args.settle_s)
        d = kv.stats()["disk"]
        out["own_write_amplification"] = d["write_amplification"]
        out["files_per_level"] = d["files_per_level"]
        out["compactions"] = d["compactions"]
        out["memory_evictions"] = kv.stats()["evictions"]
        t_close = time.perf_counter()
        run.drop(kv)
    else:
        out["settle_s"] = settle(lambda: db.get_property(b"leveldb.stats"), args.settle_s)
        out["files_per_level"] = [
            int(db.get_property(b"leveldb.num-files-at-level%d" % lv) or 0) for lv in range(7)
        ]
        t_close = time.perf_counter()
        db.close()
    out["close_s"] = time.perf_counter() - t_close
    io1 = proc_io()
    out["load_s"] = load_ns / 1e9
    out["elapsed_s"] = time.perf_counter() - t_open  # load + settle + close (+ value generation)
    s = sorted(lat)
    out["puts_s_p50"] = statistics.median(rates)
    out["puts_s_min"] = min(rates)
    out["p50_us"] = pct(s, 0.5)
    out["p99_us"] = pct(s, 0.99)
    out["wchar_write_amplification"] = (io1.get("wchar", 0) - io0.get("wchar", 0)) / user
    out["write_bytes_write_amplification"] = (
        io1.get("write_bytes", 0) - io0.get("write_bytes", 0)
    ) / user
    out["disk_bytes"] = dir_bytes(path)
    shutil.rmtree(path, ignore_errors=True)
    return out


def phase_spill(run: Run, args: argparse.Namespace, peer: bool) -> dict[str, Any]:
    out = {
        "gb": args.spill_gb,
        "memory": args.spill_memory,
        "tiered": spill_one("tiered", run, args),
    }
    out["leveldb"] = spill_one("leveldb", run, args) if peer else None
    return out


# ---------------------------------------------------------------------------- report


def _f(x: float | None, nd: int = 0) -> str:
    if x is None or x != x:
        return "n/a"
    return f"{x:,.{nd}f}"


def _ratio(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}x" if x >= 1 else f"{x:.2g}x"


def render(res: dict[str, Any]) -> str:
    m = res["meta"]
    L = [
        f"shmkv tier bench: python {m['python']}, plyvel {m['plyvel'] or 'absent'}, "
        f"{m['cpus']} CPUs, load avg {m['loadavg_before']} -> {m['loadavg_after']}, "
        f"fs of {m['dir']} ({m['fs']}), timer {m['timer_ns']} ns, {m['wall_s']:.0f} s",
        "",
        "| # | op | shmkv tiered ops/s | p50 us | p99 us | vs | ops/s | p50 us | p99 us | ratio |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]

    def row(num: str, op: str, r: dict[str, Any] | None, other: str, label: str) -> None:
        if r is None:
            return
        a, b = r["tiered"], r.get(other)
        cells = [num, op, _f(a["ops_s_p50"]), _f(a["p50_us"], 2), _f(a["p99_us"], 2)]
        if b is None:
            cells += [f"{label} (absent)", "", "", "", ""]
        else:
            cells += [label, _f(b["ops_s_p50"]), _f(b["p50_us"], 2), _f(b["p99_us"], 2),
                      _ratio(r.get("ratio_p50"))]  # fmt: skip
        L.append("| " + " | ".join(cells) + " |")

    mg = res.get("memory_gets")
    if mg:
        row("1", f"get, resident in memory ({mg['keys']} keys)", mg, "memory_only", "memory-only")
    for mode, r in res.get("puts", {}).items():
        row("2", f"put, durability={mode}", r, "leveldb", f"leveldb sync={r['leveldb_sync']}")
    d = res.get("disk")
    if d:
        row("3", f"get, on disk only ({d['keys']} keys, {d['memory']} memory)", d["get"],
            "leveldb", "leveldb")  # fmt: skip
        row("3", "get, absent key", d["get_absent"], "leveldb", "leveldb")
        sc = d["scan"]
        row("4", f"scan, keys/s ({sc['keys_per_scan']} keys/range; p50/p99 = one range)", sc,
            "leveldb", "leveldb iterator")  # fmt: skip
    fp = res.get("fsync_procs")
    if fp:
        L += [
            "",
            "2b. fsync puts from N processes at once (own new keys, 100 B values); LevelDB: N "
            "threads on one handle, sync=True",
            "",
            "| N | shmkv puts/s | x 1 process | p50 us | p99 us | max us | fsyncs/put "
            "| leveldb puts/s | p50 us | p99 us | max us | ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, r in fp.items():
            a, b = r["tiered"], r.get("leveldb")
            cells = [n, _f(a["ops_s"]), _ratio(a.get("x_one_process")), _f(a["p50_us"], 1),
                     _f(a["p99_us"], 1), _f(a["max_us"], 0), _f(a["fsyncs_per_put"], 2)]  # fmt: skip
            if b:
                cells += [_f(b["ops_s"]), _f(b["p50_us"], 1), _f(b["p99_us"], 1),
                          _f(b["max_us"], 0), _ratio(r.get("ratio"))]  # fmt: skip
            else:
                cells += ["(absent)", "", "", "", ""]
            L.append("| " + " | ".join(cells) + " |")
    if mg and d:
        L.append("")
        L.append(
            f"tiered store, memory hits/misses: (1) {_f(mg['tiered_memory_hit_ratio'], 4)} / "
            f"{mg['tiered_memory_misses']} misses; (3) "
            f"{_f(d['get']['tiered_memory_hit_ratio'], 4)} / {d['get']['tiered_memory_misses']} misses; "
            f"bloom false-positive rate "
            f"{_f(d['bloom_false_positive_rate'], 4)}; files per level {d['files_per_level']}"
        )
    sp = res.get("spill")
    if not sp:
        return "\n".join(L)
    L += [
        "",
        f"5. spill: {sp['tiered']['keys']:,} keys x {sp['tiered']['value_size']} B values "
        f"({sp['tiered']['user_bytes'] / 1e9:.2f} GB of key+value), random order, durability none / "
        f"sync=False, shmkv memory {sp['memory']}",
        "",
        "| engine | puts/s p50 | puts/s min | p50 us | p99 us | load s | settle s | close s | elapsed s "
        "| WA own stats | WA wchar | WA write_bytes | disk GB | files/level |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for eng in ("tiered", "leveldb"):
        e = sp.get(eng)
        if e is None:
            continue
        own = _f(e.get("own_write_amplification"), 2)
        L.append(
            f"| {'shmkv tiered' if eng == 'tiered' else 'leveldb'} | {_f(e['puts_s_p50'])} | "
            f"{_f(e['puts_s_min'])} | {_f(e['p50_us'], 1)} | {_f(e['p99_us'], 1)} | "
            f"{_f(e['load_s'], 1)} | {_f(e['settle_s'], 1)} | {_f(e['close_s'], 1)} | "
            f"{_f(e['elapsed_s'], 1)} | {own} | "
            f"{_f(e['wchar_write_amplification'], 2)} | {_f(e['write_bytes_write_amplification'], 2)} | "
            f"{e['disk_bytes'] / 1e9:.2f} | {e['files_per_level']} |"
        )
    if sp.get("leveldb"):
        t, lv = sp["tiered"], sp["leveldb"]
        L.append("")
        L.append(
            f"load time shmkv/leveldb {t['load_s'] / lv['load_s']:.2f}x; "
            f"write amplification (wchar) shmkv/leveldb "
            f"{t['wchar_write_amplification'] / lv['wchar_write_amplification']:.2f}x"
            if lv["wchar_write_amplification"]
            else ""
        )
    return "\n".join(L)


# ---------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--mem-keys", type=int, default=100_000, help="keys of phase 1")
    ap.add_argument("--disk-keys", type=int, default=200_000, help="keys of phases 3-4")
    ap.add_argument(
        "--durable-ops",
        type=int,
        default=20_000,
        help="fsync puts available (x20 for interval/none)",
    )
    ap.add_argument("--scan-len", type=int, default=1000, help="keys per scanned range")
    ap.add_argument(
        "--spill-gb", type=float, default=0.25, help="million keys x 1 KiB written in phase 5"
    )
    ap.add_argument("--spill-value", type=int, default=1024)
    ap.add_argument("--spill-memory", default="64MiB")
    ap.add_argument(
        "--settle-s",
        type=float,
        default=2.5,
        help="spill: quiet time that ends the wait for compactions",
    )
    ap.add_argument(
        "--budget", type=float, default=4.0, help="seconds per timed phase (phase 1: x2)"
    )
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temp dir in /tmp)")
    ap.add_argument(
        "--no-peer", action="store_true", help="skip LevelDB even if plyvel is installed"
    )
    ap.add_argument(
        "--procs", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4],
        help="process counts of the multi-process fsync phase (2b), comma-separated",
    )  # fmt: skip
    ap.add_argument(
        "--only", type=lambda s: s.split(","), default=None,
        help="run only these phases (memory_gets,puts,fsync_procs,disk,spill), comma-separated",
    )  # fmt: skip
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("-q", "--quiet", action="store_true", help="no table on stdout")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    peer = not args.no_peer and have_plyvel()
    t0 = time.perf_counter()
    run = Run(args.dir)
    try:
        fs = fs_type(run.base)
        plyvel_version = None
        if peer:
            import plyvel

            plyvel_version = f"{plyvel.__version__} (leveldb {plyvel.__leveldb_version__})"
        meta = {
            "argv": sys.argv[1:] if argv is None else argv,
            "python": sys.version.split()[0],
            "plyvel": plyvel_version,
            "cpus": os.cpu_count(),
            "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "dir": args.dir or tempfile.gettempdir(),
            "fs": fs,
            "timer_ns": timer_overhead_ns(),
        }
        res: dict[str, Any] = {"meta": meta}
        phases: dict[str, Callable[[], dict[str, Any]]] = {
            "memory_gets": lambda: phase_memory_gets(run, args),
            "puts": lambda: phase_puts(run, args, peer),
            "fsync_procs": lambda: phase_fsync_procs(run, args, peer),
            "disk": lambda: phase_disk(run, args, peer),
            "spill": lambda: phase_spill(run, args, peer),
        }
        for ph, fn in phases.items():
            if args.only is None or ph in args.only:
                res[ph] = fn()
        meta["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        meta["wall_s"] = time.perf_counter() - t0
    finally:
        run.cleanup()
    res["markdown"] = render(res)
    if not args.quiet:
        print(res["markdown"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
