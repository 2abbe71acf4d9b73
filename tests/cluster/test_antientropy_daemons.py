"""Anti-entropy with real daemons (tools/cluster.py): a wiped replica (memory-only, and a
``--path`` node whose directory is wiped), keys removed from a Store behind its daemon's back,
and a delete missed by a down node -- converged within a deadline, and no deleted key comes
back.

What each node holds is read with REPLICA_GET_MANY over TCP (the replica requests a coordinator
sends), so the check sees the stored copies and not a quorum read that would repair them.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.transport import TcpTransport, run
from shmkv.cluster.versions import VersionSet
from shmkv.cluster.wire import Message

from .local_cluster import tc
from .test_integration import _connect, _node

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

Start = Callable[..., dict[str, Any]]
AE = ["--ae-interval", "0.5", "--tombstone-grace", "600", "--ae-rebuild", "1"]
DEADLINE = 60.0


def held(st: dict[str, Any], name: str, keys: list[bytes], epoch: int) -> list[VersionSet | None]:
    """Node ``name``'s stored copies of ``keys`` (None: no copy)."""

    async def ask() -> list[VersionSet | None]:
        t = TcpTransport()
        try:
            reply = await t.request(_node(st, name)["addr"], Message(wire.REPLICA_GET_MANY, 0, {"keys": keys, "epoch": epoch}), 5.0)
        finally:
            await t.close()
        wire.raise_for_error(reply)
        out = []
        for w in reply.fields["versions"]:
            vs = VersionSet.from_wire(w)
            out.append(vs if len(vs) else None)
        return out

    return run(ask())


def repaired(st: dict[str, Any], name: str) -> int:
    """How many copies node ``name`` took from its peers since it started (its AE status)."""
    with _connect(st) as c:
        return int(next(s for s in c.status() if s.get("name") == name)["antientropy"]["repaired"])


def wait_converged(st: dict[str, Any], keys: list[bytes], epoch: int) -> float:
    """Poll until every node holds the same copy of every key; seconds it took."""
    t0 = time.monotonic()
    while True:
        views = [held(st, n["name"], keys, epoch) for n in st["nodes"]]
        if all(v == views[0] for v in views[1:]) and all(x is not None for x in views[0]):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < DEADLINE, "replicas did not converge within the deadline"
        time.sleep(0.25)


def test_a_wiped_replica_converges_and_deleted_keys_stay_deleted(cluster: Start) -> None:
    st = cluster(3, extra=[*AE, "--ae-rate", "50000", "--ae-bytes-rate", "4MB"])
    keys = [f"ae{i}".encode() for i in range(300)]
    with _connect(st) as c:
        for ae in (s["antientropy"] for s in c.status()):  # the limits reached every node
            assert (ae["rate"], ae["byte_rate"]) == (50_000.0, 4_000_000.0), ae
        for i, k in enumerate(keys):
            c.put(k, b"v%d" % i, w=3)
        for k in keys[:10]:
            c.delete(k, w=3)
        assert c.ring is not None
        epoch = c.ring.epoch
    wait_converged(st, keys, epoch)
    # SIGKILL n3 and remove its memory: it restarts empty, under a fresh actor
    tc.kill(st["dir"], "n3")
    tc._unlink_store(_node(st, "n3"))
    tc.restart(st["dir"], "n3")
    took = wait_converged(st, keys, epoch)
    # it came back empty: every one of its 300 copies (tombstones too) was taken from a peer.
    # (Asking right after the restart whether it holds none races its first exchange, 0.5 s.)
    assert repaired(st, "n3") >= len(keys)
    n3 = held(st, "n3", keys, epoch)
    assert all(vs is not None and vs.is_deleted for vs in n3[:10])  # tombstones, not values
    assert [vs.values for vs in n3[10:] if vs is not None] == [[b"v%d" % i] for i in range(10, 300)]
    with _connect(st) as c:
        assert all(c.get(k, r=3) is None for k in keys[:10])
    print(f"wiped replica of 300 keys converged in {took:.1f} s")


