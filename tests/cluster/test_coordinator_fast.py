"""The coordinator's Task-less paths (coordinator.py's _FanOut; the speed work of issue 10):
a request whose local copy decides it (N=1, W=1, R=1) is answered at once, with the same
answers and errors as the general path, and the rest of its fan-out (late answers, read
repair, hints) still happens -- in callbacks, after the answer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

import shmkv
from shmkv.cluster import coordinator, wire

from .test_coordinator import Cluster


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster(seed=3)
    yield c
    c.close()


def _outcome(c: Cluster, via: str, code: int, **fields: Any) -> tuple[str, Any]:
    """What a request answered: ("ok", the fields that do not name nodes) or (error type, message)."""
    try:
        reply = c.request(via, code, **fields)
    except shmkv.Error as e:
        return type(e).__name__, re.sub(r"store '[^']*'", "store S", str(e))
    return "ok", {k: v for k, v in reply.fields.items() if k != "context"}


def test_one_node_answers_as_three_nodes_with_every_replica_needed() -> None:
    """The inline path (N=1: nothing to send) against the general one (N=W=R=3: every answer
    waited for): the same answers, and the same refusals, for the same requests."""
    one = Cluster(seed=4, nodes=1, n=1, w=1, r=1)
    three = Cluster(seed=4, n=3, w=3, r=3)
    try:
        key = b"same"
        via1, via3 = one.names[0], three.coordinators(key)[0]
        script: list[tuple[int, dict[str, Any]]] = [
            (wire.GET, {"key": key}),
            (wire.PUT, {"key": key, "value": b"v1"}),
            (wire.GET, {"key": key}),
            (wire.GET_VERSIONS, {"key": key}),
            (wire.PUT, {"key": key, "value": b"v2", "ttl_ms": 60_000}),
            (wire.GET, {"key": key}),
            (wire.PUT, {"key": key, "value": b"x", "ttl_ms": 0}),  # bad TTL: refused
            (wire.PUT, {"key": key, "value": b"x" * 300_000}),  # beyond the item limit
            (wire.GET, {"key": b""}),  # empty key
            (wire.DELETE, {"key": key}),
            (wire.GET, {"key": key}),
            (wire.INCR, {"key": key, "delta": 5}),
            (wire.INCR, {"key": key, "delta": -2}),
            (wire.INCR, {"key": key, "delta": "x"}),  # not an int
            (wire.PUT_MANY, {"items": [[b"a", b"1"], [b"b", b"2"]]}),
            (wire.GET_MANY, {"keys": [b"a", b"b", b"c"]}),
        ]
        for code, fields in script:
            got1 = _outcome(one, via1, code, **fields)
            got3 = _outcome(three, via3, code, **fields)
            if code == wire.GET and "expires" in (got1[1] if got1[0] == "ok" else {}):
                got1[1].pop("expires"), got3[1].pop("expires")  # two clocks' readings
            if code == wire.GET_MANY:  # drop the contexts of the batch answer
                got1 = (got1[0], [r[0] for r in got1[1]["results"]])
                got3 = (got3[0], [r[0] for r in got3[1]["results"]])
            assert got1 == got3, (wire.NAMES[code], fields.get("key"))
        # a quorum beyond N is refused by name on both paths
        assert _outcome(one, via1, wire.PUT, key=key, value=b"v", w=2)[0] == "ConfigError"
        assert _outcome(three, via3, wire.PUT, key=key, value=b"v", w=4)[0] == "ConfigError"
    finally:
        one.close()
        three.close()


def test_w1_and_r1_answer_from_the_local_copy_and_the_rest_still_happens(cluster: Cluster) -> None:
    key = b"fast"
    c1, c2, c3 = cluster.coordinators(key)
    cluster.put(c1, key, b"old", w=3)
    # c2 alone gets a newer version (as a write whose other replica requests were lost)
    newer = cluster.nodes[c2].replica.coordinate(key, b"new", None)
    assert cluster.held(c1, key) == [b"old"]
    t0 = cluster.net.now
    assert cluster.get(c1, key, r=1) == [b"old"]  # the local copy: R=1 does not wait for c2
    answered_after = cluster.net.now - t0
    cluster.net.run_for(1.0)
    # read repair from the late answers: every copy holds the newer version now
    assert all(cluster.nodes[n].replica.get(key) == newer for n in (c1, c2, c3))
    # W=1 is answered without waiting either, and the replicas still get the write
    t0 = cluster.net.now
    cluster.put(c1, key, b"w1", w=1)
    assert cluster.net.now - t0 <= answered_after + 1e-9
    cluster.net.run_for(1.0)
    assert all(cluster.held(n, key) == [b"w1"] for n in (c1, c2, c3))


def test_w1_with_the_other_replicas_down_answers_and_leaves_the_errors_to_w2(cluster: Cluster) -> None:
    key = b"down"
    c1, c2, c3 = cluster.coordinators(key)
    cluster.net.crash(cluster.addr[c2])
    cluster.net.crash(cluster.addr[c3])
    cluster.put(c1, key, b"solo", w=1)  # the local ack is W=1: answered, no error
    cluster.net.run_for(1.0)  # the fan-out's failures come in after the answer: suspects
    assert {c2, c3} <= cluster.nodes[c1].suspects
    with pytest.raises(shmkv.QuorumError, match="not applied") as ei:
        cluster.put(c1, key, b"w2", w=2)  # now known down: refused before anything is written
    assert not isinstance(ei.value, shmkv.MaybeApplied)
    assert cluster.get(c1, key, r=1) == [b"solo"]


def test_a_bug_in_a_fan_out_callback_answers_the_request_instead_of_hanging(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = b"bug"
    c1, _, _ = cluster.coordinators(key)
    cluster.put(c1, key, b"v", w=3)
    real = coordinator.ReadTally.answer

    def broken(self: Any, node: str, value: Any) -> Any:
        if node != c1:
            raise RuntimeError("a bug in the tally")
        return real(self, node, value)

    monkeypatch.setattr(coordinator.ReadTally, "answer", broken)
    t0 = cluster.net.now
    with pytest.raises(shmkv.Error, match="a bug in the tally"):
        cluster.request(c1, wire.GET, key=key, r=2)
    assert cluster.net.now - t0 < 0.5  # at the first replica answer, not at any timeout


def test_drain_waits_for_the_rest_of_a_fan_out(cluster: Cluster) -> None:
    key = b"drain"
    c1, c2, c3 = cluster.coordinators(key)
    cluster.net.cut([cluster.addr[c1]], [cluster.addr[c3]])  # c3 never gets it: times out
    cluster.put(c1, key, b"v", w=2)
    node = cluster.nodes[c1]
    assert node._fanouts  # c3's request is still out after the answer
    assert cluster.net.run(node.drain(2.0)) is True
    assert not node._fanouts
    assert c3 in node.suspects  # its timeout was handled before drain returned
