"""Gossip heartbeats + phi over the simulated network (liveness.py's Gossiper as sim machines).

Each scenario runs five nodes, gossip every 1 s to 3 random peers, the default detector, and
samples every node's verdicts every 0.1 virtual seconds. Same seed, same run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from shmkv.cluster import wire
from shmkv.cluster.failure_detector import PhiAccrual
from shmkv.cluster.liveness import Gossiper, merge_views, parse_view
from shmkv.cluster.wire import Message

from .sim import SimNetwork

NAMES = ["a", "b", "c", "d", "e"]
MEMBERS = {n: f"{n}:1" for n in NAMES}


class Pausable:
    """A machine that can be SIGSTOPped: while paused it neither steps nor receives (what was
    sent to it is lost, as the peers' requests to a stopped daemon time out)."""

    def __init__(self, inner: Gossiper) -> None:
        self.inner = inner
        self.paused = False

    def step(self, now: float, inbox: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
        if self.paused:
            return []
        return self.inner.step(now, inbox)


@pytest.fixture
def cluster() -> Iterator[Any]:
    nets: list[SimNetwork] = []

    def make(seed: int, drop: float = 0.0, **detector: Any) -> tuple[SimNetwork, dict[str, Pausable]]:
        net = SimNetwork(seed, delay=(0.001, 0.010), drop=drop)
        nets.append(net)
        nodes = {}
        for i, n in enumerate(NAMES):
            g = Gossiper(n, 1, MEMBERS, random.Random(seed * 100 + i), detector=PhiAccrual(**detector))
            nodes[n] = Pausable(g)
            net.add_machine(MEMBERS[n], nodes[n], tick=0.1)
        return net, nodes

    yield make
    for net in nets:
        net.close()


def verdicts(net: SimNetwork, nodes: dict[str, Pausable], seconds: float) -> list[tuple[float, str, set[str]]]:
    """Every 0.1 s: (time, node, the peers it holds down), for the running nodes."""
    out = []
    for _ in range(round(seconds * 10)):
        net.run_for(0.1)
        for n, m in nodes.items():
            if not m.paused and net._machines.get(MEMBERS[n]) is m:
                out.append((net.now, n, m.inner.down(net.now)))
    return out


def test_one_percent_loss_causes_no_flapping(cluster: Any) -> None:
    for seed in range(4):
        net, nodes = cluster(seed, drop=0.01)
        seen = verdicts(net, nodes, 300.0)
        flaps = [(t, n, d) for t, n, d in seen if d]
        assert flaps == [], f"seed {seed}: {flaps[:5]}"


def test_a_crashed_node_is_down_everywhere_within_five_seconds_and_up_when_it_returns(cluster: Any) -> None:
    net, nodes = cluster(1, drop=0.01)
    verdicts(net, nodes, 30.0)
    net.crash(MEMBERS["c"])
    crashed = net.now
    seen = verdicts(net, nodes, 10.0)
    for n in NAMES:
        if n == "c":
            continue
        when = [t for t, m, d in seen if m == n and "c" in d]
        assert when and when[0] - crashed <= 5.0, n
        assert [t for t, m, d in seen if m == n and t >= when[0] and "c" not in d] == []
    # c restarts: a new run, a new generation, its counter from 0 again.
    g = Gossiper("c", 2, MEMBERS, random.Random(99), now=net.now)
    nodes["c"] = Pausable(g)
    net.add_machine(MEMBERS["c"], nodes["c"], tick=0.1)
    back = net.now
    seen = verdicts(net, nodes, 10.0)
    for n in NAMES:
        last_down = [t for t, m, d in seen if m == n and d]
        assert not last_down or last_down[-1] - back <= 5.0, n
        assert seen and not [d for t, m, d in seen if m == n and t > back + 5.0 and d], n


def test_a_paused_node_is_convicted_and_does_not_convict_its_healthy_peers_when_it_wakes(cluster: Any) -> None:
    net, nodes = cluster(2, drop=0.01)
    verdicts(net, nodes, 30.0)
    nodes["b"].paused = True
    seen = verdicts(net, nodes, 20.0)  # longer than the threshold's ~3 s, by far
    for n in ("a", "c", "d", "e"):
        assert any(m == n and "b" in d for t, m, d in seen), n
    nodes["b"].paused = False
    woke = net.now
    seen = verdicts(net, nodes, 20.0)
    woken = [(t, d) for t, m, d in seen if m == "b" and d]
    assert woken == [], woken  # nobody convicted by the node that missed 20 s of gossip
    for n in ("a", "c", "d", "e"):
        assert not [d for t, m, d in seen if m == n and t > woke + 5.0 and d], n


def test_without_the_local_pause_guard_the_woken_node_would_convict_everyone(cluster: Any) -> None:
    # The guard under test above, switched off: the scenario is sharp enough to catch its loss.
    net, nodes = cluster(2, drop=0.01, max_local_pause=float("inf"))
    verdicts(net, nodes, 30.0)
    nodes["b"].paused = True
    verdicts(net, nodes, 20.0)
    nodes["b"].paused = False
    assert nodes["b"].inner.down(net.now + 0.01) == {"a", "c", "d", "e"}


def test_same_seed_same_verdicts(cluster: Any) -> None:
    runs = []
    for _ in range(2):
        net, nodes = cluster(5, drop=0.05)
        net.crash(MEMBERS["e"])
        runs.append((verdicts(net, nodes, 20.0), net.trace))
    assert runs[0] == runs[1]


def test_merge_is_a_join() -> None:
    rng = random.Random(7)
    for _ in range(200):
        views = [
            {n: (rng.randint(1, 3), rng.randint(0, 9)) for n in rng.sample(NAMES, rng.randint(0, 5))}
            for _ in range(3)
        ]
        a, b, c = views
        assert merge_views(a, b) == merge_views(b, a)
        assert merge_views(merge_views(a, b), c) == merge_views(a, merge_views(b, c))
        assert merge_views(a, a) == a


def test_bad_gossip_is_dropped_entry_by_entry_and_nothing_else_changes() -> None:
    g = Gossiper("a", 5, MEMBERS, random.Random(1))
    g.round(0.0)
    before = dict(g.view)
    why = g.receive(
        [
            ["b", 1, 3],  # fine
            ["zz", 1, 9],  # not a member (a node that no longer exists, or forged)
            ["a", 9, 9],  # another process claiming this node's name, ahead of it
            ["c", -1, 2],  # malformed
            ["d", 1],
            "garbage",
            ["e", True, 1],
        ],
        1.0,
    )
    assert g.view == {**before, "b": (1, 3)}
    assert len(why) == 6 and any("not a member" in w for w in why)
    assert any("another process" in w for w in why)
    assert g.receive({"not": "a list"}, 1.0) and g.view == {**before, "b": (1, 3)}
    assert parse_view([["b", 2, 1], ["b", 1, 9]])[0] == {"b": (2, 1)}


def test_a_gossip_message_crosses_the_wire_format() -> None:
    g = Gossiper("a", 5, MEMBERS, random.Random(1))
    out = g.step(0.0, [])
    assert out and all(m.code == wire.GOSSIP for _, m in out)
    for _, m in out:
        assert wire.decode_body(wire.encode(m)[wire.HEADER.size :]).fields["view"] == [["a", 5, 1]]
