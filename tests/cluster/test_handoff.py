"""Sloppy quorum and hinted handoff as specs, over the simulated network (failsim.py), seeded.

A primary is taken down (SIGKILL-like crash), gossip notices, writes go on: to a fallback with a
hint (it counts toward W unless strict) or, when every node is already a primary, to the
coordinator's own hint store (it counts for nothing). When the owner is back the hints are handed
to it, and deleted only once it acknowledged them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.handoff import Handoff, node_counts
from shmkv.cluster.hints import HintStore
from shmkv.cluster.versions import VersionSet
from shmkv.cluster.wire import BadRequest, Overloaded

from .failsim import FailCluster


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[FailCluster] = []

    def mk(*a: Any, **kw: Any) -> FailCluster:
        made.append(FailCluster(*a, **kw))
        return made[-1]

    yield mk
    for c in made:
        c.close()


def keys_with(c: FailCluster, first: str, holds: str, count: int, n: int = 3) -> list[bytes]:
    """Keys coordinated by ``first`` (their first primary) whose preference list holds ``holds``,
    all with the same preference list (so the same fallback)."""
    out: list[bytes] = []
    for i in range(10_000):
        k = b"key%d" % i
        p = c.ring.preference_list(k, n)
        if p[0] == first and holds in p and (not out or set(p) == set(c.ring.preference_list(out[0], n))):
            out.append(k)
            if len(out) == count:
                return out
    raise AssertionError("not enough keys")


def down_everywhere(c: FailCluster, victim: str) -> None:
    assert c.until(lambda: all(victim in d for d in c.down_views().values()), limit=10.0) is not None


def test_a_write_with_an_owner_down_lands_on_a_fallback_with_a_hint_and_counts_toward_w(make: Any) -> None:
    c = make(seed=1, nodes=4, n=3, w=3)
    c.net.run_for(3.0)
    keys = keys_with(c, "n1", "n3", 5)
    c.crash("n3")
    down_everywhere(c, "n3")
    for k in keys:
        c.request("n1", wire.PUT, key=k, value=b"sloppy:" + k, w=3)  # W=3 of N=3 with a primary down
    c.net.run_for(0.5)
    fallback = next(x for x in c.names if x not in c.ring.preference_list(keys[0], 3))
    assert c.hints(fallback) == {"n3": 5}
    assert all(c.nodes[fallback].handoff.hints.get("n3", k).values == [b"sloppy:" + k] for k in keys)
    # strict: the fallback does not count, so W=3 cannot be met -- refused before writing
    with pytest.raises(shmkv.QuorumError, match="not applied"):
        c.request("n1", wire.PUT, key=keys[0], value=b"strict", w=3, strict=1)
    c.request("n1", wire.PUT, key=keys[0], value=b"strict-w2", w=2, strict=1)  # W=2: the primaries do
    # the owner comes back: the hints reach it and are deleted once it acknowledged them
    c.start("n3")
    assert c.until(lambda: all(not c.hints(x) for x in c.names), limit=10.0) is not None
    assert all(c.held("n3", k) == [b"sloppy:" + k] for k in keys[1:])
    assert c.held("n3", keys[0]) == [b"strict-w2"]  # the newer write superseded the hinted one
    assert c.nodes[fallback].handoff.hints.stats.delivered == 5


def test_a_cluster_wide_strict_mode_and_a_sloppy_request_in_it(make: Any) -> None:
    c = make(seed=2, nodes=4, n=3, w=3, strict=True)
    c.net.run_for(3.0)
    (k,) = keys_with(c, "n1", "n2", 1)
    c.crash("n2")
    down_everywhere(c, "n2")
    with pytest.raises(shmkv.QuorumError, match="not applied"):
        c.request("n1", wire.PUT, key=k, value=b"x", w=3)
    c.request("n1", wire.PUT, key=k, value=b"x", w=3, strict=0)  # sloppy for this request


def test_every_node_a_primary_the_coordinator_keeps_the_hints_and_hands_them_back(make: Any) -> None:
    c = make(seed=3, nodes=3, n=3, w=2)
    c.net.run_for(3.0)
    c.crash("n2")
    down_everywhere(c, "n2")
    acked = {}
    for i in range(40):
        k = b"k%d" % i
        via = next(x for x in c.ring.preference_list(k, 3) if x != "n2")
        c.request(via, wire.PUT, key=k, value=b"v%d" % i)
        acked[k] = b"v%d" % i
    assert sum(c.hints(x).get("n2", 0) for x in ("n1", "n3")) == 40
    c.request("n1", wire.DELETE, key=b"k0")  # a delete travels as a hinted tombstone too
    c.start("n2")
    assert c.until(lambda: not c.hints("n1") and not c.hints("n3"), limit=10.0) is not None
    assert c.held("n2", b"k0") == [None]
    assert all(c.held("n2", k) == [v] for k, v in acked.items() if k != b"k0")


def test_a_hint_is_deleted_only_after_the_owner_acknowledged_it(make: Any) -> None:
    c = make(seed=4, nodes=4, n=3, w=3)
    c.net.run_for(3.0)
    keys = keys_with(c, "n1", "n4", 3)
    fallback = next(x for x in c.names if x not in c.ring.preference_list(keys[0], 3))
    c.crash("n4")
    down_everywhere(c, "n4")
    for k in keys:
        c.request("n1", wire.PUT, key=k, value=b"v")
    c.start("n4")
    c.net.cut([c.addr["n4"]], [c.addr[fallback]])  # the owner applies, its acks are lost
    c.net.run_for(8.0)
    assert all(c.held("n4", k) == [b"v"] for k in keys)  # delivered...
    assert c.hints(fallback) == {"n4": 3}  # ...but never acknowledged: kept
    c.net.heal()
    assert c.until(lambda: not c.hints(fallback), limit=5.0) is not None


def test_a_full_hint_store_refuses_counts_and_the_write_misses_w(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    c = make(seed=5, nodes=4, n=3, w=3, max_hints=2)
    c.net.run_for(3.0)
    keys = keys_with(c, "n1", "n2", 3)
    fallback = next(x for x in c.names if x not in c.ring.preference_list(keys[0], 3))
    c.crash("n2")
    down_everywhere(c, "n2")
    with caplog.at_level(logging.WARNING, logger="shmkv.cluster.handoff"):
        c.request("n1", wire.PUT, key=keys[0], value=b"1")
        c.request("n1", wire.PUT, key=keys[1], value=b"2")
        with pytest.raises(shmkv.MaybeApplied):  # n1 applied it; the fallback refused the hint
            c.request("n1", wire.PUT, key=keys[2], value=b"3")
    assert "hint store full" in caplog.text
    assert c.nodes[fallback].handoff.counts()["refused"] == 1
    from shmkv.cluster.metrics import Metrics

    text = Metrics(c.nodes[fallback], c.stores[fallback]).exposition().decode()
    assert "shmkv_hints_refused_total 1.0" in text and "shmkv_hints_pending 2.0" in text
    assert 'shmkv_peers{state="down"} 1.0' in text


def test_hints_survive_the_holders_restart(make: Any, tmp_path: Path) -> None:
    dirs = {f"n{i}": str(tmp_path / f"n{i}") for i in range(1, 4)}
    c = make(seed=6, nodes=3, n=3, w=2, hint_dirs=dirs)
    c.net.run_for(3.0)
    (k,) = keys_with(c, "n1", "n3", 1)
    c.crash("n3")
    down_everywhere(c, "n3")
    c.request("n1", wire.PUT, key=k, value=b"kept")
    assert c.hints("n1") == {"n3": 1}
    c.crash("n1")  # the holder dies too, and comes back from its hint file
    c.start("n1")
    assert c.hints("n1") == {"n3": 1}
    c.start("n3")
    assert c.until(lambda: not c.hints("n1"), limit=10.0) is not None
    assert c.held("n3", k) == [b"kept"]


def test_same_seed_same_handoff_run(make: Any) -> None:
    traces = []
    for _ in range(2):
        c = make(seed=8, nodes=4, n=3, w=3, drop=0.01)
        c.net.run_for(3.0)
        c.crash("n4")
        down_everywhere(c, "n4")
        for i in range(10):
            via = next(x for x in c.ring.preference_list(b"s%d" % i, 3) if x != "n4")
            c.request(via, wire.PUT, key=b"s%d" % i, value=b"x")
        c.start("n4")
        c.until(lambda c=c: all(not c.hints(x) for x in c.names), limit=10.0)
        traces.append(list(c.net.trace))
    assert traces[0] == traces[1]


# -- bad input ------------------------------------------------------------------------------


def test_bad_hints_are_refused_with_a_log_line(make: Any, caplog: pytest.LogCaptureFixture) -> None:
    c = make(seed=9, nodes=4, n=3, w=2)
    (k,) = keys_with(c, "n1", "n2", 1)
    prefs = c.ring.preference_list(k, 3)
    fallback = next(x for x in c.names if x not in prefs)
    vs = VersionSet().to_wire()
    h = c.nodes[fallback].handoff
    with caplog.at_level(logging.WARNING, logger="shmkv.cluster.handoff"):
        for owner, to, why in (("ghost", fallback, "not a member"), (fallback, fallback, "itself"),
                               (fallback, "n1", "holds no copy"), ("n2", "n1", "a primary")):
            with pytest.raises(BadRequest, match=why):
                c.request(to, wire.HINT_PUT, key=k, versions=vs, owner=owner)
    assert caplog.text.count("refused HINT_PUT") == 4
    assert len(h.hints) == 0


def test_hints_for_a_node_no_longer_in_the_ring_are_named_at_start_and_kept(
    make: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = make(seed=10, nodes=3)
    with HintStore(str(tmp_path)) as hs:
        hs.add("gone", b"k", VersionSet())
        hs.add("n2", b"k", VersionSet())
    hs = HintStore(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="shmkv.cluster.handoff"):
        h = Handoff("n1", hs, c.nodes["n1"].transport, lambda: c.ring, lambda _: False, n=3)
    assert "1 hints for gone, no longer a member of the ring" in caplog.text
    assert h.hints.owners() == {"gone": 1, "n2": 1} and h.counts()["dropped"] == 0  # re-targeted, not dropped
    hs.close()


def _new_ring(c: FailCluster, ring: Any) -> None:
    for x in c.live():
        c.nodes[x].ring = ring
    c.ring = ring


def test_hints_of_a_removed_owner_go_to_the_keys_current_primaries(make: Any) -> None:
    # n4 down, writes hinted for it at the fallback; then n4 is removed from the ring: its
    # hints, the fallback's copies of acknowledged writes, go to each key's current primaries
    # (the fallback itself among them now) and are deleted once they all answered OK
    c = make(seed=12, nodes=4, n=3, w=3)
    c.net.run_for(3.0)
    keys = keys_with(c, "n1", "n4", 6)
    fallback = next(x for x in c.names if x not in c.ring.preference_list(keys[0], 3))
    c.crash("n4")
    down_everywhere(c, "n4")
    for k in keys:
        c.request("n1", wire.PUT, key=k, value=b"hinted:" + k, w=3)
    assert c.hints(fallback) == {"n4": 6}
    smaller = c.ring.with_members([m for m in c.ring.members.values() if m.name != "n4"], c.ring.epoch + 1)
    _new_ring(c, smaller)
    assert c.until(lambda: not c.hints(fallback), limit=10.0) is not None
    for k in keys:
        for p in smaller.preference_list(k, 3):
            assert b"hinted:" + k in c.held(p, k), (k, p)
    h = c.nodes[fallback].handoff
    assert h.retargeted == 6 and h.hints.stats.dropped == 0 and h.counts()["retargeted"] == 6


def test_a_hint_whose_owner_lost_the_key_to_a_reweight_is_retargeted_not_stuck(make: Any) -> None:
    # the owner is still a member and up, but no longer a primary of the key: it would refuse
    # the hint for ever; it goes to the key's current primaries instead
    c = make(seed=13, nodes=5, n=3, w=3)
    c.net.run_for(3.0)
    keys = keys_with(c, "n1", "n3", 40)
    c.crash("n3")
    down_everywhere(c, "n3")
    for k in keys:
        c.request("n1", wire.PUT, key=k, value=b"v:" + k, w=3)
    assert sum(c.hints(x).get("n3", 0) for x in c.live()) == 40
    lighter = c.ring.with_members([dataclasses.replace(m, weight=0.25) if m.name == "n3" else m
                                   for m in c.ring.members.values()], c.ring.epoch + 1)
    lost = [k for k in keys if "n3" not in lighter.preference_list(k, 3)]
    kept = [k for k in keys if k not in lost]
    assert lost and kept, "seed layout"
    c.start("n3")
    _new_ring(c, lighter)
    assert c.until(lambda: not any(c.hints(x) for x in c.names), limit=15.0) is not None
    for k in lost:
        assert all(b"v:" + k in c.held(p, k) for p in lighter.preference_list(k, 3)), k
    assert all(c.held("n3", k) == [b"v:" + k] for k in kept)  # still its: handed to it as before
    assert sum(c.nodes[x].handoff.retargeted for x in c.names) == len(lost)


def test_a_fallback_refusing_for_overload_is_not_an_ack(make: Any) -> None:
    c = make(seed=11, nodes=4, n=3, w=2, max_hints=1)
    (k1, k2) = keys_with(c, "n1", "n2", 2)
    fallback = next(x for x in c.names if x not in c.ring.preference_list(k1, 3))
    h = c.nodes[fallback].handoff
    h.accept({"owner": "n2", "key": k1, "versions": VersionSet().to_wire()})
    if fallback in c.ring.preference_list(k2, 3):
        pytest.skip("seed layout")
    with pytest.raises(Overloaded):
        h.accept({"owner": "n2", "key": k2, "versions": VersionSet().to_wire()})


def test_node_counts_sum_the_workers() -> None:
    parts = [{"pending": 2, "by_owner": {"a": 2}, "bytes": 10, "refused": 1},
             {"pending": 1, "by_owner": {"a": 1}, "bytes": 5}, "junk"]
    got = node_counts(parts)  # type: ignore[arg-type]
    assert got["pending"] == 3 and got["by_owner"] == {"a": 3} and got["refused"] == 1


def test_ack_many_deletes_the_covered_hints_with_one_sync_and_the_file_agrees(tmp_path: Path) -> None:
    def vs(tag: bytes) -> VersionSet:
        return VersionSet().put(tag, None, "a")

    with HintStore(str(tmp_path)) as hs:
        for k in (b"a", b"b", b"c"):
            hs.add("o", k, vs(k))
        sent = hs.pending("o")
        hs.add("o", b"c", VersionSet().put(b"newer", None, "z"))  # grew in flight
        assert hs.ack_many("o", sent) == 2
        assert hs.owners() == {"o": 1}
    with HintStore(str(tmp_path)) as again:
        assert again.owners() == {"o": 1} and again.get("o", b"c") is not None
