"""Failure handling with real daemons: time to detect a killed and a paused node, hint catch-up rate.

Run::

    python bench/cluster_failures.py [--rounds 3] [--keys 20000] [--persist] [--json bench/results/cluster_failures.json]

What it starts, on 127.0.0.1, stopped at the end: a 3-node shmkv cluster (tools/cluster.py, one
worker per node, the default settings: gossip every 1 s, phi threshold 8).

1. **Detection of a SIGKILLed node**: ``--rounds`` times: kill n3, poll n1's and n2's STATUS
   (theirs only) every 50 ms until both hold n3 down; the time from the kill to that is the detection time;
   then restart n3 and wait until both hold it up again (the time from its "ready" is reported).
2. **Detection of a SIGSTOPped node**: the same with SIGSTOP; after 2 s more, SIGCONT and the
   time until both hold it up.
3. **Hint catch-up**: with n3 killed and known down, ``--keys`` keys of 100 B are written with
   ``put_many`` (W=2; every write of a key whose preference list holds n3 -- all of them, N=3 of 3
   nodes -- leaves a hint for n3 on its coordinator); n3 is restarted; the catch-up rate is
   hints delivered / (the time from the first delivery seen to the last), from the nodes' STATUS
   (hints pending) polled every 50 ms. With ``--persist`` the nodes run with ``--path`` (hints
   fsynced to disk, durability fsync).

Percentiles are over the rounds (median, max); every number comes from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _run import cluster_tool

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.wire import Message

tc = cluster_tool()  # tools/cluster.py

POLL = 0.05


def _status(c: shmkv.Client, addr: str) -> dict[str, Any]:
    """One node's STATUS (``Client.status`` asks every member, and a paused one would make each
    poll wait for its time-out)."""
    reply = c.request(addr, Message(wire.STATUS, 0, {}), 1.0)
    return dict(reply.fields["status"])


def _states(c: shmkv.Client, victim: str) -> dict[str, str | None]:
    assert c.ring is not None
    out = {}
    for m in c.ring.members.values():
        if m.name != victim:
            st = _status(c, m.addr)
            out[m.name] = ((st.get("members") or {}).get(victim) or {}).get("state")
    return out


def _wait(c: shmkv.Client, victim: str, state: str, t0: float, limit: float = 30.0) -> float:
    while True:
        s = _states(c, victim)
        if len(s) == 2 and all(v == state for v in s.values()):
            return time.monotonic() - t0
        if time.monotonic() - t0 > limit:
            raise RuntimeError(f"{victim} not {state} after {limit} s: {s}")
        time.sleep(POLL)


def _pending(c: shmkv.Client) -> int:
    return sum((st.get("hints") or {}).get("pending", 0) for st in c.status() if "error" not in st)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--persist", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="shmkv-failbench-"))
    out: dict[str, Any] = {"rounds": a.rounds, "keys": a.keys, "persist": a.persist}
    try:
        st = tc.start(3, d, persist=a.persist, size="256MiB")
        pid3 = lambda: next(n["pid"] for n in json.loads((d / "cluster.json").read_text())["nodes"] if n["name"] == "n3")  # noqa: E731
        with shmkv.connect(st["seeds"][:2], n=3, timeout=1.0) as c:
            _wait(c, "n3", "up", time.monotonic())
            kill, kill_up, stop, stop_up = [], [], [], []
            for _ in range(a.rounds):
                time.sleep(2.0)
                t0 = time.monotonic()
                tc.kill(d, "n3")
                kill.append(_wait(c, "n3", "down", t0))
                tc.restart(d, "n3")
                kill_up.append(_wait(c, "n3", "up", time.monotonic()))
                time.sleep(2.0)
                pid = pid3()
                t0 = time.monotonic()
                os.kill(pid, signal.SIGSTOP)
                try:
                    stop.append(_wait(c, "n3", "down", t0))
                    time.sleep(2.0)
                finally:
                    os.kill(pid, signal.SIGCONT)
                stop_up.append(_wait(c, "n3", "up", time.monotonic()))
            out["detect_killed_s"] = {"median": statistics.median(kill), "max": max(kill), "all": kill}
            out["detect_paused_s"] = {"median": statistics.median(stop), "max": max(stop), "all": stop}
            out["up_after_restart_s"] = {"median": statistics.median(kill_up), "max": max(kill_up)}
            out["up_after_sigcont_s"] = {"median": statistics.median(stop_up), "max": max(stop_up)}
            # -- hint catch-up
            tc.kill(d, "n3")
            _wait(c, "n3", "down", time.monotonic())
            value = b"x" * 100
            t0 = time.monotonic()
            batch = 500
            for i in range(0, a.keys, batch):
                c.put_many({b"hk%d" % j: value for j in range(i, min(a.keys, i + batch))})
            out["write_s"] = time.monotonic() - t0
            time.sleep(1.5)  # the workers' counts are published once a round
            before = _pending(c)
            out["hints_taken"] = before
            tc.restart(d, "n3")
            t_ready = time.monotonic()
            first = last = None
            while True:
                p = _pending(c)
                now = time.monotonic()
                if first is None and p < before:
                    first = now
                if p == 0:
                    last = now
                    break
                if now - t_ready > 300:
                    raise RuntimeError(f"{p} hints still pending after 300 s")
                time.sleep(POLL)
            assert first is not None and last is not None
            out["catchup_from_ready_s"] = last - t_ready
            out["catchup_keys_per_s"] = before / max(last - first, POLL)
    finally:
        tc.stop(d, grace=5)
        shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
