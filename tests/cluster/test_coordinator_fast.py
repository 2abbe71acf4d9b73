"""The coordinator's Task-less paths (coordinator.py's _FanOut; the speed work of issue 10):
a request whose local copy decides it (N=1, W=1, R=1) is answered at once, with the same
answers and errors as the general path, and the rest of its fan-out (late answers, read
repair, hints) still happens -- in callbacks, after the answer."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest

import shmkv
from shmkv.cluster import coordinator, wire
from shmkv.cluster.wire import Message

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


# -- batched replica writes (coordinator._PutBatches, on in the daemon) ---------------------------


def _burst(c: Cluster, via: str, keys: list[bytes], **fields: Any) -> list[Any]:
    """PUTs of ``keys`` through ``via``, all arriving at once (one loop iteration): the
    outcomes, a Message or the exception."""

    async def go() -> list[Any]:
        return await asyncio.gather(*(
            c.client.request(c.addr[via], Message(wire.PUT, 0, {"key": k, "value": b"v" + k, "epoch": 1, **fields}), 2.0)
            for k in keys
        ), return_exceptions=True)

    return c.net.run(go())


def _batched(seed: int) -> tuple[Cluster, str, list[bytes]]:
    c = Cluster(seed=seed, delay=(0.001, 0.001))  # one latency: a burst arrives together
    for node in c.nodes.values():
        node.batch_puts = True
    via = c.names[0]
    keys = [k for k in (b"b%d" % i for i in range(400)) if c.coordinators(k)[0] == via][:12]
    return c, via, keys


def test_writes_coordinated_together_reach_each_replica_as_one_batch() -> None:
    c, via, keys = _batched(seed=6)
    try:
        got = _burst(c, via, keys)
        assert all(isinstance(r, Message) and r.code == wire.OK for r in got), got
        for name in c.names[1:]:
            seen = c.nodes[name].stats.requests
            assert seen.get("REPLICA_PUT_MANY", 0) >= 1
            assert seen.get("REPLICA_PUT", 0) + seen["REPLICA_PUT_MANY"] < len(keys)  # batched
        c.net.run_for(0.1)  # W=2: the third copy may still be on its way after the answers
        for k in keys:
            for name in c.names:
                assert c.held(name, k) == [b"v" + k], (name, k)
    finally:
        c.close()


def test_a_batch_to_an_unreachable_replica_fails_each_write_as_a_single_request_would() -> None:
    c, via, keys = _batched(seed=7)
    try:
        a, b = c.names[1:]
        c.net.cut([c.addr[via]], [c.addr[a], c.addr[b]])  # both replicas unreachable: W=2 missed
        got = _burst(c, via, keys)
        # sent, never answered: every write "may have been applied" (it was, locally)
        assert all(isinstance(r, shmkv.MaybeApplied) for r in got), got
        assert all(c.held(via, k) == [b"v" + k] for k in keys)
    finally:
        c.close()
