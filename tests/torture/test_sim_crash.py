"""The simulation's host-crash nemesis (``crash``, simulate.py): a node's store loses every
write since its last (virtual, periodic) sync, the node comes back under a fresh actor, and the
correct build (N=3, W=2) still passes every checker -- the other replicas and anti-entropy
cover one host's loss -- while the same seed replays bit for bit."""

from __future__ import annotations

import itertools
import os
from types import SimpleNamespace

import pytest

import shmkv
from shmkv.cluster.replica import ACTOR_KEY
from shmkv.cluster.versions import VersionSet
from shmkv.errors import InvalidArgument
from shmkv.torture.simulate import SYNC_INTERVAL, SimCluster, SimConfig, _DurableStore, run

_names = itertools.count()


def test_a_host_crash_reverts_exactly_the_writes_since_the_last_sync() -> None:
    net = SimpleNamespace(now=0.0)
    monitor = SimpleNamespace(net=net, stored=lambda *a: None, collected=lambda *a: None)
    name = f"shmkv-test-durable.{os.getpid()}.{next(_names)}"
    kv = shmkv.attach(name, size="1MiB")
    try:
        d = _DurableStore(kv, "n1", monitor, phase=0.0)  # type: ignore[arg-type]
        net.now = 0.01
        assert d.cas(b"va", None, b"1")
        d.put(b"vb", b"1")
        net.now = SYNC_INTERVAL + 0.01  # a sync happened at SYNC_INTERVAL: both are durable
        assert d.cas(b"va", b"1", b"2")
        d.delete(b"vb")
        d.put(b"vc", b"new")
        d.put(b"m-meta", b"x")  # node metadata: reverted too, not counted as a replica
        assert d.lose_unsynced() == 3
        assert kv.get(b"va") == b"1" and kv.get(b"vb") == b"1"
        assert kv.get(b"vc") is None and kv.get(b"m-meta") is None
        assert d.lose_unsynced() == 0  # nothing is lost twice
    finally:
        kv.close()
        shmkv.unlink(name)


def test_a_crashed_host_restarts_under_a_fresh_actor_without_its_unsynced_writes() -> None:
    sim = SimCluster(5, 3)
    try:
        sim.enable_host_crashes()
        before = sim.procs["n1"].node.replica.actor
        sim.net.run_for(0.5)  # past a sync: the actor key and what came before are durable
        sim.procs["n1"].node.replica.merge(b"k", VersionSet().put(b"x", None, "w@1"))
        assert sim.host_crash("n1") == 1  # the merge was not synced yet
        assert sim.stores["n1"].get(b"vk") is None
        sim.net.run(sim.astart("n1"))
        after = sim.procs["n1"].node.replica.actor
        assert after != before and after.startswith("n1@")
        assert sim.stores["n1"].get(ACTOR_KEY) == after.encode()
    finally:
        sim.close()


def test_crash_is_refused_where_it_cannot_be_injected() -> None:
    from shmkv.torture.local import unsupported

    assert "simulated only" in unsupported(["crash"])["crash"]
    with pytest.raises(InvalidArgument, match="crash"):
        run(SimConfig(seed=1, time=1, nemesis=["crash"], converge="hints"))


def test_the_same_seed_replays_a_host_crash_run_bit_for_bit() -> None:
    cfg = dict(seed=3, time=2, clients=3, raft=False, nemesis=["crash", "kill"])
    a, b = run(SimConfig(**cfg)), run(SimConfig(**cfg))  # type: ignore[arg-type]
    crashes = [f for f in a.history.faults if f["kind"] == "crash"]
    assert crashes and sum(f["lost_keys"] for f in crashes) > 0  # it really lost writes
    assert a.hash == b.hash and a.history.faults == b.history.faults
    assert a.passed, a.text
    assert run(SimConfig(**{**cfg, "seed": 4})).hash != a.hash  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_short_sweep_with_host_crashes_passes_every_checker() -> None:
    failed, crashes, lost = [], 0, 0
    for s in range(1, 13):
        res = run(SimConfig(seed=s, time=2, clients=3, raft=False, nemesis=["crash", "kill", "partition"],
                            workload="counter" if s % 4 == 1 else "register"))
        cr = [f for f in res.history.faults if f["kind"] == "crash"]
        crashes += len(cr)
        lost += sum(f["lost_keys"] for f in cr)
        if not res.passed:
            failed.append(res.text)
    assert not failed, failed[0]
    assert crashes >= 3 and lost >= 1, (crashes, lost)  # the seeds did crash hosts and lose writes
