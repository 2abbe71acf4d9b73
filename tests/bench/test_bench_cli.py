"""The shmkv-bench command: arguments, the table, --json and --plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from shmkv.bench.cli import main, parse_backends, parse_procs
from shmkv.bench.report import validate


def test_parse_procs_lists_and_ranges() -> None:
    assert parse_procs("1,2,4") == [1, 2, 4]
    assert parse_procs("1-3") == [1, 2, 3]
    assert parse_procs("4,1..2") == [1, 2, 4]
    for bad in ("0", "3-1", "x"):
        with pytest.raises(ValueError):
            parse_procs(bad)


def test_parse_backends_keeps_report_order() -> None:
    assert parse_backends("redis, shmkv,dict") == ["shmkv", "dict", "redis"]
    with pytest.raises(ValueError, match="unknown"):
        parse_backends("shmkv,mongo")


@pytest.mark.parametrize(
    "args",
    [
        ["--mix", "read=1"],
        ["--value-size", "big"],
        ["--procs", "0"],
        ["--duration", "1", "--ops", "5"],
        ["--backends", "mongo"],
        ["--keys", "10", "--batch", "20"],
        ["--dist", "normal"],
    ],
)
def test_bad_arguments_exit_2_with_a_message(args: list[str]) -> None:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert "Error" in r.output


@pytest.mark.multiprocess
@pytest.mark.bench
def test_small_run_prints_table_and_writes_json_and_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = [
        "-q",
        "--backends",
        "shmkv,dict,lmdb",
        "--procs",
        "1",
        "--keys",
        "300",
        "--ops",
        "2000",
        "--json",
        str(out),
        "--plot",
        str(png),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "vs shmkv" in r.output and "lmdb" in r.output
    rep = json.loads(out.read_text())
    validate(rep)
    assert {x["backend"] for x in rep["results"]} <= {"shmkv", "dict", "lmdb"}
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.multiprocess
@pytest.mark.bench
def test_scan_mix_runs_the_ordered_backends_and_skips_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    args = ["-q", "--backends", "shmkv-btree,lmdb,dict", "--procs", "1", "--keys", "500",
            "--ops", "300", "--mix", "get=50,scan=50", "--scan-length", "20", "--json", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "skipped dict: no ordered scan" in r.output
    rep = json.loads(out.read_text())
    validate(rep)
    assert {x["backend"] for x in rep["results"]} == {"shmkv-btree", "lmdb"}


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.bench
def test_default_run_prints_the_comparison(tmp_path: Path) -> None:
    # The README's main job: no arguments, every installed peer (about 35 s on 2 quiet cores).
    # Run outside the source tree, on the shmkv these tests import: in CI the installed one
    # (a fresh clone's tree has no compiled extension), here maybe an in-place build.
    import shmkv

    env = {**os.environ, "PYTHONPATH": str(Path(shmkv.__file__).resolve().parents[1])}
    r = subprocess.run(
        [sys.executable, "-m", "shmkv.bench.cli"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "vs shmkv" in r.stdout and "shmkv at 2 processes" in r.stdout
