"""Placement: the active preference list with nodes down (riak_core_apl:get_apl/4's twin)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmkv.cluster.errors import ConfigError
from shmkv.cluster.placement import Target, apl, preference_list
from shmkv.cluster.ring import Member, Ring

NAMES = [f"node-{i}" for i in range(8)]
RING = Ring(
    [Member(n, f"127.0.0.1:{7400 + i}") for i, n in enumerate(NAMES)], 1, vnodes_per_weight=64
)


def test_with_every_node_up_the_targets_are_the_primaries() -> None:
    for k in (b"a", b"b", b"user:42"):
        assert apl(k, 3, RING, NAMES) == [Target(p, True) for p in preference_list(k, 3, RING)]


def test_a_down_primary_is_replaced_by_the_next_up_node_which_holds_its_hint() -> None:
    walk = list(RING.successors(b"user:42"))
    a, b, c, d, e = walk[:5]
    assert apl(b"user:42", 3, RING, set(NAMES) - {b}) == [
        Target(a, True),
        Target(c, True),
        Target(d, False, hint_for=b),
    ]
    # Two primaries down: the fallbacks stand in for them in ring order.
    assert apl(b"user:42", 3, RING, set(NAMES) - {a, c}) == [
        Target(b, True),
        Target(d, False, hint_for=a),
        Target(e, False, hint_for=c),
    ]


def test_a_fallback_that_is_itself_down_is_skipped() -> None:
    walk = list(RING.successors(b"k"))
    up = set(NAMES) - {walk[0], walk[3]}
    assert apl(b"k", 3, RING, up) == [
        Target(walk[1], True),
        Target(walk[2], True),
        Target(walk[4], False, hint_for=walk[0]),
    ]


def test_with_fewer_up_nodes_than_n_there_are_fewer_targets() -> None:
    walk = list(RING.successors(b"k"))
    assert apl(b"k", 3, RING, {walk[5]}) == [Target(walk[5], False, hint_for=walk[0])]
    assert apl(b"k", 3, RING, set()) == []


def test_unknown_names_in_up_are_ignored() -> None:
    assert apl(b"k", 2, RING, [*NAMES, "ghost"]) == apl(b"k", 2, RING, NAMES)


def test_n_larger_than_the_ring_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="only 8 members"):
        apl(b"k", 9, RING, NAMES)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=8), st.integers(1, 8), st.sets(st.sampled_from(NAMES)))
def test_targets_are_distinct_primaries_first_and_as_many_as_can_be(
    key: bytes, n: int, up: set[str]
) -> None:
    targets = apl(key, n, RING, up)
    primaries = preference_list(key, n, RING)
    nodes = [t.node for t in targets]
    assert len(set(nodes)) == len(nodes) == min(n, len(up))
    assert all(t.node in up for t in targets)
    flags = [t.is_primary for t in targets]
    assert flags == sorted(flags, reverse=True)
    assert [t.node for t in targets if t.is_primary] == [p for p in primaries if p in up]
    fallbacks = [t for t in targets if not t.is_primary]
    assert all(t.node not in primaries for t in fallbacks)
    down = [p for p in primaries if p not in up]
    assert [t.hint_for for t in fallbacks] == down[: len(fallbacks)]
