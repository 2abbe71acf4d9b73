"""The benchmark script runs end to end (tiny sizes, no peer) and reports percentiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import worker_env

BENCH = Path(__file__).resolve().parents[2] / "bench" / "lsm_bench.py"


@pytest.mark.bench
@pytest.mark.skipif(not BENCH.exists(), reason="bench/ is not in this tree")
def test_bench_script_reports_percentiles_for_every_phase(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    args = ["--keys", "3000", "--durable-ops", "50", "--reads", "500", "--budget", "0.5"]
    r = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            *args,
            "--no-peer",
            "--dir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(out.read_text())
    for phase in ("put_fsync", "put_interval", "put_none", "get_random", "get_negative"):
        assert {"p50_us", "p99_us", "max_us", "ops_s_p50"} <= set(res[phase])
    assert res["put_none"]["ops"] == 3000 and res["scan"]["keys"] == 3000
    assert res["write_amplification"] > 1.0
