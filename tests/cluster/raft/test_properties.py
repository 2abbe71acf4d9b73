"""The Raft paper's safety properties (figure 3) over randomised seeded runs.

Each run mixes proposals, ReadIndex reads at any node, membership changes, compactions,
partitions, 5% message loss, reordering, crashes (some between a step and its Ready, losing the
unpersisted state) and restarts; :class:`harness.Checker` checks election safety, log matching,
leader completeness and state machine safety (and that no read returns an index below what was
committed when it was asked) after every single event. Then :func:`harness.settle` heals
everything and requires a leader that commits. Same seed, same run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shmkv.cluster.raft import core
from shmkv.cluster.raft.types import Message, MsgType

from .harness import PropertyViolation, random_run, settle


@pytest.mark.parametrize("block", range(10))
def test_random_runs_keep_raft_properties(block: int) -> None:
    for seed in range(block * 20, block * 20 + 20):
        c = random_run(seed, steps=1500)
        settle(c)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(20))
def test_random_runs_keep_raft_properties_long(block: int) -> None:
    for seed in range(1000 + block * 25, 1000 + block * 25 + 25):
        c = random_run(seed, steps=6000, spares=2, drop=0.1)
        settle(c)


def test_random_runs_over_durable_logs_on_disk(tmp_path: Path) -> None:
    # The same runs with every node's state in a real DurableLog (fsync, rename), and each
    # crashed node restarted from its directory: the disk keeps what the Ready contract needs.
    for seed in range(3):
        c = random_run(seed, steps=1000, disk=tmp_path / f"s{seed}")
        try:
            settle(c)
        finally:
            c.close()


@pytest.mark.slow
def test_random_runs_over_durable_logs_on_disk_long(tmp_path: Path) -> None:
    for seed in range(100, 115):
        c = random_run(seed, steps=3000, disk=tmp_path / f"s{seed}", crash_before_ready=0.01)
        try:
            settle(c)
        finally:
            c.close()


def test_same_seed_same_run() -> None:
    a, b = random_run(5, steps=1500), random_run(5, steps=1500)
    assert a.trace == b.trace and a.now == b.now
    assert {i: n.log() for i, n in a.nodes.items()} == {i: n.log() for i, n in b.nodes.items()}
    assert a.checker.committed == b.checker.committed


def test_checker_catches_commit_without_majority(monkeypatch: pytest.MonkeyPatch) -> None:
    # A deliberately broken build: the leader counts an entry committed once it alone stores it.
    monkeypatch.setattr(
        core,
        "quorum_index",
        lambda node: node._progress[node.id].match if node.id in node._progress else 0,
    )
    with pytest.raises(PropertyViolation, match="state machine safety|leader completeness"):
        for seed in range(60):
            random_run(seed, steps=3000)


def test_checker_catches_two_leaders_in_a_term(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another broken build: a node votes for anyone who asks, even twice in one term.
    monkeypatch.setattr(core.RaftNode, "_handle_vote", _vote_for_everyone)
    with pytest.raises(PropertyViolation):
        for seed in range(60):
            random_run(seed, steps=3000)


def _vote_for_everyone(self: core.RaftNode, m: Message) -> None:
    resp = MsgType.PRE_VOTE_RESP if m.type == MsgType.PRE_VOTE else MsgType.VOTE_RESP
    self._send(Message(resp, self.id, m.src, m.term))


def test_checker_catches_messages_sent_before_persisting() -> None:
    # A caller that breaks the Ready contract: it sends (votes, acknowledgements) and then
    # crashes before storing what they acknowledge. Restarted, the node has forgotten its vote
    # and its entries; some run shows two leaders in a term or a lost committed entry.
    with pytest.raises(PropertyViolation):
        for seed in range(200):
            random_run(seed, steps=3000, crash_before_ready=0.05, send_before_persist=True)


def test_same_crash_rate_with_the_contract_kept_is_safe() -> None:
    for seed in range(20):
        random_run(seed, steps=3000, crash_before_ready=0.05)
