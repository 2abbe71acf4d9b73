"""A short torture run on three real `shmkv serve` daemons (tools/cluster.py): real SIGKILL and
restart, real SIGSTOP/SIGCONT, shmkv.connect clients; every checker passes and every process
the run started is gone afterwards."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

import shmkv
from shmkv.torture.local import LocalCluster
from shmkv.torture.runner import RunConfig, run

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_three_real_nodes_under_kill_and_pause_keep_every_promise(tmp_path: Path) -> None:
    cluster = LocalCluster(3, dir=str(tmp_path / "c3"))
    cfg = RunConfig(time=6, seed=1, nemesis=["kill", "pause"], op_timeout=1.0, cluster="local")
    res = run(cluster, cfg, tmp_path / "out")
    assert res.passed, res.text
    h = res.history
    assert {f["kind"] for f in h.faults} == {"kill", "pause"}
    assert sum(o.outcome == "ok" and o.f == "write" for o in h.ops) > 50
    assert h.final is not None and set(h.final) == {"n1", "n2", "n3"}
    # Every daemon (including the restarted ones) is stopped and its segment removed.
    state = cluster.tools._load(cluster.dir)
    assert all("--strict" in node["extra"] for node in state["nodes"])  # what "sloppy": False claims
    assert h.meta["sloppy"] is False and "linearizable" in {v.checker for v in res.verdicts}
    assert cluster.settled["converged"], cluster.settled  # by anti-entropy (test below)
    assert h.meta["settle"] == cluster.settled and "settle: anti-entropy converged" in res.text
    for node in state["nodes"]:
        assert not psutil.pid_exists(node["pid"]) or psutil.Process(node["pid"]).status() == psutil.STATUS_ZOMBIE
        assert not Path(f"/dev/shm/shmkv.{node['store']}").exists()
    assert (tmp_path / "out" / "history.jsonl").exists()


@pytest.mark.parametrize("workload", ["counter", "set"])
def test_counter_and_set_workloads_on_real_nodes(workload: str, tmp_path: Path) -> None:
    cluster = LocalCluster(3, dir=str(tmp_path / "c3"))
    cfg = RunConfig(time=4, seed=2, nemesis=["kill", "pause"], op_timeout=1.0, cluster="local",
                    workload=workload)
    res = run(cluster, cfg)
    assert res.passed, res.text
    assert any(o.outcome == "ok" and o.f != "read" for o in res.history.ops)
    if workload == "counter":  # held to the counter bounds, not linearizability
        assert "counters" in {v.checker for v in res.verdicts}


def test_settle_converges_a_wiped_replica_by_anti_entropy_not_read_repair(tmp_path: Path) -> None:
    """n3 restarts with an empty store (SIGKILL, its segment removed): settle must bring it every
    key without a single read through a coordinator -- no node counts a read repair -- and the
    copies it then holds are the others'."""
    cluster = LocalCluster(3, dir=str(tmp_path / "c3"))
    keys = [b"s%d" % i for i in range(40)]
    cluster.start()
    try:
        with shmkv.connect(cluster.seeds, n=3, w=3, r=1, timeout=2.0) as c:
            for i, k in enumerate(keys):
                c.put(k, b"v%d" % i)
            c.delete(keys[0], w=3)
        cluster.kill("n3")
        cluster.tools._unlink_store(cluster._node("n3"))
        cluster.restart("n3")
        assert cluster.final_states(keys)["n3"] == {}
        cluster.settle(keys)
        assert cluster.settled["converged"], cluster.settled
        final = cluster.final_states(keys)
        assert final["n3"] == final["n1"] == final["n2"] and len(final["n3"]) == len(keys)
        assert final["n3"][keys[0]].is_deleted
        with shmkv.connect(cluster.seeds, n=3, timeout=2.0) as c:
            status = [s for s in c.status() if "error" not in s]
        assert len(status) == 3
        assert sum(s["read_repairs"] for s in status) == 0, status
        assert sum(s["antientropy"]["repaired"] for s in status) >= len(keys)
    finally:
        cluster.stop()
