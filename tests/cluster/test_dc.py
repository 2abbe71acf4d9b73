"""Data centres: the replication map's placement (properties), consistency levels, per-DC tallies,
and a partition between two DCs over the simulated network (seeded), then the heal."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.errors import ConfigError
from shmkv.cluster.levels import check_level, need
from shmkv.cluster.placement import apl
from shmkv.cluster.quorum import FAILED, OK, WriteTally
from shmkv.cluster.ring import Member, Ring, parse_n_per_dc

from .failsim import FailCluster

VNODES = 16  # small rings keep the property tests fast; placement does not depend on the count


@st.composite
def dc_rings(draw: Any) -> tuple[Ring, dict[str, int]]:
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    members = [
        Member(f"m{d}.{i}", f"h{d}.{i}:1", dc=f"dc{d}") for d, size in enumerate(sizes) for i in range(size)
    ]
    # some DCs may be left out of the map: their members hold no replicas
    chosen = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    if not any(chosen):
        chosen[0] = True
    rmap = {f"dc{d}": draw(st.integers(1, size)) for d, size in enumerate(sizes) if chosen[d]}
    return Ring(members, 1, VNODES).with_replication(rmap), rmap


@settings(max_examples=60, deadline=None)
@given(dc_rings(), st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=20))
def test_each_dc_gets_its_count_and_no_node_twice(ring_map: tuple[Ring, dict[str, int]], keys: list[bytes]) -> None:
    ring, rmap = ring_map
    n = sum(rmap.values())
    lists = ring.vnode_preference_lists(n)
    for key in keys:
        prefs = ring.preference_list(key, n)
        assert len(prefs) == len(set(prefs)) == n
        per_dc: dict[str | None, int] = {}
        for p in prefs:
            per_dc[ring.dc_of(p)] = per_dc.get(ring.dc_of(p), 0) + 1
        assert per_dc == rmap
        # ring order within each DC: the DC's members in the order the plain walk meets them
        walk = list(ring.successors(key))
        for dc, count in rmap.items():
            assert [p for p in prefs if ring.dc_of(p) == dc] == [p for p in walk if ring.dc_of(p) == dc][:count]
        assert list(lists[ring.vnode_index(key)]) == prefs  # the client's per-vnode lists agree
        # every member up: the APL is the preference list
        assert [t.node for t in apl(key, n, ring, set(ring.members))] == prefs


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=20), st.data())
def test_without_a_map_the_list_is_todays(size: int, keys: list[bytes], data: Any) -> None:
    members = [Member(f"m{i}", f"h{i}:1", dc=data.draw(st.sampled_from([None, "a", "b"]))) for i in range(size)]
    ring = Ring(members, 1, VNODES)
    n = data.draw(st.integers(1, size))
    for key in keys:
        assert ring.preference_list(key, n) == list(itertools.islice(ring.successors(key), n))
    assert ring.with_replication(None).vnode_preference_lists(n) == ring.vnode_preference_lists(n)


def test_a_fallback_stands_in_for_a_down_primary_under_a_map() -> None:
    members = [Member(f"m{i}", f"h{i}:1", dc="a" if i < 3 else "b") for i in range(5)]
    ring = Ring(members, 1, VNODES).with_replication({"a": 2, "b": 1})
    prefs = ring.preference_list(b"k", 3)
    down = prefs[0]
    targets = apl(b"k", 3, ring, set(ring.members) - {down})
    assert [t.node for t in targets if t.is_primary] == prefs[1:]
    (fb,) = [t for t in targets if not t.is_primary]
    assert fb.hint_for == down and fb.node not in prefs


def test_bad_maps_and_levels_are_clear_errors() -> None:
    ring = Ring([Member("a", "a:1", dc="x"), Member("b", "b:1", dc="x"), Member("c", "c:1", dc="y")], 1, VNODES)
    with pytest.raises(ConfigError, match="'z', which has no nodes"):
        ring.with_replication({"x": 1, "z": 1})
    with pytest.raises(ConfigError, match="3 replicas in data centre 'x', which has only 2 nodes"):
        ring.with_replication({"x": 3})
    with pytest.raises(ConfigError, match="N must be its sum"):
        ring.with_replication({"x": 2, "y": 1}).preference_list(b"k", 2)
    for bad in ("x", "x:0", "x:2,x:1", ":2", "x:two"):
        with pytest.raises(ConfigError):
            parse_n_per_dc(bad)
    assert parse_n_per_dc("dc1:2, dc2:1") == {"dc1": 2, "dc2": 1}
    with pytest.raises(shmkv.Error, match="not a consistency level.*local_quorum"):
        check_level("local_qourum")
    for bad in (0, True, 1.5, None):
        with pytest.raises(ConfigError):
            check_level(bad)


def test_bad_flags_refuse_the_start() -> None:
    from shmkv.cluster.coordinator import Config
    from shmkv.cluster.daemon import Options, check_options
    from shmkv.cluster.membership import ring_from_statuses

    seeds = [f"127.0.0.1:{p}" for p in (1, 2, 3)]
    with pytest.raises(ConfigError, match="not a consistency level"):
        check_options(Options(listen=seeds[0], seeds=seeds, w="sometimes"))
    with pytest.raises(ConfigError, match="sum of --n-per-dc"):
        check_options(Options(listen=seeds[0], seeds=seeds, n=3, dc="a", n_per_dc={"a": 1}))
    with pytest.raises(ConfigError, match="needs --dc"):
        check_options(Options(listen=seeds[0], seeds=seeds, n=2, n_per_dc={"a": 2}))
    check_options(Options(listen=seeds[0], seeds=seeds, n=2, w="local_quorum", dc="a", n_per_dc={"a": 2}))
    # at the join: the seeds' DCs build the ring, and the map is checked against it
    per = {"a": 1, "b": 1}
    mine = Config("x1", seeds[0], n=2, dc="a", n_per_dc=per)
    statuses = {s: {"name": f"x{i + 1}", "n": 2, "weight": 1.0, "dc": "a", "n_per_dc": per}
                for i, s in enumerate(seeds)}
    with pytest.raises(ConfigError, match="'b', which has no nodes"):
        ring_from_statuses(mine, seeds, statuses)
    statuses[seeds[2]]["dc"] = "b"
    ring = ring_from_statuses(mine, seeds, statuses)
    assert ring.dc_of("x3") == "b"
    statuses[seeds[1]]["n_per_dc"] = {"a": 2}
    with pytest.raises(ConfigError, match="config conflict.*--n-per-dc a:2"):
        ring_from_statuses(mine, seeds, statuses)


def test_levels_resolve_per_dc() -> None:
    dc = {"a1": "a", "a2": "a", "a3": "a", "b1": "b", "b2": "b"}.get
    prefs = ["a1", "b1", "a2", "b2", "a3"]
    assert need("one", prefs, dc, "a").total == 1
    assert need("quorum", prefs, dc, "a").total == 3
    assert need("all", prefs, dc, "a").total == 5
    assert need(2, prefs, dc, "a").total == 2
    lq = need("local_quorum", prefs, dc, "b")
    assert (lq.total, dict(lq.per_dc)) == (2, {"b": 2})
    eq = need("each_quorum", prefs, dc, "a")
    assert (eq.total, dict(eq.per_dc)) == (4, {"a": 2, "b": 2})
    # no DCs: one implicit DC, both levels are quorum
    none = need("each_quorum", prefs, lambda _n: None, None)
    assert (none.total, dict(none.per_dc)) == (3, {None: 3})


def test_a_tally_fails_at_once_when_a_dc_is_short_and_names_it() -> None:
    dc = {"a1": "a", "a2": "a", "b1": "b", "b2": "b"}.get
    nd = need("each_quorum", ["a1", "a2", "b1", "b2"], dc, "a")
    t = WriteTally(4, nd.total, ["a1", "a2"], nd.per_dc, dc)  # dc b is cut off: no target there
    assert t.state == FAILED
    assert "DC b: 0 replied of 0 reachable, 2 needed" in t.dc_shortfall()
    t = WriteTally(4, nd.total, ["a1", "a2", "b1", "b2"], nd.per_dc, dc)
    for x in ("a1", "a2", "b1"):
        t.ack(x)
    assert t.state == "pending"  # 3 acks, but dc b has only one of its two
    t.fail("b2", "refused")
    assert t.state == FAILED and "DC b: 1 replied" in str(t.error())
    lq = need("local_quorum", ["a1", "a2", "b1", "b2"], dc, "a")
    t = WriteTally(4, lq.total, ["a1", "a2", "b1", "b2"], lq.per_dc, dc)
    t.ack("b1")
    t.ack("b2")
    assert t.state == "pending"  # two acks, none local
    t.ack("a1")
    t.ack("a2")
    assert t.state == OK


# -- two DCs of two nodes, over the simulated network ---------------------------------------------


@pytest.fixture
def two_dcs() -> Iterator[FailCluster]:
    c = FailCluster(seed=7, nodes=4, n=4, w="local_quorum", r="local_quorum",
                    dcs=["dc1", "dc1", "dc2", "dc2"], n_per_dc={"dc1": 2, "dc2": 2})
    try:
        c.net.run_for(3.0)
        yield c
    finally:
        c.close()


def cut_dcs(c: FailCluster) -> None:
    c.net.partition([c.addr["n1"], c.addr["n2"]], [c.addr["n3"], c.addr["n4"]])
    assert c.until(lambda: c.down_views() == {"n1": {"n3", "n4"}, "n2": {"n3", "n4"},
                                              "n3": {"n1", "n2"}, "n4": {"n1", "n2"}}, limit=15.0) is not None


def test_the_map_places_two_replicas_in_each_dc(two_dcs: FailCluster) -> None:
    c = two_dcs
    for i in range(50):
        prefs = c.nodes["n1"].ring.preference_list(b"k%d" % i, 4)  # type: ignore[union-attr]
        assert sorted(c.dc[p] for p in prefs) == ["dc1", "dc1", "dc2", "dc2"]


def test_a_dc_partition_keeps_local_quorum_and_fails_each_quorum_fast_then_converges(two_dcs: FailCluster) -> None:
    c = two_dcs
    c.request("n1", wire.PUT, key=b"before", value=b"v0", w="each_quorum")
    cut_dcs(c)
    # local_quorum in each DC: the local pair acknowledges, the other DC is hinted
    c.request("n1", wire.PUT, key=b"k1", value=b"from-dc1", w="local_quorum")
    c.request("n3", wire.PUT, key=b"k3", value=b"from-dc2", w="local_quorum")
    assert c.request("n2", wire.GET, key=b"k1", r="local_quorum").fields["value"] == b"from-dc1"
    assert c.request("n4", wire.GET, key=b"k3", r="local_quorum").fields["value"] == b"from-dc2"
    assert c.request("n4", wire.GET, key=b"before", r="local_quorum").fields["value"] == b"v0"
    # each_quorum: refused at once (gossip holds the other DC down), naming it -- not after a timeout
    for via, other in (("n1", "dc2"), ("n3", "dc1")):
        t0 = c.net.now
        with pytest.raises(shmkv.QuorumError, match=f"not applied.*DC {other}: 0 replied") as e:
            c.request(via, wire.PUT, key=b"k-each", value=b"x", w="each_quorum")
        assert type(e.value) is shmkv.QuorumError  # nothing written anywhere: not MaybeApplied
        with pytest.raises(shmkv.QuorumError, match=f"DC {other}"):
            c.request(via, wire.GET, key=b"k1", r="each_quorum")
        assert c.net.now - t0 < 0.5  # virtual time: less than one replica timeout
    assert all(c.held(x, b"k-each") == [] for x in c.names)
    # batches and counters take levels too
    c.request("n2", wire.PUT_MANY, items=[[b"b1", b"x"], [b"b2", b"y"]], w="local_quorum")
    got = c.request("n1", wire.GET_MANY, keys=[b"b1", b"b2"], r="local_quorum").fields["results"]
    assert [vals for vals, _ctx in got] == [[b"x"], [b"y"]]
    with pytest.raises(shmkv.QuorumError, match="DC dc2"):
        c.request("n1", wire.GET_MANY, keys=[b"b1"], r="each_quorum")
    assert c.request("n1", wire.INCR, key=b"ctr", delta=2, w="local_quorum").fields["value"] == 2
    with pytest.raises(shmkv.QuorumError, match="DC dc2"):
        c.request("n1", wire.INCR, key=b"ctr", delta=1, w="each_quorum")
    # quorum (3 of 4) cannot be met either side; local_quorum can
    with pytest.raises(shmkv.QuorumError):
        c.request("n1", wire.PUT, key=b"k-q", value=b"x", w="quorum")
    c.net.heal()
    # after the heal the hints reach the other DC: every replica holds both DCs' writes
    assert c.until(lambda: all(c.held(x, b"k1") == [b"from-dc1"] and c.held(x, b"k3") == [b"from-dc2"]
                               for x in c.names), limit=20.0) is not None
    assert c.until(lambda: not any(c.down_views().values()), limit=15.0) is not None
    c.request("n1", wire.PUT, key=b"k-each", value=b"now", w="each_quorum")
    assert c.request("n4", wire.GET, key=b"k-each", r="each_quorum").fields["value"] == b"now"


def test_read_repair_converges_a_dc_that_missed_writes(two_dcs: FailCluster) -> None:
    c = two_dcs
    cut_dcs(c)
    c.request("n1", wire.PUT, key=b"rr", value=b"dc1-only", w="local_quorum")
    for x in c.names:  # the hints are dropped: only read repair can converge dc2
        for owner in ("n3", "n4"):
            c.nodes[x].handoff.hints.drop_owner(owner)
    assert c.held("n3", b"rr") == c.held("n4", b"rr") == []
    c.net.heal()
    assert c.until(lambda: not any(c.down_views().values()), limit=15.0) is not None
    assert c.request("n3", wire.GET, key=b"rr", r="all").fields["value"] == b"dc1-only"
    assert c.until(lambda: all(c.held(x, b"rr") == [b"dc1-only"] for x in c.names), limit=5.0) is not None


def test_without_dcs_the_levels_are_the_plain_ones() -> None:
    c = FailCluster(seed=3, nodes=3, n=3, w=2, r=2)
    try:
        c.net.run_for(3.0)
        c.request("n1", wire.PUT, key=b"a", value=b"1", w="local_quorum")
        assert c.request("n2", wire.GET, key=b"a", r="each_quorum").fields["value"] == b"1"
        c.request("n1", wire.PUT, key=b"b", value=b"1", w="all")
        assert c.request("n3", wire.GET, key=b"b", r="one").fields["value"] == b"1"
        with pytest.raises(shmkv.Error, match="not a consistency level"):
            c.request("n1", wire.PUT, key=b"c", value=b"1", w="most")
    finally:
        c.close()
