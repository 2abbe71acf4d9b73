"""Anti-entropy, measured on 3 real daemons on 127.0.0.1, all in one run.

    python bench/cluster_antientropy.py [--keys 1000000] [--diff 1000] [--value-size 100]
                                        [--window 5] [--ae-rate auto] [--limited-window 60]
                                        [--limit keys|bytes] [--ae-bytes-rate auto]
                                        [--json bench/results/cluster_antientropy.json]

The documented run is ``--keys 1000000`` (the default; 10-15 minutes on a loaded 2-core
machine, most of it loading the keys and the unlimited repair); ``--keys 30000`` is a
one-minute check of the same steps.

A 3-node cluster (N=3, W=2, R=2, memory only, ``--ae-interval 1``; tools/cluster.py, every
daemon stopped by PID at the end) is loaded with KEYS keys (``put_many``, W=3, two loaders).
Then:

1. without repair: a foreground client GETs random keys (R=2, one thread, closed loop) for
   WINDOW seconds while anti-entropy runs over equal trees -- its p50/p99, and the AE bytes of
   those idle rounds;
2. small difference: n3 is SIGKILLed (its segment stays: it comes back with its copies), DIFF
   keys are overwritten with W=2, n3 restarts; bytes exchanged per differing key until every
   node's tree digest is equal again;
3. wiped replica, no rate limit: n3 is SIGKILLed and its segment removed, then restarted empty
   with ``--ae-rate 0 --ae-bytes-rate 0``; the time until it holds all KEYS keys again (STATUS ``keys``) and the
   digests agree, the bytes per key, and the foreground p99 *during* that repair;
4. without repair again, the three nodes in agreement after step 3: the foreground p99, a
   second "without" sample, so the machine's drift over the run shows;
5. wiped replica again, restarted with ``--ae-rate RATE`` (``auto``: a third of the keys/s
   step 3 reached, so the limit binds on any machine): the foreground p99 during the repair
   and the keys/s it kept to, over at most LIMITED_WINDOW seconds (a limited repair of 1 M
   keys takes as long as the limit says; its speed is what is checked, not its end). The byte
   limit stays off in steps 3 and 5 (``--ae-bytes-rate 0``): the key limit is what is measured.
   With ``--limit bytes`` step 5 limits bytes instead: ``--ae-rate 0 --ae-bytes-rate RATE``
   (``auto``: a third of the bytes/s step 3 moved) -- the run for large values, where a key
   count lets the copies swamp the link.

Both repairs' p99 are compared with step 1's (same run: ``p99_ratio_*``). Bytes are the frames
of the AE requests each node sent and the replies it got (the nodes' own counters, STATUS
``antientropy``), summed over the three nodes; ``kv_bytes_per_key`` is the size of what has to
travel at the least -- a store key plus its stored version set -- for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _run import cluster_tool

import shmkv
from shmkv.bench.stats import percentile
from shmkv.cluster import wire
from shmkv.cluster.transport import TcpTransport
from shmkv.cluster.wire import Message

tc = cluster_tool()  # tools/cluster.py

AE = ["--ae-interval", "1", "--tombstone-grace", "3600", "--ae-rebuild", "0"]


def status(addr: str) -> dict[str, Any]:
    async def ask() -> dict[str, Any]:
        t = TcpTransport()
        try:
            reply = await t.request(addr, Message(wire.STATUS, 0, {}), 10.0)
        finally:
            await t.close()
        return dict(wire.raise_for_error(reply).fields["status"])

    return asyncio.run(ask())


def ae_bytes(st: dict[str, Any], names: tuple[str, ...] = ("n1", "n2", "n3")) -> int:
    total = 0
    for n in st["nodes"]:
        if n["name"] not in names:
            continue
        a = status(n["addr"]).get("antientropy", {})
        total += a.get("bytes_sent", 0) + a.get("bytes_received", 0)
    return total


def digests(st: dict[str, Any]) -> list[str]:
    return [status(n["addr"]).get("antientropy", {}).get("digest", "?") for n in st["nodes"]]


def wait(cond: Any, deadline: float, what: str, every: float = 0.1) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > deadline:
            raise TimeoutError(f"{what}: not within {deadline} s")
        time.sleep(every)
    return time.monotonic() - t0


class Foreground:
    """One thread of R=2 GETs of random keys, timing each; start/stop windows."""

    def __init__(self, seeds: list[str], keys: int) -> None:
        self.c = shmkv.connect(seeds, n=3, timeout=2.0)
        self.keys = keys
        self.lat: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def _run(self) -> None:
        rng = random.Random(1)
        while not self._stop.is_set():
            k = b"ae%d" % rng.randrange(self.keys)
            t0 = time.perf_counter()
            try:
                self.c.get(k)
            except shmkv.Error:
                self.errors += 1
            self.lat.append(time.perf_counter() - t0)

    def start(self) -> None:
        self.lat, self.errors = [], 0
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        assert self._t is not None
        self._t.join(10)
        lat = sorted(self.lat)
        if not lat:
            return {"ops": 0}
        return {
            "ops": len(lat), "errors": self.errors,
            "p50_ms": round(percentile(lat, 50) * 1e3, 3),
            "p99_ms": round(percentile(lat, 99) * 1e3, 3),
        }


def wiped_repair(d: Path, st: dict[str, Any], fg: Foreground, keys: int, rate: float, kv_bytes: float,
                 window: float | None = None, byte_rate: float = 0.0) -> dict[str, Any]:
    """SIGKILL n3, remove its segment, restart it empty with ``--ae-rate rate --ae-bytes-rate
    byte_rate``; measure until it is repaired (or for ``window`` seconds)."""
    n3 = next(n for n in st["nodes"] if n["name"] == "n3")
    tc.kill(d, "n3")
    tc._unlink_store(n3)
    b0 = ae_bytes(st, ("n1", "n2"))  # n3's counters restart at 0 with it
    tc.restart(d, "n3", extra=[*AE, "--ae-rate", f"{rate:g}", "--ae-bytes-rate", f"{byte_rate:.0f}"])
    load0 = os.getloadavg()[0]
    fg.start()
    t0 = time.monotonic()
    held = [0]

    def done() -> bool:
        held[0] = status(n3["addr"])["keys"]
        if window is not None and time.monotonic() - t0 >= window:
            return True
        return held[0] >= keys and len(set(digests(st))) == 1

    wait(done, 900, f"wiped-replica repair at --ae-rate {rate:g} --ae-bytes-rate {byte_rate:.0f}", every=0.25)
    took = time.monotonic() - t0
    during = fg.stop()
    got = ae_bytes(st) - b0
    a3 = status(n3["addr"])["antientropy"]
    complete = held[0] >= keys
    return {"ae_rate": rate, "ae_bytes_rate": byte_rate, "complete": complete, "seconds": round(took, 2), "keys_held": held[0],
            "keys_per_s": round(held[0] / took), "bytes": got, "bytes_per_s": round(got / took), "bytes_per_key": round(got / max(1, held[0]), 1),
            "bytes_per_key_over_kv": round(got / max(1, held[0]) / kv_bytes, 3),
            "streamed_by_n3": a3.get("streamed"), "throttled_s_n3": a3.get("throttled_s"),
            "foreground": during, "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--diff", type=int, default=1000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--ae-rate", default="auto",
                    help="the limited repair's --ae-rate in keys/s (auto: a third of the unlimited repair's)")
    ap.add_argument("--limit", choices=("keys", "bytes"), default="keys",
                    help="what the limited repair (step 5) limits")
    ap.add_argument("--ae-bytes-rate", default="auto",
                    help="with --limit bytes: its --ae-bytes-rate in bytes/s (auto: a third of the unlimited repair's)")
    ap.add_argument("--limited-window", type=float, default=60.0,
                    help="seconds the limited repair is measured for, at most")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    flags = list(AE)  # each node's --ae-rate: the default, except n3's in steps 3 and 4
    out: dict[str, Any] = {"keys": a.keys, "diff": a.diff, "value_size": a.value_size, "flags": flags, "limit": a.limit,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    d = Path(tempfile.mkdtemp(prefix="shmkv-ae-bench."))
    size = f"{max(64, (a.keys * (a.value_size + 200)) // (1 << 20) * 3)}MiB"
    t_run = time.monotonic()
    try:
        st = tc.start(3, d, size=size, timeout=2.0, join_timeout=30.0, extra=flags)
        value = b"x" * a.value_size
        t0 = time.monotonic()
        batch = 2000

        failed: list[BaseException] = []

        def load(part: int) -> None:  # two loaders: the daemons work while a batch travels
            try:
                with shmkv.connect(st["seeds"], n=3, timeout=30.0) as c:
                    for lo in range(part * batch, a.keys, 2 * batch):
                        c.put_many({b"ae%d" % i: value for i in range(lo, min(a.keys, lo + batch))}, w=3)
            except BaseException as e:  # noqa: BLE001 -- re-raised below, in the main thread
                failed.append(e)

        loaders = [threading.Thread(target=load, args=(p,)) for p in (0, 1)]
        for t in loaders:
            t.start()
        for t in loaders:
            t.join()
        if failed:
            raise failed[0]
        out["load_s"] = round(time.monotonic() - t0, 2)
        # the least a repair must move per key: the store key (b"v" + key) and its stored
        # version set, read from n1's shared-memory store (cluster/replica.py's layout)
        skey = b"vae%d" % (a.keys // 2)
        with shmkv.attach(st["nodes"][0]["store"], create=False) as kv1:
            stored = kv1.get(skey)
        out["kv_bytes_per_key"] = kv = len(skey) + len(stored or b"")
        print(f"loaded {a.keys} keys in {out['load_s']} s (key + version set: {kv} bytes)", flush=True)
        wait(lambda: len(set(digests(st))) == 1, 300, "initial agreement", every=0.5)

        fg = Foreground(st["seeds"], a.keys)
        # 1. without repair
        b0 = ae_bytes(st)
        fg.start()
        time.sleep(a.window)
        out["without"] = fg.stop()
        out["idle_ae_bytes_per_s"] = round((ae_bytes(st) - b0) / a.window, 1)
        print("without repair", out["without"], "idle AE bytes/s", out["idle_ae_bytes_per_s"], flush=True)

        # 2. a small difference: n3 misses DIFF overwrites while down, keeps the rest
        tc.kill(d, "n3")
        with shmkv.connect(st["seeds"], n=3, timeout=10.0) as c:
            for lo in range(0, a.diff, 500):
                c.put_many({b"ae%d" % i: b"y" * a.value_size for i in range(lo, min(a.diff, lo + 500))}, w=2)
        b0 = ae_bytes(st, ("n1", "n2"))
        tc.restart(d, "n3")
        took = wait(lambda: len(set(digests(st))) == 1, 300, "small-difference repair")
        diff_bytes = ae_bytes(st) - b0
        out["small_diff"] = {"keys": a.diff, "repair_s": round(took, 2), "bytes": diff_bytes,
                             "bytes_per_key": round(diff_bytes / a.diff, 1),
                             # most of repair_s: the restarted n3 builds its trees from its store
                             "n3_build_s": status(st["nodes"][2]["addr"])["antientropy"]["last_build_s"]}
        print("small diff", out["small_diff"], flush=True)

        # 3./4. a wiped replica, with the foreground running: no limit, then the limit
        out["wiped_unlimited"] = r = wiped_repair(d, st, fg, a.keys, 0.0, kv)
        r["p99_ratio_vs_without"] = round(r["foreground"]["p99_ms"] / out["without"]["p99_ms"], 2)
        print("wiped, no limit", r, flush=True)
        rate = float(r["keys_per_s"]) / 3 if a.ae_rate == "auto" else float(a.ae_rate)
        rate = float(max(100, round(rate, -2)))
        byte_rate = 0.0
        if a.limit == "bytes":  # the bytes limited instead of the keys
            byte_rate = float(r["bytes_per_s"]) / 3 if a.ae_bytes_rate == "auto" else float(a.ae_bytes_rate)
            rate, byte_rate = 0.0, float(max(65536, round(byte_rate, -3)))

        # 4. without repair, again
        fg.start()
        time.sleep(a.window)
        out["without_after"] = fg.stop()
        print("without repair (after)", out["without_after"], flush=True)

        # 5. the wiped replica at the limit, for at most LIMITED_WINDOW seconds
        out["wiped_limited"] = r = wiped_repair(d, st, fg, a.keys, rate, kv, window=a.limited_window,
                                                byte_rate=byte_rate)
        r["p99_ratio_vs_without"] = round(r["foreground"]["p99_ms"] / out["without"]["p99_ms"], 2)
        print("wiped, limited", r, flush=True)
        fg.c.close()
    finally:
        tc.stop(d, grace=5)
        shutil.rmtree(d, ignore_errors=True)
    out["run_s"] = round(time.monotonic() - t_run, 1)
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
