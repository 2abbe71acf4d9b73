"""A short torture run on three real `shmkv serve` daemons (tools/cluster.py): real SIGKILL and
restart, real SIGSTOP/SIGCONT, shmkv.connect clients; every checker passes and every process
the run started is gone afterwards."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

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
