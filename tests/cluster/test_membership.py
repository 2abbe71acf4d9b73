"""membership.py's pure decisions: the static ring from the seeds, and every conflict named."""

from __future__ import annotations

import pytest

from shmkv.cluster.coordinator import Config
from shmkv.cluster.errors import ConfigError
from shmkv.cluster.membership import check_peer, check_ring, ring_from_statuses
from shmkv.cluster.ring import Member, Ring
from shmkv.cluster.wire import BadRequest

SEEDS = ["h:1", "h:2", "h:3"]


def _me(name: str = "a", addr: str = "h:1", n: int = 3, weight: float = 1.0) -> Config:
    return Config(name, addr, weight=weight, n=n)


def _statuses(**over: dict) -> dict:
    st = {
        "h:1": {"name": "a", "addr": "h:1", "weight": 1.0, "n": 3},
        "h:2": {"name": "b", "addr": "h:2", "weight": 2.0, "n": 3},
        "h:3": {"name": "c", "addr": "h:3", "weight": 1.0, "n": 3},
    }
    for addr, fields in over.items():
        st[addr.replace("_", ":")].update(fields)
    return st


def test_every_node_builds_the_same_epoch_1_ring_with_the_seeds_weights() -> None:
    ring = ring_from_statuses(_me(), SEEDS, _statuses())
    assert ring.epoch == 1
    assert {m.name: (m.addr, m.weight) for m in ring.members.values()} == {
        "a": ("h:1", 1.0), "b": ("h:2", 2.0), "c": ("h:3", 1.0),
    }
    assert ring == ring_from_statuses(_me("b", "h:2"), list(reversed(SEEDS)), _statuses())


def test_another_n_or_a_duplicate_name_is_named() -> None:
    with pytest.raises(ConfigError, match=r"seed h:2 \(b\) runs with N=2, this node \(a\) with N=3"):
        ring_from_statuses(_me(), SEEDS, _statuses(h_2={"n": 2}))
    with pytest.raises(ConfigError, match="seeds h:1 and h:3 both call themselves 'a'"):
        ring_from_statuses(_me(), SEEDS, _statuses(h_3={"name": "a"}))
    with pytest.raises(ConfigError, match="N=3 replicas asked for"):
        ring_from_statuses(_me(), SEEDS[:2], _statuses())


def test_running_nodes_refuse_a_conflicting_peer() -> None:
    ring = Ring([Member("a", "h:1"), Member("b", "h:2"), Member("c", "h:3")], 1)
    check_peer(_me(), ring, {})  # a plain status request
    check_peer(_me(), ring, {"name": "c", "addr": "h:3", "n": 3})
    with pytest.raises(BadRequest, match="started with N=2, this cluster runs with N=3"):
        check_peer(_me(), ring, {"name": "c", "addr": "h:3", "n": 2})
    with pytest.raises(BadRequest, match="the name 'a' is taken by h:1"):
        check_peer(_me(), ring, {"name": "a", "addr": "h:3", "n": 3})
    with pytest.raises(BadRequest, match="the name 'b' belongs to h:2"):
        check_peer(_me(), ring, {"name": "b", "addr": "h:3", "n": 3})


def test_a_restarting_node_adopts_the_ring_only_if_it_agrees() -> None:
    ring = Ring([Member("a", "h:1"), Member("b", "h:2", 2.0), Member("c", "h:3")], 1)
    assert check_ring(_me("b", "h:2", weight=2.0), ring, SEEDS, {"n": 3}) is ring
    with pytest.raises(ConfigError, match="runs with N=3"):
        check_ring(_me("b", "h:2", n=2, weight=2.0), ring, SEEDS, {"n": 3})
    with pytest.raises(ConfigError, match="weight 2 in the running cluster's ring"):
        check_ring(_me("b", "h:2"), ring, SEEDS, {"n": 3})
    with pytest.raises(ConfigError, match="no member 'd'"):
        check_ring(_me("d", "h:2"), ring, SEEDS, {"n": 3})
    with pytest.raises(ConfigError, match="--seeds lists"):
        check_ring(_me("b", "h:2", weight=2.0), ring, SEEDS + ["h:4"], {"n": 3})
