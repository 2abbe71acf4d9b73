"""Live scaling: leader election after a SIGKILL, and streaming a node's share when it joins
and when it leaves, with the p99 of foreground requests meanwhile -- all from one run.

Run::

    python bench/cluster_scaling.py [--keys 20000] [--value 1000] [--stream-rate 20M] [--json bench/results/cluster_scaling.json]

What it starts, on 127.0.0.1, stopped at the end by PID: a 3-node cluster with the configuration
group (tools/cluster.py --raft, N=3 W=2 R=2, ``--stream-rate`` on every node), preloaded with
``--keys`` keys of ``--value`` bytes. A foreground client (one thread, a get then a put of a
preloaded key every 2 ms) runs throughout; its request latencies are bucketed by phase:

- ``baseline``: 5 s with nothing moving;
- ``join``: a 4th node joins (``--join``: it adds itself); its time runs from when the node
  serves (just after its add commits: the pushes may start a little earlier, so the time is a
  slight underestimate) until the group reports the move over (every old owner pushed and
  reported, rebalance.py); the latencies include the node's start;
- ``leave``: ``remove`` of that node, from its commit until the move is over;
- then the leader is SIGKILLed (twice, restarted in between) and the time until a survivor
  reports a new leader is measured.

Streaming: the time of each move, the bytes every pusher sent (``rebalance.bytes_sent`` summed
over the nodes: every old owner pushes its copies, so a copy is sent once per old owner holding
it) and the node's *share* -- the distinct copies whose owners changed (keys it gained on join,
keys it held on leave, x the size of one) -- each as MB/s over the move's time. The p99 ratios
are against the baseline p99 of the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _run import cluster_tool

import shmkv
from shmkv.bench.stats import percentile
from shmkv.cluster.config_client import group_status, propose

tc = cluster_tool()  # tools/cluster.py


def _poll(what: str, fn: Any, within: float) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    raise SystemExit(f"bench: {what} not within {within:g} s")


class Foreground:
    """One client thread: get then put of a preloaded key every ``period`` s; latencies (ms)
    go to the current phase's bucket."""

    def __init__(self, seeds: list[str], keys: list[bytes], value: bytes, period: float = 0.002) -> None:
        self.seeds, self.keys, self.value, self.period = seeds, keys, value, period
        self.phase = "warmup"
        self.lat: dict[str, list[float]] = {}
        self.errors: dict[str, int] = {}
        self.samples: dict[str, str] = {}  # the first error of each phase
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with shmkv.connect(self.seeds, n=3, timeout=2.0) as c:
            i = 0
            while not self.stop.is_set():
                key = self.keys[i % len(self.keys)]
                i += 7919
                for op in (lambda key=key: c.get(key), lambda key=key: c.put(key, self.value)):
                    phase = self.phase
                    t0 = time.perf_counter()
                    try:
                        op()
                    except shmkv.Error as e:
                        self.errors[phase] = self.errors.get(phase, 0) + 1
                        self.samples.setdefault(phase, f"{type(e).__name__}: {e}"[:300])
                        continue
                    self.lat.setdefault(phase, []).append((time.perf_counter() - t0) * 1000)
                time.sleep(self.period)

    def p99(self, phase: str) -> float:
        xs = sorted(self.lat.get(phase, []))
        return round(percentile(xs, 99), 2) if xs else float("nan")

    def p50(self, phase: str) -> float:
        xs = sorted(self.lat.get(phase, []))
        return round(percentile(xs, 50), 2) if xs else float("nan")


def _sent(addrs: list[str]) -> int:
    from shmkv.cluster import wire
    from shmkv.cluster.transport import TcpTransport, run
    from shmkv.cluster.wire import Message

    async def go() -> int:
        t = TcpTransport()
        total = 0
        try:
            for a in addrs:
                try:
                    r = await t.request(a, Message(wire.CONFIG, 0, {}), 1.0)
                    total += int(((r.fields.get("raft") or {}).get("rebalance") or {}).get("bytes_sent") or 0)
                except Exception:  # noqa: BLE001 -- a node gone counts nothing
                    pass
        finally:
            await t.close()
        return total

    return run(go())


