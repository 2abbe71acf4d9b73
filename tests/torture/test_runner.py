"""A whole torture run against the in-process reference cluster: a correct cluster under kill
and pause passes every checker; each deliberately broken one is caught, exit status 1; a saved
history re-checks to the same verdict; the nemesis schedule is a function of its seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from shmkv.cli import main
from shmkv.errors import InvalidArgument
from shmkv.torture.history import History
from shmkv.torture.inprocess import InProcessCluster
from shmkv.torture.nemesis import parse_kinds, schedule
from shmkv.torture.runner import RunConfig, run


def test_correct_cluster_under_kill_and_pause_passes_and_rechecks(tmp_path: Path) -> None:
    cfg = RunConfig(time=2.5, seed=3, nemesis=["kill", "pause"], op_timeout=0.1)
    res = run(InProcessCluster(3, seed=3), cfg, tmp_path)
    assert res.passed, res.text
    h = res.history
    assert h.faults and {f["kind"] for f in h.faults} <= {"kill", "pause"}
    assert all("t1" in f for f in h.faults)  # every fault healed before the final reads
    outcomes = {o.outcome for o in h.ops}
    assert "ok" in outcomes and len(h.ops) > 100
    assert {v.checker for v in res.verdicts} == {
        "linearizable", "lost-writes", "superseded", "siblings", "convergence"
    }
    assert (tmp_path / "report.txt").read_text().rstrip().endswith("PASS") or "verdict: PASS" in (tmp_path / "report.txt").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["passed"] is True
    r = CliRunner().invoke(main, ["torture", "--check", str(tmp_path / "history.jsonl")])
    assert r.exit_code == 0, r.output
    assert "verdict: PASS" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("bug", ["stale-read", "ack-one", "lww-repair"])
def test_deliberately_broken_cluster_is_caught(bug: str, tmp_path: Path) -> None:
    r = CliRunner().invoke(
        main,
        ["torture", "--time", "3", "--seed", "3", "--nemesis", "kill,pause", "--bug", bug,
         "--op-timeout", "0.1", "--out", str(tmp_path)],
    )
    assert r.exit_code == 1, r.output
    assert "verdict: FAIL" in r.output and "replay: shmkv torture --seed 3" in r.output
    report = json.loads((tmp_path / "report.json").read_text())
    failed = {v["checker"] for v in report["verdicts"] if v["status"] == "fail"}
    assert failed & {"linearizable", "lost-writes", "superseded"}
    # Every problem names the few ops that show it.
    for v in report["verdicts"]:
        for p in v["problems"]:
            assert p["ops"] or v["checker"] == "convergence"
    # The saved history fails again when re-checked.
    again = CliRunner().invoke(main, ["torture", "--check", str(tmp_path / "history.jsonl"), "--json"])
    assert again.exit_code == 1
    assert {v["checker"] for v in json.loads(again.output)["verdicts"] if v["status"] == "fail"} == failed


def test_counter_and_set_workloads_pass_on_a_correct_cluster() -> None:
    for workload in ("counter", "set"):
        cfg = RunConfig(time=1.5, seed=5, nemesis=["kill"], workload=workload, op_timeout=0.1)
        res = run(InProcessCluster(3, seed=5), cfg)
        assert res.passed, res.text


def test_schedule_is_a_function_of_the_seed() -> None:
    a = schedule(7, 30, ["kill", "pause"], ["n1", "n2", "n3"])
    assert a == schedule(7, 30, ["kill", "pause"], ["n1", "n2", "n3"])
    assert a != schedule(8, 30, ["kill", "pause"], ["n1", "n2", "n3"])
    assert a and all(f.at + f.duration <= 30 - 0.5 for f in a)
    assert all(b.at >= f.at + f.duration for f, b in zip(a, a[1:], strict=False))  # one fault at a time
    assert schedule(7, 30, [], ["n1"]) == []


def test_unknown_or_unimplemented_nemesis_fails_before_the_run() -> None:
    with pytest.raises(InvalidArgument, match="unknown nemesis 'flood'"):
        parse_kinds("kill,flood")
    assert parse_kinds("none") == []
    with pytest.raises(InvalidArgument, match="partition is not implemented by the inprocess cluster"):
        run(InProcessCluster(3), RunConfig(time=1, nemesis=["partition"]))
    r = CliRunner().invoke(main, ["torture", "--nemesis", "skew", "--time", "1"])
    assert r.exit_code == 1 and "skew is not implemented by the inprocess cluster" in r.output
    r = CliRunner().invoke(main, ["torture", "--nemesis", "crash", "--time", "1", "--cluster", "local"])
    assert r.exit_code == 1 and "nemesis crash: a host crash" in r.output and "--simulate" in r.output


def test_check_of_a_broken_saved_history_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text(
        '{"shmkv_history": 1, "n": 3, "w": 2, "r": 2}\n'
        '{"i": 0, "p": 0, "k": "k", "f": "write", "t0": 0, "t1": 1, "o": "ok", "v": "a"}\n'
        '{"i": 1, "p": 0, "k": "k", "f": "write", "t0": 2, "t1": 3, "o": "ok", "v": "b"}\n'
        '{"i": 2, "p": 1, "k": "k", "f": "read", "t0": 4, "t1": 5, "o": "ok", "r": ["a"]}\n'
    )
    r = CliRunner().invoke(main, ["torture", "--check", str(path)])
    assert r.exit_code == 1
    assert "linearizable   FAIL" in r.output and "skipped        lost-writes" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"shmkv_history": 1}\n{"i": 0}\n')
    r = CliRunner().invoke(main, ["torture", "--check", str(bad)])
    assert r.exit_code == 1 and "line 2" in r.output


def test_out_writes_the_timeline_with_its_three_panels(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from shmkv.torture.plot import PANELS, figure

    cfg = RunConfig(time=2.5, seed=3, nemesis=["kill", "pause"], op_timeout=0.1)  # faults: see the first test
    res = run(InProcessCluster(3, seed=3), cfg, tmp_path / "out")
    png = tmp_path / "out" / "timeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # --out wrote it
    assert "no timeline" not in (tmp_path / "out" / "report.txt").read_text()
    fig = figure(res.history)
    try:
        faults, rate, latency = fig.axes
        assert tuple(ax.get_ylabel() for ax in fig.axes) == PANELS == ("faults", "ops/s", "latency (ms)")
        assert latency.get_xlabel() == "seconds since the run began"
        # each panel shows what it says: a bar per fault (on its node's row), a rate line per
        # outcome, a latency point per completed op
        assert len(faults.collections) == len(res.history.faults) > 0
        assert {t.get_text() for t in faults.get_yticklabels()} == {f["node"] for f in res.history.faults}
        assert {ln.get_label() for ln in rate.get_lines()} == {"ok", "fail", "unknown"}
        timed = [o for o in res.history.ops if o.complete is not None and o.complete > o.invoke]
        assert sum(len(c.get_offsets()) for c in latency.collections) == len(timed) > 0
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    assert History.load  # the saved form is what --check reads (tested above)
