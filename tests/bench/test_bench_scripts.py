"""bench/ scenario scripts: the docstring's command is exactly what the script runs, and each
script runs; the core report renders its three tables."""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCENARIOS = ["session_cache.py", "counters.py", "mixed_sizes.py", "eviction_churn.py"]


def _docstring_and_args(path: Path) -> tuple[str, list[str]]:
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree) or ""
    args: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "ARGS":
            args = ast.literal_eval(node.value)
    return doc, args


@pytest.mark.parametrize("script", SCENARIOS)
def test_docstring_gives_the_exact_command(script: str) -> None:
    doc, args = _docstring_and_args(BENCH / script)
    assert f"python bench/{script}" in doc
    joined = doc.replace("\\\n", " ")
    line = next(x.strip() for x in joined.splitlines() if x.strip().startswith("shmkv-bench "))
    assert shlex.split(line)[1:] == args


@pytest.mark.multiprocess
@pytest.mark.bench
def test_scenario_script_runs_with_overrides() -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / "counters.py"), "-q", "--backends", "shmkv,dict", "--procs", "1",
         "--ops", "500", "--keys", "200"],
        capture_output=True, text=True, timeout=120, cwd=BENCH.parent,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "incr" in r.stdout and "vs shmkv" in r.stdout


def test_core_report_renders_speed_batch_and_memory_tables() -> None:
    from shmkv.bench.core_report import render_markdown

    lat = {"all": {"count": 1, "p50": 500, "p99": 900, "p99.9": 1000, "max": 1000}}

    def rep(vs: int, op: str, batch: int, procs: list[int]) -> dict:
        rows = [{"backend": b, "procs": p, "ops_per_s": rate * p, "latency_ns": lat}
                for b, rate in (("shmkv", 1e6), ("dict", 4e6), ("lmdb", 2.5e5)) for p in procs
                if not (b == "dict" and p > 1)]  # fmt: skip
        return {"core": {"value_size": vs, "op": op, "batch": batch}, "procs": procs,
                "results": rows, "skipped": [], "failed": []}  # fmt: skip

    doc = {
        "command": "core_ops.py", "started": "now", "duration": 2.0, "repeat": 3,
        "machine": {"cpu": "x", "cores": 2, "os": "Linux", "python": "3.11", "loadavg_start": [0.1]},
        "versions": {"shmkv": "0.1.0"},
        "speed": [rep(100, "get", 1, [1, 2]), rep(100, "get", 100, [1])],
        "memory": [{"backend": "shmkv", "value_size": 100, "items": 1000, "bytes_per_item": 157.0},
                   {"backend": "memcached", "value_size": 100, "items": 900, "bytes_per_item": 192.0}],
        "memory_skipped": [],
    }  # fmt: skip
    md = render_markdown(doc)
    assert "| 100B | get | 1 | 1,000,000 | 4,000,000 | 250,000 | 0.25x | 4.00x |" in md
    assert "| 100B | get | 2 | 2,000,000 | (1 process only) | 500,000 | - | 4.00x |" in md
    assert "| 100B | get_many | 1,000,000 | 1,000,000 | 1.00x |" in md
    assert "| 100B | 116 B | 157 B | 192 B | - | - | 1,000 |" in md
    assert "median of 3 runs of 2 s" in md


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.bench
def test_core_ops_script_runs_end_to_end() -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / "core_ops.py"), "-q", "--duration", "0.2"],
        capture_output=True, text=True, timeout=600, cwd=BENCH.parent,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "### Memory" in r.stdout and "| 1KiB | put | 2 |" in r.stdout
