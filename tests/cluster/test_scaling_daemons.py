"""Live scaling with real daemons (tools/cluster.py --raft): add and remove a node under a
write load, and SIGKILL a pushing node mid-transfer.

Reads are checked *during* the move, not only after: a reader thread reads acknowledged keys
(each written once, with its own value) the whole time, and the test records how many of its
reads ran while the group reported a move under way. ``--stream-rate`` is set low so each move
lasts seconds. Every process is started through tools/cluster.py and stopped by PID; times are
polled with generous deadlines, never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmkv
from shmkv.cluster.config_client import group_status

from .test_config_integration import _cli, _has, _leader, _poll, _raw_views, _replica_get

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("shmkv_tools_cluster_scaling", ROOT / "tools" / "cluster.py")
assert _spec is not None and _spec.loader is not None
tc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tc)

pytestmark = pytest.mark.slow

PRELOAD = 3000
VALUE = b"x" * 200


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    d = tmp_path / "c"
    rate = getattr(request, "param", "150K")
    persist = isinstance(rate, tuple)  # ("100K", "persist"): every node with --path (fsync)
    if persist:
        rate = rate[0]
    try:
        state = tc.start(3, d, join_timeout=20.0, raft=True, persist=persist, extra=["--stream-rate", rate])
        state["dir"] = d
        _poll("a leader", lambda: _leader(state["seeds"]))
        with shmkv.connect(state["seeds"], n=3, timeout=2.0) as c:
            items = {f"pre{i}".encode(): VALUE + str(i).encode() for i in range(PRELOAD)}
            keys = list(items)
            for i in range(0, len(keys), 500):
                c.put_many({k: items[k] for k in keys[i:i + 500]})
        state["preloaded"] = items
        yield state
    finally:
        tc.stop(d, grace=5)
        for node in json.loads((d / "cluster.json").read_text())["nodes"]:
            assert not tc._alive(node), node


class Load:
    """A writer (new keys, each once) and a reader (acknowledged keys, each must read back its
    value) until ``stop``; ``moving`` is set by the test while the group reports a move."""

    def __init__(self, seeds: list[str], acked: dict[bytes, bytes]) -> None:
        self.seeds = seeds
        self.acked = acked  # the preload, then every acknowledged write
        self.stop = threading.Event()
        self.moving = threading.Event()
        self.failed_writes = 0
        self.reads = 0
        self.reads_moving = 0
        self.retried = 0
        self.wrong: list[tuple[bytes, Any]] = []
        self.unreadable: list[str] = []
        self.threads = [threading.Thread(target=self._write), threading.Thread(target=self._read)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads)

    def _write(self) -> None:
        with shmkv.connect(self.seeds, n=3, timeout=2.0) as c:
            i = 0
            while not self.stop.is_set():
                key, value = f"w{i}".encode(), f"v{i}".encode()
                i += 1
                try:
                    c.put(key, value)
                    self.acked[key] = value
                except shmkv.Error:
                    self.failed_writes += 1  # not acknowledged: never checked
                time.sleep(0.002)

    def _read(self) -> None:
        rnd = random.Random(1)
        with shmkv.connect(self.seeds, n=3, timeout=2.0) as c:
            while not self.stop.is_set():
                key = rnd.choice(list(self.acked))
                want = self.acked[key]
                moving = self.moving.is_set()
                last: Exception | None = None
                for _ in range(30):  # a read may meet a node mid-switch (a new epoch) or a
                    try:             # replica suspected on this loaded machine: retried, counted
                        got = c.get(key)
                        break
                    except shmkv.Error as e:
                        last = e
                        self.retried += 1
                        time.sleep(0.2)
                else:
                    self.unreadable.append(f"{key!r}: {last}")
                    continue
                self.reads += 1
                self.reads_moving += moving
                if got != want:
                    self.wrong.append((key, got))


def _moving(addrs: list[str]) -> Any:
    st = group_status(addrs, 0.5)
    return None if st is None else st.get("moving")


def _watch_move(load: Load, addrs: list[str], within: float = 90.0, refused: list[str] | None = None) -> None:
    """Mark the load as moving until the group reports the move over; ``refused``: the output
    of a ring change tried while the move is on."""
    _poll("a move under way", lambda: _moving(addrs) is not None, within=20)
    load.moving.set()
    if refused is not None:
        out = _cli("cluster", "weight", "--seeds", addrs[0], "n1", "2")
        refused.append(f"{out.returncode} {out.stdout}{out.stderr}")
        refused.append(_cli("cluster", "status", "--seeds", addrs[0]).stdout)
        refused.append(_cli("cluster", "status", "--seeds", addrs[0], "--json").stdout)
    try:
        _poll("the move over", lambda: _moving(addrs) is None, within=within)
    finally:
        load.moving.clear()


def _check_all(seeds: list[str], acked: dict[bytes, bytes]) -> None:
    with shmkv.connect(seeds, n=3, timeout=2.0) as c:
        got = c.get_many(list(acked))
    missing = [k for k in acked if got.get(k) != acked[k]]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged writes not readable, e.g. {missing[:3]}"


def test_add_then_remove_a_node_under_writes_loses_nothing_and_reads_stay_right(cluster: dict[str, Any]) -> None:
    seeds = cluster["seeds"]
    acked = dict(cluster["preloaded"])
    with Load(seeds, acked) as load:
        time.sleep(0.5)
        node = tc.add_node(cluster["dir"])  # --join: it adds itself
        everyone = seeds + [node["addr"]]
        refused: list[str] = []
        _watch_move(load, everyone, refused=refused)
        during_add = load.reads_moving
        # bad input, with the cluster live: nothing is committed, the error names the reason
        epoch = group_status(everyone, 1.0)["epoch"]
        assert refused[0].startswith("1 ") and "a configuration change is in progress" in refused[0], refused
        # progress, while it moved: the move and each pusher's transfer, in text and JSON
        assert "moving: the change of epoch 2" in refused[1] and "transfer " in refused[1], refused[1]
        cfg = json.loads(refused[2])["config"]
        assert cfg["moving"]["epoch"] == 2 and set(cfg["moving"]["waiting"]) <= {"n1", "n2", "n3"}
        assert all("keys_sent" in cfg["nodes"][n]["rebalance"] for n in ("n1", "n2", "n3"))
        twice = _cli("cluster", "add", "--seeds", seeds[0], node["addr"])
        assert twice.returncode == 1 and "already a member" in twice.stderr, twice.stderr
        time.sleep(5.0)  # the 4-node ring in steady state: gossip follows the ring (no peer judged down)
        out = _cli("cluster", "status", "--seeds", seeds[0])
        assert out.returncode == 0, out.stderr
        assert group_status(everyone, 1.0)["epoch"] == epoch  # the refused changes committed nothing
        proc = subprocess.Popen([sys.executable, "-m", "shmkv.cli", "cluster", "remove", "--seeds", seeds[0],
                                 node["name"], "--wait", "90"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT)
        try:
            _watch_move(load, everyone)
            text, _ = proc.communicate(timeout=100)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, text
        assert "moved: every old owner pushed" in text
        time.sleep(0.5)
    print(f"reads {load.reads}, {during_add} during the add's move, {load.reads_moving - during_add} during "
          f"the remove's ({load.retried} retried); {len(acked) - PRELOAD} writes acknowledged, "
          f"{load.failed_writes} not")
    assert during_add > 0 and load.reads_moving > during_add  # reads were checked during both moves
    assert not load.wrong, load.wrong[:3]
    assert not load.unreadable, load.unreadable[:3]
    below_n = _cli("cluster", "remove", "--seeds", seeds[0], "n3")
    assert below_n.returncode == 1 and "fewer than N=3" in below_n.stderr, below_n.stderr
    tc.kill(cluster["dir"], node["name"], signal.SIGTERM)  # the removed node is not needed any more
    _check_all(seeds, acked)
    st = group_status(seeds, 1.0)
    assert st is not None and st["moving"] is None and node["name"] not in st["nodes"]


@pytest.mark.parametrize("cluster", ["100K", ("100K", "persist")], indirect=True, ids=["memory", "path"])
def test_a_pusher_sigkilled_mid_transfer_resumes_and_nothing_acknowledged_is_lost(cluster: dict[str, Any]) -> None:
    """With --path nodes the pusher's segment is also unlinked after the kill (a reboot): its
    copies and its cursor come back from its directory alone, and the push resumes after it."""
    seeds = cluster["seeds"]
    acked = dict(cluster["preloaded"])
    victim = next(n for n in cluster["nodes"] if n["name"] == "n2")
    with Load(seeds, acked) as load:
        node = tc.add_node(cluster["dir"])
        everyone = seeds + [node["addr"]]
        _poll("a move under way", lambda: _moving(everyone) is not None, within=20)
        load.moving.set()

        def pushing() -> bool:
            v = _raw_views([victim["addr"]])[0].get("rebalance") or {}
            return v.get("state") in ("streaming", "retrying") and v.get("keys_sent", 0) > 0
        _poll("n2 pushing", pushing, within=20)
        tc.kill(cluster["dir"], "n2")  # SIGKILL mid-transfer
        if victim.get("path"):
            shmkv.unlink(victim["store"])  # memory gone: only n2's directory is left
        time.sleep(1.0)
        tc.restart(cluster["dir"], "n2")
        after = _poll("n2 pushing again", lambda: (_raw_views([victim["addr"]])[0].get("rebalance") or {}), within=20)
        _poll("the move over", lambda: _moving(everyone) is None, within=90)
        load.moving.clear()
        time.sleep(0.5)
    rb = _raw_views([victim["addr"]])[0].get("rebalance") or {}
    print(f"n2 after restart: {after}; at the end: {rb}; reads {load.reads} ({load.reads_moving} during the move)")
    assert rb.get("resumed_after", 0) > 0  # it went on after its cursor, not from zero
    assert rb.get("report") == "committed"
    assert load.reads_moving > 0
    assert not load.wrong, load.wrong[:3]
    assert not load.unreadable, load.unreadable[:3]
    _check_all(everyone, acked)
    with shmkv.connect(seeds, n=3, timeout=2.0) as c:  # the new node holds every pre-join key it replicates
        assert c.ring is not None
        mine = [k for k in cluster["preloaded"] if node["name"] in c.ring.preference_list(k, 3)]
        held = _replica_get(node["addr"], mine, c.ring.epoch)
    absent = [k for k, vs in zip(mine, held, strict=True) if not _has(vs, acked[k])]
    assert mine and not absent, f"{len(absent)} of {len(mine)} keys not streamed to {node['name']}"


def test_a_voter_is_replaced_then_removed_from_the_ring(cluster: dict[str, Any]) -> None:
    """voter add of a joined node, voter remove of a founder, SIGKILL it: the new group commits
    the founder's removal from the ring, and its copies reach their new owners."""
    seeds = cluster["seeds"]
    node = tc.add_node(cluster["dir"])
    everyone = seeds + [node["addr"]]
    _poll("the add's move over", lambda: _moving(everyone) is None, within=60)
    out = _cli("cluster", "voter", "--seeds", seeds[0], "add", node["name"])
    assert out.returncode == 0, out.stderr
    assert "voters n1, n2, n3, n4" in out.stdout
    out = _cli("cluster", "voter", "--seeds", seeds[0], "remove", "n3")
    assert out.returncode == 0, out.stderr
    assert "voters n1, n2, n4" in out.stdout
    tc.kill(cluster["dir"], "n3")
    rest = [a for a in everyone if a != seeds[2]]
    _poll("a leader among n1, n2, n4", lambda: _leader(rest), within=30)
    out = _cli("cluster", "remove", "--seeds", rest[0], "n3", "--wait", "60")
    assert out.returncode == 0, out.stdout + out.stderr
    st = group_status(rest, 1.0)
    assert st is not None and st["voters"] == ["n1", "n2", "n4"] and st["moving"] is None
    _check_all(rest, dict(cluster["preloaded"]))


def test_a_joining_node_with_another_replication_map_is_refused_before_it_is_added(tmp_path: Path) -> None:
    """--n-per-dc is every node's flag, not part of the replicated configuration: a --join node
    started without the cluster's map would place keys by plain N, so it stops, naming both
    maps, before it asks to be added -- the ring stays as it was."""
    d = tmp_path / "c"
    try:
        state = tc.start(3, d, join_timeout=20.0, raft=True, dcs=["a", "a", "a"], extra=["--n-per-dc", "a:3"])
        seeds = state["seeds"]
        _poll("a leader", lambda: _leader(seeds))
        epoch = group_status(seeds, 0.5)["epoch"]
        with pytest.raises(Exception, match="runs with --n-per-dc a:3, this node was started with none"):
            tc.add_node(d, extra=["--dc", "a"])
        st = group_status(seeds, 0.5)
        assert st["epoch"] == epoch and len(st["nodes"]) == 3
    finally:
        tc.stop(d, grace=5)
