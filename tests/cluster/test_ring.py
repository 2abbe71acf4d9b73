"""The ring: balance, weights, minimal movement, distinct replicas, determinism, errors.

Balance is measured two ways: exactly, over the token space (the sum of each member's vnode
arcs), and by hashing sample keys, so a bug in either the arcs or the key lookup shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmkv
from shmkv.cluster.errors import ConfigError, ProtocolError
from shmkv.cluster.ring import TOKEN_SPACE, Member, Ring, key_token

# A ring of 20 members takes ~30 ms to build; these keep each property test to a few seconds.
FEW = settings(max_examples=25, deadline=None)
SOME = settings(max_examples=60, deadline=None)

names_st = st.lists(
    st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12),
    min_size=3,
    max_size=20,
    unique=True,
)


def ring_of(names: list[str], epoch: int = 1, weights: dict[str, float] | None = None) -> Ring:
    weights = weights or {}
    return Ring(
        [Member(n, f"127.0.0.1:{7400 + i}", weights.get(n, 1.0)) for i, n in enumerate(names)],
        epoch,
    )


def sample_keys(count: int, tag: str = "k") -> list[bytes]:
    return [f"{tag}:{i}".encode() for i in range(count)]


def max_over_mean(shares: dict[str, float]) -> float:
    return max(shares.values()) / (sum(shares.values()) / len(shares))


# -- balance ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(3, 21))
def test_equal_weights_balance_exactly_within_10_percent(n: int) -> None:
    for names in ([f"node-{i}" for i in range(n)], [f"10.0.0.{i}:7401" for i in range(n)]):
        arcs = ring_of(names).arcs()
        assert sum(arcs.values()) == TOKEN_SPACE
        assert max(arcs.values()) / (TOKEN_SPACE / n) <= 1.10


@FEW
@given(names_st)
def test_any_member_names_balance_exactly_within_10_percent(names: list[str]) -> None:
    assert max_over_mean(ring_of(names).shares()) <= 1.10


@pytest.mark.parametrize("n", [3, 10, 20])
def test_sampled_keys_balance_within_10_percent_and_match_the_exact_shares(n: int) -> None:
    ring = ring_of([f"node-{i}" for i in range(n)])
    keys = sample_keys(20_000 * n)
    counts = dict.fromkeys(ring.members, 0)
    for k in keys:
        counts[ring.preference_list(k, 1)[0]] += 1
    sampled = {m: c / len(keys) for m, c in counts.items()}
    assert max_over_mean(sampled) <= 1.10
    for m, share in ring.shares().items():
        assert abs(sampled[m] - share) < 0.03 * share


def test_replica_load_with_n_3_is_balanced_too() -> None:
    # What a node stores is every key whose preference list includes it, not only its primaries.
    ring = ring_of([f"node-{i}" for i in range(10)])
    counts = dict.fromkeys(ring.members, 0)
    for k in sample_keys(50_000):
        for m in ring.preference_list(k, 3):
            counts[m] += 1
    assert max_over_mean({m: float(c) for m, c in counts.items()}) <= 1.10


@FEW
@given(names_st, st.data())
def test_a_member_of_weight_2_owns_about_twice_the_share(
    names: list[str], data: st.DataObject
) -> None:
    heavy = data.draw(st.sampled_from(names))
    shares = ring_of(names, weights={heavy: 2.0}).shares()
    light = [s for m, s in shares.items() if m != heavy]
    assert 1.8 <= shares[heavy] / (sum(light) / len(light)) <= 2.2


def test_weights_scale_the_vnode_count() -> None:
    ring = ring_of(["a", "b", "c"], weights={"a": 0.5, "c": 3.0})
    assert [ring.vnode_count(m) for m in "abc"] == [1024, 2048, 6144]


# -- movement --------------------------------------------------------------------------------


@FEW
@given(names_st, st.text(min_size=1, max_size=12))
def test_adding_a_member_moves_about_1_over_n_plus_1_and_only_to_it(
    names: list[str], new: str
) -> None:
    if new in names:
        return
    old = ring_of(names, epoch=1)
    grown = old.with_members([*old.members.values(), Member(new, "127.0.0.1:9999")], epoch=2)
    n = len(names)
    # Exactly: every member that stays keeps a subset of its arcs; the newcomer's arcs are the moved part.
    old_arcs, new_arcs = old.arcs(), grown.arcs()
    assert all(new_arcs[m] <= old_arcs[m] for m in names)
    moved = new_arcs[new] / TOKEN_SPACE
    assert 0.9 / (n + 1) <= moved <= 1.1 / (n + 1)
    # By key, with 3 replicas: the new preference list is the old one with the newcomer inserted.
    for k in sample_keys(300):
        before, after = old.preference_list(k, 3), grown.preference_list(k, 3)
        assert set(after) <= set(before) | {new}
        assert [m for m in after if m != new] == before[: len(after) - (new in after)]


@FEW
@given(names_st, st.data())
def test_removing_a_member_moves_only_its_keys(names: list[str], data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(names))
    old = ring_of(names, epoch=3)
    shrunk = old.with_members([m for m in old.members.values() if m.name != gone], epoch=4)
    n = min(3, len(names) - 1)
    for k in sample_keys(300):
        before, after = old.preference_list(k, n), shrunk.preference_list(k, n)
        if gone not in before:
            assert after == before
        else:
            assert [m for m in before if m != gone] == after[: n - 1]


def test_reweighting_moves_keys_only_to_the_reweighted_member() -> None:
    names = [f"node-{i}" for i in range(6)]
    old, heavier = ring_of(names), ring_of(names, epoch=2, weights={"node-2": 2.0})
    for k in sample_keys(3000):
        before, after = old.preference_list(k, 1)[0], heavier.preference_list(k, 1)[0]
        assert before == after or after == "node-2"


@pytest.mark.parametrize("weight", [0.5, 2.0, 3.0])
def test_reweighting_moves_data_in_proportion_to_the_change_of_share(weight: float) -> None:
    # node-2's share goes from 1/6 to w/(5+w): about that difference of the keys (and of the
    # token space, exactly) changes owner, and no more -- a re-weight is not a reshuffle
    names = [f"node-{i}" for i in range(6)]
    old, new = ring_of(names), ring_of(names, epoch=2, weights={"node-2": weight})
    expected = abs(weight / (5 + weight) - 1 / 6)
    exact = abs(new.shares()["node-2"] - old.shares()["node-2"])
    assert 0.85 * expected <= exact <= 1.15 * expected
    keys = sample_keys(20_000)
    moved = sum(old.preference_list(k, 1)[0] != new.preference_list(k, 1)[0] for k in keys) / len(keys)
    assert 0.8 * expected <= moved <= 1.2 * expected, f"moved {moved:.3f}, share change {expected:.3f}"


# -- preference lists ------------------------------------------------------------------------


def model_preference_list(
    ring: Ring, key: bytes, n: int, vnodes: dict[str, list[int]]
) -> list[str]:
    # The deliberately simple model: rank members by the clockwise distance from the key's token
    # to their nearest vnode at or after it.
    t = key_token(key)
    dist = {m: min((v - t) % TOKEN_SPACE for v in toks) for m, toks in vnodes.items()}
    return sorted(dist, key=lambda m: (dist[m], m))[:n]


@SOME
@given(
    st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=8, unique=True),
    st.lists(st.binary(max_size=16), min_size=1, max_size=20),
    st.integers(1, 8),
)
def test_preference_list_is_next_n_distinct_members_as_in_a_simple_model(
    names: list[str], keys: list[bytes], n: int
) -> None:
    n = min(n, len(names))
    ring = Ring([Member(m, "h:1") for m in names], 0, vnodes_per_weight=4)
    vnodes = {m: [key_token(f"{m}#{i}".encode()) for i in range(4)] for m in names}
    for k in keys:
        got = ring.preference_list(k, n)
        assert len(set(got)) == n
        assert got == model_preference_list(ring, k, n, vnodes)


def test_member_order_does_not_change_the_ring() -> None:
    members = [Member(f"node-{i}", f"h:{i}") for i in range(7)]
    a, b = Ring(members, 5), Ring(reversed(members), 5)
    assert a == b
    assert all(a.preference_list(k, 3) == b.preference_list(k, 3) for k in sample_keys(500))


def test_every_process_computes_the_same_ring() -> None:
    # Another interpreter with another str-hash seed: the ring depends on mmh3 and names only.
    members = [Member(f"node-{i}", f"h:{i}", 1.0 + i % 2) for i in range(5)]
    ring = Ring(members, 1)
    script = (
        "import json, sys, msgpack\n"
        "from shmkv.cluster.ring import Ring\n"
        "r = Ring.from_wire(msgpack.unpackb(sys.stdin.buffer.read()))\n"
        "print(json.dumps([r.preference_list(f'k:{i}'.encode(), 3) for i in range(200)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=msgpack.packb(ring.to_wire()),
        capture_output=True,
        check=True,
        timeout=60,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout
    assert json.loads(out) == [ring.preference_list(f"k:{i}".encode(), 3) for i in range(200)]


def test_str_and_bytes_are_the_caller_s_choice_tokens_are_of_bytes() -> None:
    assert key_token(b"abc") == Ring.token(b"abc") == 13012657714217449575


# -- configuration and encoding --------------------------------------------------------------


def test_wire_round_trip_keeps_everything() -> None:
    ring = Ring(
        [Member("a", "h:1", 2.0, "dc1"), Member("b", "h:2"), Member("c", "h:3", 0.5)], 9, 64
    )
    again = Ring.from_wire(msgpack.unpackb(msgpack.packb(ring.to_wire())))
    assert again == ring
    assert again.epoch == 9 and again.members["a"].dc == "dc1"
    assert again.preference_list(b"x", 3) == ring.preference_list(b"x", 3)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"format": 1},
        {"format": 2, "epoch": 1, "vnodes_per_weight": 8, "members": [["a", "h:1", 1.0, None]]},
        {"format": 1, "epoch": -1, "vnodes_per_weight": 8, "members": [["a", "h:1", 1.0, None]]},
        {"format": 1, "epoch": 1, "vnodes_per_weight": 8, "members": []},
        {"format": 1, "epoch": 1, "vnodes_per_weight": 8, "members": [["a", "h:1", 1.0]]},
        {"format": 1, "epoch": 1, "vnodes_per_weight": 8, "members": [["a", "h:1", "x", None]]},
        {
            "format": 1,
            "epoch": 1,
            "vnodes_per_weight": 8,
            "members": [["a", "h", 1, None], ["a", "h", 1, None]],
        },
        {"format": 1, "epoch": 1, "vnodes_per_weight": 10**9, "members": [["a", "h:1", 1.0, None]]},
    ],
)
def test_garbage_ring_descriptions_raise_protocol_error(bad: object) -> None:
    with pytest.raises(ProtocolError):
        Ring.from_wire(bad)


def test_n_larger_than_the_ring_is_a_clear_error() -> None:
    ring = ring_of(["a", "b"])
    with pytest.raises(ConfigError, match=r"N=3 .* only 2 members"):
        ring.preference_list(b"k", 3)
    with pytest.raises(shmkv.InvalidArgument, match="N must be"):
        ring.preference_list(b"k", 0)


def test_epochs_only_grow() -> None:
    ring = ring_of(["a", "b", "c"], epoch=4)
    with pytest.raises(ConfigError, match="epoch > 4"):
        ring.with_members(ring.members.values(), 4)
    assert ring.with_members(ring.members.values(), 5).epoch == 5


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([], "at least one member"),
        ([Member("a", "h:1"), Member("a", "h:2")], "duplicate member name 'a'"),
        ([Member("a", "h:1", 10**6)], "vnodes"),
    ],
)
def test_bad_configurations_name_the_problem(members: list[Member], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Ring(members, 0)


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_bad_weights_name_the_member(weight: object) -> None:
    with pytest.raises(ConfigError, match="member 'x'"):
        Member("x", "h:1", weight)  # type: ignore[arg-type]


@FEW
@given(
    names=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=6, unique=True),
    vnodes=st.sampled_from([1, 3, 64, 2048]),
    tokens=st.lists(st.integers(0, TOKEN_SPACE - 1), max_size=50),
)
def test_the_bucketed_lookup_finds_the_vnode_a_plain_bisect_finds(
    names: list[str], vnodes: int, tokens: list[int]
) -> None:
    """Ring.vnode_index looks in one bucket of the token space: the same vnode as a bisect
    over every token, for keys and for tokens at and next to each bucket's and vnode's edge."""
    import bisect

    ring = Ring([Member(m, "h:1") for m in names], 0, vnodes_per_weight=vnodes)
    toks = ring._tokens
    shift = ring._bucket_shift
    edges = [b << shift for b in range(0, 1 << (64 - shift), max(1, (1 << (64 - shift)) // 64))]
    probes = tokens + edges + [t + d for t in toks[:64] + toks[-4:] for d in (-1, 0, 1)]
    for t in probes:
        if not 0 <= t < TOKEN_SPACE:
            continue
        b = t >> shift
        got = bisect.bisect_left(toks, t, ring._buckets[b], ring._buckets[b + 1]) % len(toks)
        assert got == bisect.bisect_left(toks, t) % len(toks), (t, b)
    for k in sample_keys(200):
        assert ring.vnode_index(k) == bisect.bisect_left(toks, key_token(k)) % len(toks)


def test_key_tokens_are_mmh3_x64_first_64_bits_unsigned() -> None:
    import mmh3

    for k in sample_keys(500) + [b"", b"\xff" * 40, "naïve".encode()]:
        assert key_token(k) == mmh3.hash64(k, seed=0, x64arch=True, signed=False)[0]
