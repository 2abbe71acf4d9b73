"""The short torture run CI does on every change: three real daemons inside a private network
namespace under kill, pause, partition and loss (`shmkv torture --cluster local`, which
re-executes itself under ``unshare -rn``); every checker must pass. And clock skew under
libfaketime, after which no libfaketime file of a daemon the run started is left in /dev/shm.
Skipped, with the reason, where the namespace, nft or libfaketime cannot be had."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shmkv.torture import netns
from shmkv.torture.local import FAKETIME_LEFTOVERS, LocalCluster, libfaketime
from shmkv.torture.runner import RunConfig, run

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))
def test_real_cluster_under_kill_pause_partition_and_loss_passes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # seed 3: partition n3, kill n2, loss on n3, pause n1 in 8 s (nemesis.schedule)
    cmd = [sys.executable, "-m", "shmkv.cli", "torture", "--cluster", "local", "--nemesis",
           "kill,pause,partition,loss", "--time", "8", "--seed", "3", "--op-timeout", "1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "report.json").read_text())
    assert all(v["status"] == "pass" for v in report["verdicts"]), r.stdout
    faults = [json.loads(x)["fault"] for x in (out / "history.jsonl").read_text().splitlines() if '"fault"' in x]
    assert {f["kind"] for f in faults} == {"kill", "pause", "partition", "loss"}
    assert all("shape" in f for f in faults if f["kind"] == "partition")


@pytest.mark.skipif(libfaketime() is None, reason="clock skew needs libfaketime (apt-get install faketime)")
def test_clock_skew_on_one_node_under_kill_passes_and_really_skews(tmp_path: Path) -> None:
    cluster = LocalCluster(3, dir=str(tmp_path / "c3"), nemesis=["skew", "kill"])
    # What a node's process sees: its wall clock jumps when the fault writes its file.
    env = {**os.environ, **cluster.envs[0]}  # type: ignore[index]
    probe = [sys.executable, "-c", "import time; print(time.time())"]
    cluster.skew("n1")
    ahead = float(subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout) - time.time()
    cluster.unskew("n1")
    level = float(subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout) - time.time()
    assert ahead > 100 and abs(level) < 10, (ahead, level)
    cfg = RunConfig(time=4, seed=1, nemesis=["skew", "kill"], op_timeout=1.0, cluster="local")
    res = run(cluster, cfg)
    assert res.passed, res.text
    assert "skew" in {f["kind"] for f in res.history.faults}
    assert len(cluster.started_pids) > 3  # a kill's restart is a new pid, whose pair must go too
    left = [p.format(pid=pid) for pid in cluster.started_pids for p in FAKETIME_LEFTOVERS]
    assert not [p for p in left if os.path.exists(p)]