def test_a_path_node_whose_directory_is_wiped_converges(cluster: Start) -> None:
    """A ``--path`` node stopped (SIGTERM: a clean stop, its segment removed), its directory --
    LSM and hints -- deleted, then started again: it comes back empty and anti-entropy brings it
    every copy, tombstones included, within the deadline; what it restores is on its disk."""
    import shutil

    st = cluster(3, persist=True, durability="interval", extra=AE)
    keys = [f"pw{i}".encode() for i in range(300)]
    with _connect(st) as c:
        for i, k in enumerate(keys):
            c.put(k, b"v%d" % i, w=3)
        for k in keys[:10]:
            c.delete(k, w=3)
        assert c.ring is not None
        epoch = c.ring.epoch
    wait_converged(st, keys, epoch)
    n3 = _node(st, "n3")
    tc.kill(st["dir"], "n3", signal.SIGTERM)
    assert Path(n3["path"]).is_dir() and any(Path(n3["path"]).iterdir())
    shutil.rmtree(n3["path"])
    tc._unlink_store(n3)  # gone already after a clean stop; nothing of n3's copies is left
    tc.restart(st["dir"], "n3")
    took = wait_converged(st, keys, epoch)
    assert repaired(st, "n3") >= len(keys)  # it came back empty (as above)
    now = held(st, "n3", keys, epoch)
    assert all(vs is not None and vs.is_deleted for vs in now[:10])
    assert [vs.values for vs in now[10:] if vs is not None] == [[b"v%d" % i] for i in range(10, 300)]
    # restored to its disk, not only its memory: a second clean restart still holds them
    tc.kill(st["dir"], "n3", signal.SIGTERM)
    tc.restart(st["dir"], "n3")
    assert held(st, "n3", keys, epoch) == now
    with _connect(st) as c:
        assert all(c.get(k, r=3) is None for k in keys[:10])
    print(f"wiped --path replica of 300 keys converged in {took:.1f} s")


def test_keys_removed_behind_the_back_and_a_missed_delete_with_workers(cluster: Start) -> None:
    # memory only: the test's own handle on n2's segment is then all of n2's store, and a
    # SIGKILLed node's segment stays, so n3 comes back with its old copies
    st = cluster(3, workers=2, extra=AE)
    keys = [f"bk{i}".encode() for i in range(200)]
    with _connect(st) as c:
        for i, k in enumerate(keys):  # through both workers of each node (the relay path)
            c.put(k, b"v%d" % i, w=3)
        assert c.ring is not None
        epoch = c.ring.epoch
    wait_converged(st, keys, epoch)
    # remove 20 copies from n2's store behind its daemon's back (no write announces it)
    kv = shmkv.attach(_node(st, "n2")["store"])
    try:
        for k in keys[:20]:
            assert kv.delete(b"v" + k)
        assert not any(b"v" + k in kv for k in keys[:20])
    finally:
        kv.close()
    wait_converged(st, keys, epoch)  # the owner's rebuild (--ae-rebuild 1) finds the gap
    # n3 misses a delete while down, then comes back with its old copy
    victim = keys[50]
    tc.kill(st["dir"], "n3")
    with _connect(st) as c:
        c.delete(victim, w=2)
    kv = shmkv.attach(_node(st, "n3")["store"])
    try:
        assert VersionSet.decode(kv.get(b"v" + victim)).values == [b"v50"]
    finally:
        kv.close()
    tc.restart(st["dir"], "n3")
    wait_converged(st, keys, epoch)
    for name in ("n1", "n2", "n3"):
        vs = held(st, name, [victim], epoch)[0]
        assert vs is not None and vs.is_deleted, name
    with _connect(st) as c:
        # the coordinators skip n3 until gossip hears its new generation and their probe of the
        # suspect it became at the kill answers (up to a gossip interval and a probe interval
        # after "ready", longer on a loaded machine): an R=3 read fails loudly until then
        up_by = time.monotonic() + DEADLINE
        while True:
            try:
                assert c.get(victim, r=3) is None
                break
            except shmkv.QuorumError:
                assert time.monotonic() < up_by, "n3 not seen up again within the deadline"
                time.sleep(0.25)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # several rounds later it is still deleted
            assert c.get(victim, r=3) is None
            time.sleep(0.3)


def test_serve_refuses_a_grace_shorter_than_two_rounds(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "shmkv.cli", "serve", "--listen", "127.0.0.1:1", "--seeds", "127.0.0.1:1",
         "--n", "1", "--w", "1", "--r", "1", "--ae-interval", "10", "--tombstone-grace", "5"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "--tombstone-grace" in out.stderr and "twice --ae-interval" in out.stderr
