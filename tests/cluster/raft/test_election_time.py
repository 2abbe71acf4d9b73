"""How long a 3-voter group is leaderless after its leader is killed (shmkv/torture/election.py),
and the retry windows of a node already campaigning (core.RaftNode._draw_timeout)."""

from __future__ import annotations

import pytest

from shmkv.cluster.raft.core import Config, RaftNode, Role
from shmkv.cluster.raft.types import Snapshot
from shmkv.torture.election import (
    distribution,
    leader_terms_without_kill,
    leaderless_after_kill,
)

SEEDS = range(200)
#: the configuration service's timing before the retry window and the finer ticks
OLD_CONFIG = Config(election_ticks=10, heartbeat_ticks=1, retry_ticks=10)
OLD_TICK = 0.1


@pytest.mark.parametrize("loss", [0.0, 0.01])
def test_new_leader_well_within_3_s_of_a_leader_kill_over_200_seeds(loss: float) -> None:
    d = distribution([leaderless_after_kill(s, loss=loss) for s in SEEDS])
    assert d["max"] < 2.5, d
    assert d["p50"] >= 1.0, d  # nobody campaigns before a follower timeout: not spurious


def test_the_old_timing_overran_3_s_on_the_same_seeds() -> None:
    # ticks of 0.1 s, and a failed round waiting a whole follower window [1, 2) s again
    d = distribution(
        [leaderless_after_kill(s, loss=0.01, config=OLD_CONFIG, tick=OLD_TICK) for s in SEEDS]
    )
    assert d["max"] >= 3.0, d


def test_no_spurious_election_under_load_on_a_slow_lossy_network() -> None:
    # 30 s of proposals every 20 ms, messages 1-300 ms, 5 % lost: one leader throughout. The
    # retry window only opens once a follower timeout has passed, so it cannot add elections;
    # a follower window shorter than the heartbeats' delays does (the control).
    def terms(config: Config | None) -> list[int]:
        return [
            leader_terms_without_kill(s, 30.0, config=config, latency=(0.001, 0.3), loss=0.05)
            for s in range(8)
        ]

    assert terms(None) == [1] * 8
    assert max(terms(Config(election_ticks=4, heartbeat_ticks=2))) > 1


def test_an_isolated_node_backs_off_and_never_raises_its_term() -> None:
    # Cut off from both peers: a follower timeout first, then rounds of pre-votes that no one
    # answers, retried after [2, 4), [4, 8), [8, 16) ticks and then the follower window.
    n = RaftNode("r1", Config(seed=7), snapshot=Snapshot(voters=("r1", "r2", "r3")))
    starts = []
    for t in range(1, 200):
        n.tick()
        if n.has_ready():
            rd = n.ready()
            if rd.messages:
                starts.append(t)
            n.advance(rd)
    assert n.role == Role.PRE_CANDIDATE and n.term == 0
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert 10 <= starts[0] < 20
    assert 2 <= gaps[0] < 4 and 4 <= gaps[1] < 8 and 8 <= gaps[2] < 16
    assert all(10 <= g < 20 for g in gaps[3:]) and len(gaps) >= 6
