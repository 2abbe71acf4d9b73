"""Raft safety over node observations: each property caught when deliberately broken."""

from __future__ import annotations

import pytest

from shmkv.torture.history import HistoryError
from shmkv.torture.raft import check_raft

CFG1 = {"config": ["a", "b", "c"]}
CFG2 = {"config": ["a", "b", "c", "d"]}


def healthy() -> list[list[object]]:
    return [
        ["a", 1, "leader", 1, [[1, CFG1]]],
        ["b", 1, "follower", 1, [[1, CFG1]]],
        ["b", 2, "candidate", 1, [[1, CFG1]]],
        ["b", 2, "leader", 2, [[1, CFG1], [2, CFG2]]],
        ["c", 2, "follower", 2, [[1, CFG1], [2, CFG2]]],
        ["a", 2, "follower", 1, [[1, CFG1], [2, CFG2]]],
        ["a", 3, "follower", 0, [[1, CFG1], [2, CFG2]]],  # restarted: commit index is volatile
    ]


def test_healthy_group_passes() -> None:
    v = check_raft(healthy())
    assert v.status == "pass" and v.stats["terms"] == 2


def test_two_leaders_in_one_term_fail() -> None:
    obs = healthy() + [["c", 2, "leader", 1, [[1, CFG1]]]]
    v = check_raft(obs)
    assert v.status == "fail" and "two leaders in term 2" in v.problems[0].message


def test_committed_configuration_lost_by_a_later_leader_fails() -> None:
    # c committed CFG2 at term 2; a leader of term 3 without it (elected without a majority
    # holding it, or committed without a majority) loses it.
    obs = healthy() + [["a", 3, "leader", 1, [[1, CFG1], [3, {"config": ["a"]}]]]]
    v = check_raft(obs)
    assert v.status == "fail"
    assert any("missing from the log of 'a', leader of term 3" in p.message for p in v.problems)


def test_two_entries_committed_at_one_index_fail() -> None:
    obs = healthy() + [["d", 2, "follower", 2, [[1, CFG1], [2, {"config": ["x"]}]]]]
    v = check_raft(obs)
    msgs = [p.message for p in v.problems]
    assert v.status == "fail" and any("index 2 committed as" in m for m in msgs)
    assert any("log matching violated at index 2" in m for m in msgs)


def test_malformed_observation_is_named() -> None:
    with pytest.raises(HistoryError, match="role 'boss'"):
        check_raft([["a", 1, "boss", 0, []]])
    with pytest.raises(HistoryError, match="beyond its log"):
        check_raft([["a", 1, "leader", 3, [[1, "x"]]]])
