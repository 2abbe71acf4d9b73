"""Auto-balance in real daemons (tools/cluster.py --raft, ``--auto-balance`` with short windows).

Three nodes, N=2 (with N=3 of 3 nodes every node holds every key and weights move nothing).
A skewed load -- every operation on keys n1 replicates -- must make the leader commit a weight
change for n1 that ``cluster status --json`` and the metrics show, while every acknowledged
write stays readable; a uniform load over the same period must change nothing. Every process is
started through tools/cluster.py and stopped by PID in the teardown.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import shmkv
from shmkv.cluster.config_client import group_status
from shmkv.errors import Error

from .local_cluster import ROOT, poll, start, stop

pytestmark = pytest.mark.slow

FLAGS = ["--auto-balance", "--balance-window", "2", "--balance-cooldown", "3", "--balance-interval", "0.5",
         "--ae-interval", "0"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    d = tmp_path / "c"
    state = start(d, 3, n=2, w=2, r=2, raft=True, metrics=True, extra=FLAGS)  # stops what it began if it fails
    try:
        yield state
    finally:
        stop(d)


def _poll(what: str, fn: Callable[[], Any], within: float = 20.0) -> Any:
    return poll(what, fn, within, every=0.2)


def _leader(seeds: list[str]) -> dict[str, Any] | None:
    st = group_status(seeds, 0.5)
    return st if st is not None and st["leader"] is not None and st["epoch"] >= 1 else None


class Load:
    """One client thread: puts (acknowledged ones recorded) and gets of ``keys``, and reads back
    already-acknowledged keys all along; a read that misses an acknowledged value is recorded."""

    def __init__(self, seeds: list[str], keys: list[bytes]) -> None:
        self.seeds, self.keys = seeds, keys
        self.acked: dict[bytes, bytes] = {}
        #: per key, the values of the puts that failed since its last acknowledged one: a failed
        #: write may have been applied (MaybeApplied, a time-out after sending), so a read may
        #: return one of them -- never anything older than the acknowledged value
        self.maybe: dict[bytes, set[bytes]] = {}
        self.missed: list[str] = []
        self.errors = 0
        self.ops = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(7)
        with shmkv.connect(self.seeds, n=2, w=2, r=2, timeout=2.0) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                key = rng.choice(self.keys)
                try:
                    value = None
                    if i % 2:
                        value = f"v{i}".encode()
                        c.put(key, value)
                        self.acked[key] = value
                        self.maybe.pop(key, None)
                    elif self.acked:
                        k = rng.choice(list(self.acked))
                        want = self.acked[k]
                        got = c.get(k)
                        if not self.readable(k, got) and self.acked.get(k) == want:  # nobody wrote it since
                            self.missed.append(f"{k!r}: {got!r} != {want!r}")
                    self.ops += 1
                except Error:  # a refused / timed-out request (mid-switch): maybe applied, or retried
                    self.errors += 1
                    if value is not None:
                        self.maybe.setdefault(key, set()).add(value)
                    time.sleep(0.01)

    def readable(self, key: bytes, got: bytes | None) -> bool:
        """``got`` is what a read of ``key`` may return: its acknowledged value, or a later put's
        that failed (maybe applied)."""
        return got == self.acked.get(key) or got in self.maybe.get(key, ())

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def _status(seeds: list[str], *more: str) -> str:
    out = subprocess.run([sys.executable, "-m", "shmkv.cli", "cluster", "status", "--seeds", ",".join(seeds),
                          *more], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _metrics(node: dict[str, Any]) -> str:
    with urllib.request.urlopen(f"http://{node['metrics']}/metrics", timeout=5) as r:
        return str(r.read().decode())


def _keys(seeds: list[str], where: Callable[[list[str]], bool], count: int) -> list[bytes]:
    with shmkv.connect(seeds, n=2, w=2, r=2) as c:
        assert c.ring is not None
        ring = c.ring
    keys = [f"k{i}".encode() for i in range(20 * count)]
    return [k for k in keys if where(ring.preference_list(k, 2))][:count]


def test_a_node_carrying_the_hot_keys_is_reweighted_and_nothing_is_lost(cluster: dict[str, Any]) -> None:
    seeds = cluster["seeds"]
    _poll("a leader", lambda: _leader(seeds))
    hot = _keys(seeds, lambda pl: "n1" in pl, 300)  # n1 serves every op, n2 and n3 half each
    with Load(seeds, hot) as load:
        # the epoch is served as soon as the change commits, a moment before the leader's
        # change() returns and counts it: wait for both
        st = _poll("an auto-balance change committed", lambda: (s := group_status(seeds, 0.5)) and s["epoch"] >= 2
                   and (s["balance"] or {}).get("adjustments", 0) >= 1 and s, within=25.0)
        time.sleep(1.0)  # reads and writes go on over the new ring
    print(f"{load.ops} ops, {load.errors} refused/retried; balance: {st['balance']}")
    assert not load.missed, load.missed[:3]
    bal = st["balance"]
    assert bal["enabled"] and bal["adjustments"] >= 1
    # the change takes share from n1 (1.5x its share): n1 down, or a cold one (0.75x) up
    last = bal["last"]
    assert (last["name"] == "n1") == (last["to"] < last["from"]), last
    assert (last["load"] > 1.25) == (last["name"] == "n1"), last
    out = json.loads(_status(seeds, "--json"))
    weights = {m["name"]: m["weight"] for m in out["members"]}
    assert weights["n1"] / sum(weights.values()) < 1 / 3, weights
    assert out["config"]["balance"]["adjustments"] >= 1
    text = _status(seeds)
    assert "auto-balance (ops): " in text and f"last {last['name']} {last['from']:g} -> {last['to']:g}" in text, text
    # every acknowledged write is readable after the change, through any coordinator
    with shmkv.connect(seeds, n=2, w=2, r=2, timeout=2.0) as c:
        got = c.get_many(list(load.acked))
        missing = [k for k in load.acked if not load.readable(k, got.get(k))]
        assert not missing, f"{len(missing)} acknowledged writes unreadable, e.g. {missing[:3]}"
    # the metrics: the leader counted its change; every node exports the ring's weights
    lead = next(n for n in cluster["nodes"] if n["name"] == st["leader"]["name"])
    text = _metrics(lead)
    assert "shmkv_balance_adjustments_total" in text
    adj = [ln for ln in text.splitlines() if ln.startswith("shmkv_balance_adjustments_total")]
    assert float(adj[0].split()[-1]) >= 1, adj
    assert 'shmkv_balance_load{member="n1"}' in text
    other = next(n for n in cluster["nodes"] if n["name"] != lead["name"])
    moved = last["name"]
    _poll("the new weight in every node's metrics",
          lambda: f'shmkv_member_weight{{member="{moved}"}} {weights[moved]}' in _metrics(other), within=5.0)
    assert f'shmkv_member_configured_weight{{member="{moved}"}} 1.0' in text


def test_a_uniform_load_changes_nothing(cluster: dict[str, Any]) -> None:
    seeds = cluster["seeds"]
    _poll("a leader", lambda: _leader(seeds))
    keys = _keys(seeds, lambda pl: True, 600)
    with Load(seeds, keys) as load:
        _poll("the leader judging the loads", lambda: (s := group_status(seeds, 0.5))
              and (s.get("balance") or {}).get("loads") and s, within=15.0)
        time.sleep(8.0)  # longer than the first change took under the skewed load
        st = group_status(seeds, 0.5)
    print(f"{load.ops} ops; balance: {st and st['balance']}")
    assert not load.missed, load.missed[:3]
    assert st is not None and st["epoch"] == 1, st
    assert st["balance"]["adjustments"] == 0
    assert all(abs(v - 1.0) < 0.25 for v in st["balance"]["loads"].values()), st["balance"]
