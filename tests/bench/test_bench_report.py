"""The report: JSON schema, ratios to shmkv at the same process count, table and plot."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from shmkv.bench.report import build_report, fmt_ratio, fmt_us, render_table, validate, write_plot
from shmkv.bench.runner import CellResult, Outcome
from shmkv.bench.workload import Workload

LAT = {"all": {"count": 10, "p50": 500, "p99": 2000, "p99.9": 9000, "max": 9000}}


def _cell(backend: str, procs: int, *rates: float) -> CellResult:
    runs = [
        {"ops": int(r), "seconds": 1.0, "ops_per_s": r, "per_process_ops_per_s": [r]} for r in rates
    ]
    return CellResult(backend, procs, runs, LAT, 1.0)


def _report(outcome: Outcome, procs: list[int] | None = None) -> dict:
    return build_report(
        Workload(),
        outcome,
        procs or [1, 2],
        command="shmkv-bench",
        started=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
        seconds=1.0,
        machine={"cpu": "test", "cores": 2, "os": "Linux", "python": "CPython 3.11"},
    )


def _outcome() -> Outcome:
    return Outcome(
        cells=[
            _cell("redis", 1, 10_000.0),
            _cell("shmkv", 1, 1_000_000.0),
            _cell("shmkv", 2, 1_800_000.0),
            _cell("lmdb", 2, 600_000.0, 400_000.0, 500_000.0),
            _cell("dict", 1, 4_000_000.0),
        ],
        skipped=[
            ("memcached", "memcached not on PATH (apt-get install memcached) and no --memcached")
        ],
        failed=[("diskcache", "OSError: disk full")],
    )


def test_ratios_compare_with_shmkv_at_the_same_process_count() -> None:
    rows = {(r["backend"], r["procs"]): r for r in _report(_outcome())["results"]}
    assert rows[("shmkv", 1)]["ratio_to_shmkv"] == 1.0
    assert rows[("redis", 1)]["ratio_to_shmkv"] == pytest.approx(0.01)
    assert rows[("dict", 1)]["ratio_to_shmkv"] == pytest.approx(4.0)
    # lmdb at 2: the median of its three runs (500k) over shmkv's 1.8M at 2 processes.
    assert rows[("lmdb", 2)]["ops_per_s"] == 500_000.0
    assert rows[("lmdb", 2)]["ratio_to_shmkv"] == pytest.approx(500_000 / 1_800_000)


def test_ratio_is_null_without_a_shmkv_row() -> None:
    out = Outcome(cells=[_cell("lmdb", 1, 5.0)], skipped=[("shmkv", "not built")])
    rep = _report(out, [1])
    assert rep["results"][0]["ratio_to_shmkv"] is None
    validate(rep)


def test_report_is_valid_json_after_a_round_trip() -> None:
    rep = json.loads(json.dumps(_report(_outcome())))
    validate(rep)
    assert rep["schema"] == "shmkv-bench/1"
    assert [(r["backend"], r["procs"]) for r in rep["results"]] == [
        ("shmkv", 1),
        ("dict", 1),
        ("redis", 1),
        ("shmkv", 2),
        ("lmdb", 2),
    ]
    assert rep["workload"]["value_size"]["spec"] == "100B"
    assert rep["skipped"][0]["backend"] == "memcached"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(schema="other"), "schema"),
        (lambda r: r.pop("results"), "lacks"),
        (lambda r: r["results"][0].pop("ops_per_s"), "lacks"),
        (lambda r: r["results"][0].update(procs=0), "procs"),
        (lambda r: r["results"][0].update(runs=[]), "no runs"),
        (
            lambda r: r["results"][0]["latency_ns"].update(
                all={"count": 2, "p50": 9, "p99": 1, "p99.9": 1, "max": 9}
            ),
            "order",
        ),
        (lambda r: r["skipped"].append({"why": "?"}), "malformed"),
    ],
)
def test_validate_names_the_problem(mutate: object, message: str) -> None:
    rep = json.loads(json.dumps(_report(_outcome())))
    mutate(rep)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        validate(rep)


def test_table_shows_rows_ratios_skips_failures_and_the_verdict() -> None:
    text = render_table(_report(_outcome()))
    assert "vs shmkv" in text and "p99.9 us" in text
    assert "1,000,000" in text and "0.010x" in text
    assert "skipped memcached: memcached not on PATH" in text
    assert "FAILED diskcache: OSError: disk full" in text
    assert "shmkv at 1 process: 1,000,000 ops/s = 0.25x dict, 100x redis" in text
    assert "shmkv at 2 processes: 1,800,000 ops/s = 3.60x lmdb" in text
    assert "median of 3 runs" in text


def test_number_formats() -> None:
    assert [fmt_us(n) for n in (412, 4_120, 41_200, 1_234_000)] == [
        "0.412",
        "4.12",
        "41.2",
        "1,234",
    ]
    assert [fmt_ratio(x) for x in (None, 0.0123, 1.0, 12.34, 559.0)] == [
        "-",
        "0.012x",
        "1.00x",
        "12.3x",
        "559x",
    ]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (the bench extra) not installed")
    path = tmp_path / "plot.png"
    write_plot(_report(_outcome()), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mixed_workloads_get_a_latency_line_per_op() -> None:
    out = _outcome()
    for c in out.cells:
        c.latency_ns = {
            **LAT,
            "get": LAT["all"],
            "put": {"count": 1, "p50": 1500, "p99": 3000, "p99.9": 3000, "max": 3000},
        }
    text = render_table(_report(out))
    assert "latency by op" in text
    assert "0.500 / 2.00 / 9.00" in text and "1.50 / 3.00 / 3.00" in text
