"""bench/cluster_bench.py at tiny sizes, so the script cannot rot: it starts its Redis peers and
both shmkv clusters, runs every measurement, reports every ratio and target, and stops every
process it started (checked by the ports it used being free again)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
@pytest.mark.bench
@pytest.mark.multiprocess
@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-server package missing")
def test_cluster_bench_quick_run_reports_every_target(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    p = subprocess.run(
        [sys.executable, str(BENCH / "cluster_bench.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=BENCH.parent,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert set(rep["redis_benchmark"]) == {
        f"{t} P={p}" for t in ("redis-server", "redis-cluster-3", "shmkv-1", "shmkv-3", "shmkv-1 workers")
        for p in (1, 16)
    }
    for ops in rep["redis_benchmark"].values():
        assert set(ops) == {"SET", "GET"} and all(m["ops_per_s"] > 0 for m in ops.values())
    assert len(rep["python"]) == 7
    assert p.stdout.count("0.3 x redis-server") == 4 and "0.5 x redis-py" in p.stdout and "p99 < 5 ms" in p.stdout
    assert "50 x redis-py GET" in p.stdout
    leftovers = subprocess.run(["pgrep", "-f", "shmkv-cluster-bench-"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", leftovers.stdout


@pytest.mark.slow
@pytest.mark.bench
@pytest.mark.multiprocess
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server package missing")
def test_client_cpu_quick_ab_run_reports_every_worker(tmp_path: Path) -> None:
    """bench/client_cpu.py at tiny sizes, --ab against this same checkout: every worker's turns
    are reported, with the ratios against redis-py, and every server it started is stopped."""
    out = tmp_path / "client_cpu.json"
    root = BENCH.parent
    p = subprocess.run(
        [sys.executable, str(BENCH / "client_cpu.py"), "--rounds", "2", "--chunk", "50", "--ab", str(root),
         "--json", str(out)],
        capture_output=True, text=True, timeout=240, cwd=root,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert len(rep["median"]) == 3 and all(set(ops) == {"SET", "GET"} for ops in rep["median"].values())
    assert all(m["wall_us"] > 0 and m["client_cpu_us"] > 0 for ops in rep["median"].values() for m in ops.values())
    assert p.stdout.count("x  (client CPU") == 4
    leftovers = subprocess.run(["pgrep", "-f", "shmkv-client-cpu-"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", leftovers.stdout
