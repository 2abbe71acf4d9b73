"""The raft-group checker (group.py) over synthetic observations of the daemons' configuration
group: a clean history passes (a commit index that drops across a restart but stays above what
was applied is Raft's volatile commit, not a violation); each deliberately broken one -- two
leaders in a term, an epoch or commit index going back, two configurations at one epoch, a
committed epoch the final poll does not have -- is flagged, naming the nodes."""

from __future__ import annotations

import io
from typing import Any

from shmkv.torture.group import check_group
from shmkv.torture.history import History
from shmkv.torture.report import check_history


def o(node: str, term: int, role: str | None = "follower", leader: str | None = "n1", commit: int = 2,
      applied: int | None = None, epoch: int = 1, pid: int = 100, config: str | None = None) -> dict[str, Any]:
    return {"t": 0.0, "node": node, "pid": pid, "role": role, "term": term, "leader": leader, "commit": commit,
            "applied": commit if applied is None else applied, "config_epoch": epoch,
            "config": config or f"cfg{epoch}"}


def clean() -> list[dict[str, Any]]:
    return [
        o("n1", 1, "leader", "n1", 2), o("n2", 1, commit=2), o("n3", 1, commit=1, applied=1),
        o("n1", 1, "leader", "n1", 4, epoch=2), o("n2", 1, commit=4, epoch=2),
        # n3 restarted (new pid): its commit drops from 5 to 4 (volatile), not below the 4 it applied
        o("n3", 1, commit=5, applied=4, epoch=2), o("n3", 1, commit=4, applied=2, epoch=2, pid=200),
        o("n4", 0, None, None, 0, epoch=2, pid=300) | {"term": None, "commit": None, "applied": None},  # a learner
        o("n2", 2, "leader", "n2", 6, epoch=3), o("n1", 2, leader="n2", commit=6, epoch=3),
    ]


FINAL = [o("n1", 2, leader="n2", commit=6, epoch=3), o("n2", 2, "leader", "n2", 6, epoch=3)]


def messages(obs: list[dict[str, Any]], final: list[dict[str, Any]] | None = FINAL) -> list[str]:
    v = check_group(obs, final)
    assert (v.status == "pass") == (not v.problems)
    return [p.message for p in v.problems]


def test_a_clean_history_passes() -> None:
    v = check_group(clean(), FINAL)
    assert v.status == "pass", [p.message for p in v.problems]
    assert v.stats["terms"] == 2 and v.stats["epochs"] == [1, 3] and v.stats["final_epoch"] == 3


def test_two_leaders_in_one_term_are_flagged_by_role_or_by_a_followers_view() -> None:
    assert messages(clean() + [o("n3", 2, "leader", "n3", 6, epoch=3, pid=200)]) == [
        "two leaders in term 2: 'n2' (seen by 'n2') and 'n3' (seen by 'n3')"]
    assert messages(clean() + [o("n3", 1, leader="n2", commit=6, epoch=3, pid=200)]) == [
        "two leaders in term 1: 'n1' (seen by 'n1') and 'n2' (seen by 'n3')"]


def test_an_epoch_or_index_going_back_in_one_process_is_flagged() -> None:
    assert messages(clean() + [o("n1", 2, leader="n2", commit=6, epoch=2, config="cfg2")]) == [
        "'n1''s config_epoch went back from 3 to 2 (same process, pid 100)"]
    got = messages(clean() + [o("n2", 2, "leader", "n2", 5, epoch=3)])
    assert got == ["'n2''s commit went back from 6 to 5 (same process, pid 100)",
                   "'n2''s applied went back from 6 to 5 (same process, pid 100)"]


def test_a_served_ring_epoch_going_back_is_flagged() -> None:
    obs = clean()
    obs[-1] = obs[-1] | {"epoch": 3}
    assert messages(obs + [o("n1", 2, leader="n2", commit=6, epoch=3) | {"epoch": 2}]) == [
        "'n1''s epoch went back from 3 to 2 (same process, pid 100)"]


def test_a_restart_that_forgot_what_it_applied_or_committed_is_flagged() -> None:
    assert messages(clean() + [o("n1", 2, leader="n2", commit=3, applied=3, epoch=3, pid=101)]) == [
        "'n1' restarted with commit index 3, below the 6 entries it had applied before"]
    assert messages(clean() + [o("n1", 2, leader="n2", commit=6, epoch=2, pid=101, config="cfg2")]) == [
        "'n1' restarted at committed epoch 2, below the epoch 3 it had committed before"]


def test_a_restarted_learner_knowing_no_configuration_yet_is_not_a_violation() -> None:
    learner = o("n4", 0, None, None, 0, epoch=2, pid=300) | {"term": None, "commit": None, "applied": None}
    fresh = learner | {"pid": 301, "config_epoch": 0, "config": None}  # holds no log: learns it again
    assert messages(clean() + [fresh]) == []


def test_two_configurations_at_one_epoch_are_flagged() -> None:
    assert messages(clean() + [o("n3", 2, leader="n2", commit=6, epoch=3, pid=200, config="other")]) == [
        "epoch 3 committed as two configurations: cfg3 on 'n2', other on 'n3'"]


def test_a_committed_epoch_missing_from_the_final_poll_is_lost() -> None:
    assert messages(clean(), [o("n1", 2, leader="n2", commit=4, epoch=2)]) == [
        "committed epoch 3 (reported by 'n2') is lost: the final poll's highest is 2"]
    assert messages(clean(), []) == ["no node answered the final poll of the configuration group"]
    assert messages(clean(), None) == []  # no final poll: that check is not made


def test_the_history_keeps_the_observations_and_the_report_checks_them() -> None:
    h = History(meta={"seed": 1}, group={"observations": clean() + [o("n3", 2, "leader", "n3", 6, epoch=3)],
                                         "final": FINAL})
    buf = io.StringIO()
    h.dump(buf)
    again = History.parse(buf.getvalue().splitlines())
    assert again.group == h.group
    verdicts, _ = check_history(again)
    v = next(v for v in verdicts if v.checker == "raft-group")
    assert v.status == "fail" and "two leaders in term 2" in v.problems[0].message


def test_a_failing_reports_replay_command_keeps_the_group_on() -> None:
    from shmkv.torture.report import replay_command

    assert replay_command({"seed": 2, "cluster": "local", "nemesis": ["kill"], "raft": True}).endswith(
        "--nemesis kill --raft")
    assert "--raft" not in replay_command({"seed": 2, "cluster": "local", "nemesis": ["scale"], "raft": True})