def _move(fg: Foreground, phase: str, addrs: list[str], start: Any) -> dict[str, float]:
    before = _sent(addrs)
    fg.phase = phase
    cfg = start()  # returns at the commit (join: once the node serves, just after its add commits)
    t0 = time.monotonic()
    _poll(f"{phase}: the move over", lambda: (s := group_status(addrs, 0.5)) is not None and s.get("moving") is None
          and (s.get("epoch") or 0) > cfg.epoch, within=600)
    secs = time.monotonic() - t0
    fg.phase = "between"
    return {"seconds": round(secs, 2), "bytes_sent": _sent(addrs) - before, "epoch": cfg.epoch}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--value", type=int, default=1000)
    ap.add_argument("--stream-rate", default="20M")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="shmkv-scaling."))
    out: dict[str, Any] = {"keys": a.keys, "value_bytes": a.value, "stream_rate": a.stream_rate}
    fg: Foreground | None = None
    try:
        st = tc.start(3, d, join_timeout=20, raft=True, size="256MiB", extra=["--stream-rate", a.stream_rate])
        seeds = st["seeds"]
        _poll("a leader", lambda: (g := group_status(seeds, 0.5)) and g.get("leader"), within=30)
        value = b"v" * a.value
        keys = [f"key{i:08d}".encode() for i in range(a.keys)]
        with shmkv.connect(seeds, n=3, timeout=5.0) as c:
            for i in range(0, len(keys), 500):
                c.put_many({k: value for k in keys[i:i + 500]})
        fg = Foreground(seeds, keys, value)
        fg.t.start()
        time.sleep(1.0)
        fg.phase = "baseline"
        time.sleep(5.0)
        # join: the new node adds itself (--join); the move starts at the add's commit
        holder: dict[str, Any] = {}

        addrs4 = list(seeds)

        def join() -> Any:
            e0 = (group_status(seeds, 0.5) or {}).get("epoch") or 1
            node = tc.add_node(d)  # returns once the node serves: its add is committed (epoch e0 + 1)
            holder["node"] = node
            addrs4.append(node["addr"])
            return _Cfg(e0 + 1)

        out["join"] = _move(fg, "join", addrs4, join)
        node = holder["node"]
        with shmkv.connect(seeds, n=3, timeout=5.0) as c:
            assert c.ring is not None
            share = sum(node["name"] in c.ring.preference_list(k, 3) for k in keys)
        item = a.value + len(keys[0]) + 40  # a copy on the wire: key, value, version (about)
        out["join"]["share_keys"] = share
        time.sleep(2.0)
        fg.phase = "baseline2"
        time.sleep(3.0)
        out["leave"] = _move(fg, "leave", addrs4, lambda: propose(seeds, {"op": "remove", "name": node["name"]}, 30))
        out["leave"]["share_keys"] = share
        for ph in ("join", "leave"):
            r = out[ph]
            r["share_mb_s"] = round(r["share_keys"] * item / 1e6 / r["seconds"], 2)
            r["sent_mb_s"] = round(r["bytes_sent"] / 1e6 / r["seconds"], 2)
        tc.kill(d, node["name"], signal.SIGTERM)
        fg.stop.set()
        fg.t.join(30)
        for ph in ("baseline", "join", "baseline2", "leave"):
            out.setdefault("p99_ms", {})[ph] = fg.p99(ph)
            out.setdefault("p50_ms", {})[ph] = fg.p50(ph)
            out.setdefault("requests", {})[ph] = len(fg.lat.get(ph, []))
        out["errors"] = dict(fg.errors)
        out["first_error"] = dict(fg.samples)
        base = out["p99_ms"]["baseline"]
        out["p99_join_over_baseline"] = round(out["p99_ms"]["join"] / base, 2)
        out["p99_leave_over_baseline"] = round(out["p99_ms"]["leave"] / base, 2)
        # elections: SIGKILL the leader, time until a survivor reports another one
        out["election_s"] = []
        for _ in range(2):
            g = _poll("a leader", lambda: (g := group_status(seeds, 0.5)) and g.get("leader") and g, within=30)
            lead = g["leader"]["name"]
            t0 = time.monotonic()
            tc.kill(d, lead)
            rest = [n["addr"] for n in st["nodes"] if n["name"] != lead]
            _poll("a new leader", lambda rest=rest, lead=lead: (h := group_status(rest, 0.3))
                  and h.get("leader") and h["leader"]["name"] != lead, within=30)
            out["election_s"].append(round(time.monotonic() - t0, 2))
            tc.restart(d, lead)
    finally:
        if fg is not None:
            fg.stop.set()
        tc.stop(d, grace=5)
        shutil.rmtree(d, ignore_errors=True)
    print(f"{a.keys} keys of {a.value} B, N=3, --stream-rate {a.stream_rate}; a 4th node joins, then leaves")
    print(f"{'phase':10} {'seconds':>8} {'share keys':>10} {'share MB/s':>10} {'sent MB':>8} {'sent MB/s':>9}")
    for ph in ("join", "leave"):
        r = out[ph]
        print(f"{ph:10} {r['seconds']:>8} {r['share_keys']:>10} {r['share_mb_s']:>10} "
              f"{r['bytes_sent'] / 1e6:>8.1f} {r['sent_mb_s']:>9}")
    print("foreground p50 / p99 ms (requests): " + ", ".join(
        f"{ph} {out['p50_ms'][ph]} / {out['p99_ms'][ph]} ({out['requests'][ph]})" for ph in out["p99_ms"]))
    print(f"p99 join / baseline: {out['p99_join_over_baseline']}; leave / baseline: {out['p99_leave_over_baseline']}; "
          f"errors {out['errors']}")
    print(f"new leader after SIGKILL of the leader: {', '.join(f'{s} s' for s in out['election_s'])}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


class _Cfg:
    """The part of a committed configuration _move needs (its epoch)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch


if __name__ == "__main__":
    sys.exit(main())
