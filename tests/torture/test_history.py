"""A history survives its JSON-lines form: saved, loaded and re-checked to the same verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from shmkv.torture.history import History, HistoryError, Op, versions_to_final

from .builder import Replicas


def test_roundtrip_keeps_ops_final_states_raft_and_faults(tmp_path: Path) -> None:
    rep = Replicas(["a", "b"])
    co = rep.put("k", "x", None, "a", ["a", "b"])
    h = History(
        ops=[
            Op(0, 1, "k", "write", 0.5, 1.25, "ok", "x", None, None, co),
            Op(1, 2, "k", "read", 2.0, 3.0, "ok", None, ["x"], None, co),
            Op(2, 2, "k", "cas", 4.0, None, "unknown", ("x", "y")),
            Op(3, 3, "c", "incr", 4.0, 4.5, "fail", 2, None, error="QuorumError: 1 of 2"),
        ],
        meta={"seed": 7, "workload": "register"},
        final=versions_to_final(rep.state),
        raft=[["a", 1, "leader", 0, []]],
        faults=[{"t0": 1.0, "t1": 2.0, "kind": "kill", "node": "a"}],
    )
    path = tmp_path / "h.jsonl"
    h.save(path)
    g = History.load(path)
    assert g.meta == h.meta and g.raft == h.raft and g.faults == h.faults
    assert [o.to_json() for o in g.ops] == [o.to_json() for o in h.ops]
    assert g.ops[2].value == ("x", "y")
    assert g.final_versions() == {n: dict(ks) for n, ks in rep.state.items()}


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "no header"),
        (['{"shmkv_history": 99}'], "format 1"),
        (['{"shmkv_history": 1}', "{nope"], "line 2: not JSON"),
        (['{"shmkv_history": 1}', '{"i": 0, "p": 0, "k": "k", "f": "jump", "t0": 0, "t1": 1}'], "unknown function"),
        (['{"shmkv_history": 1}', '{"i": 0, "p": 0, "k": "k", "f": "read", "t0": 2, "t1": 1}'], "before it is invoked"),
        (['{"shmkv_history": 1}', '{"i": 0, "p": 0, "f": "read", "t0": 2}'], "lacks field"),
        (['{"shmkv_history": 1}', '{"i": 0, "p": 0, "k": "k", "f": "read", "t0": 0, "o": "ok"}'], "needs a completion"),
    ],
)
def test_malformed_history_names_the_problem(lines: list[str], message: str) -> None:
    with pytest.raises(HistoryError, match=message):
        History.parse(lines)
