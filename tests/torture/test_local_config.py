"""What the real-daemon cluster (local.py) promises before any daemon runs: the daemons are
started strict (so a run labelled ``"sloppy": False`` is judged on a strict cluster) with a short
anti-entropy interval, and libfaketime's /dev/shm leftovers are removed for the pids the
cluster started -- and only for those."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shmkv.torture.local import AE_FLAGS, FAKETIME_LEFTOVERS, LocalCluster


def _started_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[LocalCluster, list[str]]:
    cluster = LocalCluster(3, dir=str(tmp_path / "c"), **kw)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cluster.tools, "start", lambda *a, **k: seen.update(k))
    cluster.start()
    return cluster, list(seen["extra"])


def test_daemons_start_strict_with_anti_entropy_and_the_label_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, extra = _started_with(tmp_path, monkeypatch)
    assert "--strict" in extra and "--sloppy" not in extra
    assert cluster.config["sloppy"] is False
    i = extra.index("--ae-interval")
    interval, grace = float(extra[i + 1]), float(extra[extra.index("--tombstone-grace") + 1])
    assert 0 < interval <= 1 and grace >= 2 * interval  # daemon.check_options' rule
    assert tuple(extra[: len(AE_FLAGS)]) == AE_FLAGS
    sloppy, extra = _started_with(tmp_path / "s", monkeypatch, strict=False)
    assert "--sloppy" in extra and sloppy.config["sloppy"] is True


def test_faketime_leftovers_are_removed_for_the_dead_pids_started_and_no_others(tmp_path: Path) -> None:
    cluster = LocalCluster(3, dir=str(tmp_path / "c"))
    dead = [subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True).stdout.strip() for _ in range(2)]
    mine, other = int(dead[0]), int(dead[1])  # both gone; only ``mine`` was "started" by the cluster
    live = os.getpid()  # started too, but alive: its files may be in use
    cluster.started_pids = {mine, live}
    paths = {pid: [p.format(pid=pid) for p in FAKETIME_LEFTOVERS] for pid in (mine, other, live)}
    try:
        for ps in paths.values():
            for p in ps:
                Path(p).write_bytes(b"x")
        removed = cluster.remove_leftovers()
        assert sorted(removed) == sorted(paths[mine])
        assert not any(os.path.exists(p) for p in paths[mine])
        assert all(os.path.exists(p) for p in paths[other] + paths[live])
    finally:
        for ps in paths.values():
            for p in ps:
                Path(p).unlink(missing_ok=True)
