"""PN-counters: increments through any coordinators all count, whatever replicas exchange."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmkv
from shmkv.cluster.crdt import PNCounter
from shmkv.cluster.errors import ProtocolError

NODES = ("a", "b", "c")
QUICK = settings(max_examples=300, deadline=None)

counters = st.dictionaries(
    st.sampled_from(NODES), st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=3
).map(PNCounter)


def test_increments_that_meet_at_different_coordinators_both_count() -> None:
    # The lost update a read-modify-write through quorums would make: both coordinators read 5.
    five = PNCounter().increment("a", 5)
    at_a, at_b = five.increment("a", 1), five.merge(PNCounter()).increment("b", 1)
    assert at_a.value == at_b.value == 6
    assert at_a.merge(at_b).value == 7


def test_decrements_count_too() -> None:
    c = PNCounter().increment("a", 10).increment("b", -3).increment("a", -2)
    assert c.value == 5 and c.entries == {"a": (10, 2), "b": (0, 3)}


def test_a_replica_behind_learns_everything_by_merging() -> None:
    behind = PNCounter().increment("a", 1)
    ahead = behind.increment("a", 4).increment("c", 2)
    assert behind.merge(ahead) == ahead and ahead.descends(behind) and not behind.descends(ahead)


@QUICK
@given(counters, counters, counters)
def test_merge_is_commutative_associative_idempotent(
    a: PNCounter, b: PNCounter, c: PNCounter
) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a and a.merge(b).merge(b) == a.merge(b)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("incr"), st.sampled_from(NODES), st.integers(-100, 100)),
            st.tuples(st.just("sync"), st.sampled_from(NODES), st.sampled_from(NODES)),
        ),
        max_size=60,
    )
)
def test_no_increment_is_lost_when_replicas_diverge_and_converge(
    steps: list[tuple[str, str, object]],
) -> None:
    replicas = {n: PNCounter() for n in NODES}
    total = 0
    for op, node, arg in steps:
        if op == "incr":
            assert isinstance(arg, int)
            replicas[node] = replicas[node].increment(node, arg)
            total += arg
        else:
            assert isinstance(arg, str)
            replicas[arg] = replicas[arg].merge(replicas[node])
    # Converge in some order: every replica then counts every increment.
    for src in NODES:
        for dst in NODES:
            replicas[dst] = replicas[dst].merge(replicas[src])
    assert all(r.value == total for r in replicas.values())


@QUICK
@given(counters)
def test_encoding_round_trips(c: PNCounter) -> None:
    assert PNCounter.decode(c.encode()) == c


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=48))
def test_decoding_garbage_raises_protocol_error(data: bytes) -> None:
    try:
        got = PNCounter.decode(data)
    except ProtocolError as e:
        assert isinstance(e, shmkv.Error)
    else:
        assert PNCounter.decode(got.encode()) == got


@pytest.mark.parametrize(
    "wire",
    [
        [3, [["b", 1, 0], ["a", 1, 0]]],
        [3, [["a", 0, 0]]],
        [3, [["a", -1, 0]]],
        [3, [["a", 1]]],
        [1, [["a", 1, 0]]],
        [3, {"a": [1, 0]}],
        [3, [["", 1, 0]]],
    ],
)
def test_non_canonical_wire_forms_are_refused(wire: object) -> None:
    with pytest.raises(ProtocolError):
        PNCounter.decode(msgpack.packb(wire))


def test_bad_deltas_are_refused() -> None:
    with pytest.raises(shmkv.InvalidType):
        PNCounter().increment("a", 1.5)  # type: ignore[arg-type]
    with pytest.raises(shmkv.InvalidArgument, match="2\\*\\*64"):
        PNCounter().increment("a", 1 << 64)
