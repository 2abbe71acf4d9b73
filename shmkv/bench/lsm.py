"""The engine of bench/lsm_bench.py: the LSM spill tier (shmkv.lsm) beside LevelDB (plyvel)
or RocksDB (rocksdict).

What is measured, for each engine, in the same run and the same directory file system:

* durable puts per durability mode -- "fsync" (fsync before put returns; LevelDB ``sync=True``),
  "interval" (group commit every 50 ms; LevelDB has no such mode: n/a) and "none" (WAL written,
  never fsynced; LevelDB ``sync=False``). The "none" run loads the data set used by the reads.
* random gets of keys that are all on disk (the store is flushed and reopened first),
* negative lookups (absent keys inside the key range: the bloom filters answer),
* full scans (keys/s and MB/s),
* write amplification: bytes handed to write(2) during the "none" load (``/proc/self/io``
  ``wchar``, counted identically for both engines, background compaction included, measured
  after close) / key+value bytes put. shmkv also reports its own figure from ``stats()``.

Every op is timed on its own: latencies are reported as p50 / p90 / p99 / max, never a mean.
Throughput is the median over 5 equal slices of the run ("ops/s p50"), with the slowest slice
beside it ("ops/s min").

The command and the last results are in bench/lsm_bench.py's docstring.
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
from collections.abc import Callable
from typing import Any

from shmkv.bench.stats import percentile
from shmkv.lsm import LSM


def wchar() -> int:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(ops: list[Any], fn: Callable[[Any], object], budget_s: float) -> dict[str, float]:
    """Run fn over ops (stopping after budget_s); per-op latency percentiles and slice rates."""
    lat: list[int] = []
    pc = time.perf_counter_ns
    deadline = pc() + int(budget_s * 1e9)
    for op in ops:
        t = pc()
        fn(op)
        lat.append(pc() - t)
        if lat and len(lat) % 64 == 0 and pc() > deadline:
            break
    n = len(lat)
    k = max(1, n // 5)
    slices = [n_ / (sum(lat[i : i + k]) / 1e9) for i in range(0, n - k + 1, k) for n_ in [k]]
    s = sorted(lat)

    def pct(p: float) -> float:
        return percentile(s, p * 100) / 1000.0  # nearest rank, as every bench

    return {
        "ops": n,
        "ops_s_p50": statistics.median(slices),
        "ops_s_min": min(slices),
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "max_us": s[-1] / 1000.0,
    }


class Shmkv:
    name = "shmkv.lsm"

    memtable_bytes = 4 << 20

    def __init__(self, path: str, mode: str) -> None:
        self.db = LSM(path, durability=mode, memtable_bytes=self.memtable_bytes)
        self.path = path

    def put(self, kv: tuple[bytes, bytes]) -> None:
        self.db.put(kv[0], kv[1])

    def get(self, k: bytes) -> bytes | None:
        return self.db.get(k)

    def scan(self) -> tuple[int, int]:
        n = b = 0
        for k, v in self.db.scan():
            n += 1
            b += len(k) + len(v)
        return n, b

    def flush(self) -> None:
        self.db.flush()

    def extra(self) -> dict[str, Any]:
        s = self.db.stats()
        return {
            "own_write_amplification": round(s["write_amplification"], 2),
            "files_per_level": s["files_per_level"],
            "bloom_fp_rate": round(s["bloom_false_positive_rate"], 4),
        }

    def close(self) -> None:
        self.db.close()


class Plyvel:
    name = "leveldb (plyvel)"

    def __init__(self, path: str, mode: str) -> None:
        import plyvel

        self.db = plyvel.DB(path, create_if_missing=True, bloom_filter_bits=10)
        self.sync = mode == "fsync"

    def put(self, kv: tuple[bytes, bytes]) -> None:
        self.db.put(kv[0], kv[1], sync=self.sync)

    def get(self, k: bytes) -> bytes | None:
        return self.db.get(k)  # type: ignore[no-any-return]

    def scan(self) -> tuple[int, int]:
        n = b = 0
        for k, v in self.db.iterator():
            n += 1
            b += len(k) + len(v)
        return n, b

    def flush(self) -> None:
        self.db.compact_range()  # the only way to push the memtable to disk through plyvel

    def extra(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.db.close()


class RocksDict:
    name = "rocksdb (rocksdict)"

    def __init__(self, path: str, mode: str) -> None:
        import rocksdict

        self.rd = rocksdict
        self.db = rocksdict.Rdict(path)
        self.wo = rocksdict.WriteOptions()
        self.wo.sync = mode == "fsync"
        self.db.set_write_options(self.wo)

    def put(self, kv: tuple[bytes, bytes]) -> None:
        self.db[kv[0]] = kv[1]

    def get(self, k: bytes) -> bytes | None:
        return self.db.get(k)  # type: ignore[no-any-return]

    def scan(self) -> tuple[int, int]:
        n = b = 0
        for k, v in self.db.items():
            n += 1
            b += len(k) + len(v)
        return n, b

    def flush(self) -> None:
        self.db.flush()

    def extra(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.db.close()


def peer() -> type | None:
    for cls, mod in ((Plyvel, "plyvel"), (RocksDict, "rocksdict")):
        try:
            __import__(mod)
            return cls
        except ImportError:
            continue
    return None


def bench_engine(cls: type, args: argparse.Namespace, base: str) -> dict[str, Any]:
    rnd = random.Random(42)
    keys = [b"key%012d" % i for i in range(args.keys)]
    rnd.shuffle(keys)
    # Half random, half repeated: compresses about 2:1, like typical cached payloads.
    half = args.value_size // 2
    items = [(k, (rnd.randbytes(half) + k * (half // len(k) + 1))[: args.value_size]) for k in keys]
    out: dict[str, Any] = {"engine": cls.name}  # type: ignore[attr-defined]

    for mode in ("fsync", "interval"):
        if cls is not Shmkv and mode == "interval":
            out[f"put_{mode}"] = None
            continue
        path = os.path.join(base, f"{mode}")
        e = cls(path, mode)
        out[f"put_{mode}"] = timed(items[: args.durable_ops], e.put, args.budget)
        e.close()
        shutil.rmtree(path)

    path = os.path.join(base, "load")
    w0 = wchar()
    e = cls(path, "none")
    out["put_none"] = timed(items, e.put, 10 * args.budget)
    loaded = out["put_none"]["ops"]
    e.flush()
    e.close()  # waits for background compaction (LevelDB), so its writes are counted
    user = sum(len(k) + len(v) for k, v in items[:loaded])
    out["write_amplification"] = round((wchar() - w0) / user, 2)
    out["disk_bytes"] = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))

    e = cls(path, "none")  # reopened: gets are served from disk files, not a memtable
    present = [k for k, _ in items[:loaded]]
    probe = [rnd.choice(present) for _ in range(args.reads)]
    out["get_random"] = timed(probe, e.get, args.budget)
    absent = [b"key%012dx" % rnd.randrange(args.keys) for _ in range(args.reads)]
    out["get_negative"] = timed(absent, e.get, args.budget)
    scans = []
    for _ in range(3):
        t = time.perf_counter()
        n, nbytes = e.scan()
        dt = time.perf_counter() - t
        scans.append((n / dt, nbytes / dt / 1e6))
    out["scan"] = {
        "keys": n,
        "keys_s_p50": statistics.median(s[0] for s in scans),
        "mb_s_p50": statistics.median(s[1] for s in scans),
    }
    out.update(e.extra())
    e.close()
    shutil.rmtree(path)
    return out


def fmt_row(name: str, r: dict[str, float] | None) -> str:
    if r is None:
        return f"  {name:<14} {'n/a':>10}"
    return (
        f"  {name:<14} {r['ops_s_p50']:>10.0f} {r['ops_s_min']:>10.0f} {r['p50_us']:>9.1f} "
        f"{r['p90_us']:>9.1f} {r['p99_us']:>9.1f} {r['max_us']:>10.1f}  (n={r['ops']})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=200_000, help="keys loaded (durability none)")
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument(
        "--durable-ops", type=int, default=2000, help="puts timed in fsync/interval mode"
    )
    ap.add_argument("--reads", type=int, default=20_000)
    ap.add_argument("--budget", type=float, default=3.0, help="seconds per timed phase (load: 10x)")
    ap.add_argument(
        "--dir", default=None, help="where to put the stores (default: a temp dir in /tmp)"
    )
    ap.add_argument(
        "--memtable-mib", type=float, default=4.0,
        help="shmkv memtable_bytes (4: LevelDB's write_buffer_size, for comparable settings)",
    )
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    Shmkv.memtable_bytes = int(args.memtable_mib * (1 << 20))
    engines: list[type] = [Shmkv]
    p = None if args.no_peer else peer()
    if p is not None:
        engines.append(p)
    results = []
    for cls in engines:
        base = tempfile.mkdtemp(prefix="lsm-bench-", dir=args.dir)
        try:
            results.append(bench_engine(cls, args, base))
        finally:
            shutil.rmtree(base, ignore_errors=True)

    print(
        f"keys={args.keys} value={args.value_size} B  python {sys.version.split()[0]}  "
        f"fs of {args.dir or tempfile.gettempdir()}"
    )
    for r in results:
        print(f"\n{r['engine']}")
        print(
            f"  {'op':<14} {'ops/s p50':>10} {'ops/s min':>10} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'max us':>10}"
        )
        for op in ("put_fsync", "put_interval", "put_none", "get_random", "get_negative"):
            print(fmt_row(op, r[op]))
        s = r["scan"]
        print(
            f"  scan           {s['keys_s_p50']:>10.0f} keys/s, {s['mb_s_p50']:.1f} MB/s (p50 of 3 full scans)"
        )
        print(
            f"  write amplification {r['write_amplification']} (wchar / user bytes); disk {r['disk_bytes']} B"
            + (
                f"; own stats: {r['own_write_amplification']}, files/level {r['files_per_level']}, "
                f"bloom FP {r['bloom_fp_rate']}"
                if "own_write_amplification" in r
                else ""
            )
        )
    if p is None and not args.no_peer:
        print("\n(no peer: pip install plyvel or rocksdict to measure LevelDB/RocksDB beside it)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
