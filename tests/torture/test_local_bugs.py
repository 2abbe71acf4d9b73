"""The real-cluster run catches a bug in the real daemons.

``SHMKV_TEST_ONLY_BUG=ack-before-w`` (coordinator.TEST_BUG_ENV: a test-only switch, documented
there) makes each ``shmkv serve`` acknowledge a write once its own copy holds it and send it to
the other replicas 0.5 s later. Under kill and pause, clients fail over to other coordinators,
which read from replicas that never got acknowledged writes: the checkers must fail the run.
The same run without the switch passes (test_local.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shmkv.cluster.coordinator import TEST_BUG_ENV
from shmkv.torture.local import LocalCluster
from shmkv.torture.runner import RunConfig, run

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_daemons_that_ack_before_w_replicas_are_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEST_BUG_ENV, "ack-before-w")  # inherited by the daemons tools/cluster.py starts
    # The anomaly needs a failover within 0.5 s of a write (real timing, not replayable): the
    # checkers must catch it within two short runs.
    texts = []
    for seed in (7, 5):
        cluster = LocalCluster(3, dir=str(tmp_path / f"c{seed}"))
        cfg = RunConfig(time=5, seed=seed, nemesis=["kill", "pause"], op_timeout=1.0, cluster="local")
        res = run(cluster, cfg)
        failed = {v.checker for v in res.verdicts if v.status == "fail"}
        if failed & {"linearizable", "superseded", "lost-writes"}:
            return
        texts.append(res.text)
    raise AssertionError("the bug went unnoticed:\n" + "\n".join(texts))
