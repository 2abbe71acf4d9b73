"""The coordinator's Task-less paths (coordinator.py's _FanOut; the speed work of issue 10):
a request whose local copy decides it (N=1, W=1, R=1) is answered at once, with the same
answers and errors as the general path, and the rest of its fan-out (late answers, read
repair, hints) still happens -- in callbacks, after the answer."""

from __future__ import annotations

import asyncio
import dataclasses
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


# -- batched replica writes (coordinator._Batches, on in the daemon) ---------------------------


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
        node.batch_replica_requests = True
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


# -- the RESP front's SET without a coroutine (Node.put_now) ---------------------------------------


def _put_now(c: Cluster, via: str, key: bytes, value: bytes | None, ttl_ms: int | None = None) -> tuple[str, Any]:
    """put_now's outcome (``value`` None: get_now's), in _outcome's terms (no context: RESP
    reads none; a GET's answer without it)."""
    node = c.nodes[via]

    async def go() -> Any:
        op = node.get_now(key) if value is None else node.put_now(key, value, ttl_ms)
        assert op is not None, "coordinated here: put_now / get_now takes it"
        if op.waiter is not None:
            await op.waiter
        return op.result()

    try:
        got = c.net.run(go())
        if value is None:
            answer = node.get_answer(key, got)
            return "ok", {k: v for k, v in answer.items() if k != "context"}
    except shmkv.Error as e:
        return type(e).__name__, re.sub(r"store '[^']*'", "store S", str(e))
    return "ok", {}


def test_get_now_and_put_now_answer_and_refuse_as_the_requests_do() -> None:
    """Twin clusters, one script: get_now / put_now on one, the GET / PUT request on the
    other -- the same outcomes (values, none, a bad TTL, an oversized value, siblings: a
    conflict, replicas cut: may have been applied, replicas known down: refused), the same
    copies, the same counters."""
    a, b = Cluster(seed=8), Cluster(seed=8)
    try:
        key = next(k for k in (b"p%d" % i for i in range(100)) if a.coordinators(k)[0] == a.names[0])
        via = a.names[0]
        others = [n for n in a.names if n != via]
        script: list[tuple[bytes, int | None]] = [(b"v1", None), (b"v2", 60_000), (b"x", 0), (b"x" * 300_000, None)]
        for value, ttl in script:
            got_a, got_b = _put_now(a, via, key, None), _outcome(b, via, wire.GET, key=key, epoch=None)
            got_a[1].pop("expires", None), got_b[1].pop("expires", None)  # two clocks' readings
            assert got_a == got_b, ("GET before", value[:8], ttl)
            got_a = _put_now(a, via, key, value, ttl)
            fields: dict[str, Any] = {"key": key, "value": value, "ack": 1, "epoch": None}
            if ttl is not None:
                fields["ttl_ms"] = ttl
            got_b = _outcome(b, via, wire.PUT, **fields)
            assert got_a == got_b, (value[:8], ttl)
        for c in (a, b):  # siblings: a write each side of a partition, then healed
            c.net.cut([c.addr[via]], [c.addr[o] for o in others])
            c.nodes[via].replica.coordinate(key, b"left", None)
            c.request(others[0], wire.PUT, key=key, value=b"right", w=2)
            c.net.heal()
        got_a, got_b = _put_now(a, via, key, None), _outcome(b, via, wire.GET, key=key, epoch=None)
        assert got_a == got_b and got_a[0] == "Conflict", (got_a, got_b)
        for c in (a, b):
            c.net.cut([c.addr[via]], [c.addr[o] for o in others])
        assert _put_now(a, via, key, b"v3")[0] == "MaybeApplied"
        assert _outcome(b, via, wire.PUT, key=key, value=b"v3", epoch=None)[0] == "MaybeApplied"
        for c in (a, b):  # now known down: refused before anything is written
            c.nodes[via].suspects.update(others)
        got_a, got_b = _put_now(a, via, key, b"v4"), _outcome(b, via, wire.PUT, key=key, value=b"v4", epoch=None)
        assert got_a == got_b and got_a[0] == "QuorumError", (got_a, got_b)
        got_a, got_b = _put_now(a, via, key, None), _outcome(b, via, wire.GET, key=key, epoch=None)
        assert got_a == got_b and got_a[0] == "QuorumError", (got_a, got_b)
        assert a.held(via, key) == b.held(via, key) == [b"v3"]
        sa, sb = a.nodes[via].stats, b.nodes[via].stats
        assert (sa.requests["PUT"], sa.requests["GET"], sa.quorum_failures, sa.maybe_applied) == (
            sb.requests["PUT"], sb.requests["GET"], sb.quorum_failures, sb.maybe_applied) == (6, 6, 3, 1)
        assert a.nodes[via].in_flight == 0
    finally:
        a.close()
        b.close()


def test_put_now_leaves_what_it_cannot_do_alone_to_handle() -> None:
    c = Cluster(seed=9, nodes=4)  # N=3 of 4: some node holds no copy of the key
    key = b"elsewhere"
    far = c.nodes[next(n for n in c.names if n not in c.coordinators(key))]
    node = c.nodes[c.coordinators(key)[0]]

    async def go() -> list[Any]:
        out = [far.put_now(key, b"v", None)]  # not a replica of the key: handle forwards it
        out.append(node.put_now(b"", b"v", None))  # handle's BadRequest names the empty key
        node.draining = True
        out.append(node.put_now(key, b"v", None))  # handle answers "draining"
        node.draining = False
        ring, node.ring = node.ring, None
        out.append(node.put_now(key, b"v", None))  # handle answers "starting"
        node.ring = ring
        node.config = dataclasses.replace(node.config, strict=True)
        out.append(node.get_now(key))  # a strict read's write-back is read()'s
        return out

    try:
        assert c.net.run(go()) == [None, None, None, None, None]
        assert node.in_flight == far.in_flight == 0
        assert "PUT" not in node.stats.requests  # handle counts what it then takes
    finally:
        c.close()


def test_put_now_is_in_flight_until_decided_and_drain_waits_for_it(cluster: Cluster) -> None:
    key = b"drain-now"
    c1, c2, c3 = cluster.coordinators(key)
    cluster.net.cut([cluster.addr[c1]], [cluster.addr[c2], cluster.addr[c3]])  # no ack: times out
    node = cluster.nodes[c1]

    async def go() -> tuple[int, bool, Any]:
        op = node.put_now(key, b"v", None)
        assert op is not None and op.waiter is not None
        during = node.in_flight
        drained = await node.drain(2.0)  # returns once the write is decided (its timeout)
        return during, drained, op

    during, drained, op = cluster.net.run(go())
    assert (during, drained, node.in_flight) == (1, True, 0)
    with pytest.raises(shmkv.MaybeApplied):
        op.result()
    assert node.stats.maybe_applied == 1


# -- batched replica reads (coordinator._Batches) ---------------------------------------------------


def _read_burst(c: Cluster, via: str, keys: list[bytes]) -> list[Any]:
    """GETs of ``keys`` through ``via``, all arriving at once: their values, or the exception."""

    async def go() -> list[Any]:
        return await asyncio.gather(*(
            c.client.request(c.addr[via], Message(wire.GET, 0, {"key": k, "epoch": 1}), 2.0) for k in keys
        ), return_exceptions=True)

    return [r.fields["value"] if isinstance(r, Message) else r for r in c.net.run(go())]


def test_reads_coordinated_together_reach_each_replica_as_one_batch() -> None:
    c, via, keys = _batched(seed=12)
    try:
        assert all(isinstance(r, Message) for r in _burst(c, via, keys))
        c.net.run_for(0.1)
        before = {n: dict(c.nodes[n].stats.requests) for n in c.names[1:]}
        assert _read_burst(c, via, keys) == [b"v" + k for k in keys]
        for name in c.names[1:]:
            seen = c.nodes[name].stats.requests
            many = seen.get("REPLICA_GET_MANY", 0) - before[name].get("REPLICA_GET_MANY", 0)
            one = seen.get("REPLICA_GET", 0) - before[name].get("REPLICA_GET", 0)
            assert many >= 1 and many + one < len(keys), (name, many, one)  # batched
    finally:
        c.close()


def test_a_read_batch_refused_as_a_whole_is_asked_again_key_by_key() -> None:
    """A replica that refuses REPLICA_GET_MANY (as it would one whose answer outgrew a frame)
    still answers each key alone: the reads succeed, as they would unbatched. Without the
    retry both replicas' refusals leave every R=2 read one answer short."""
    c, via, keys = _batched(seed=13)
    try:
        _burst(c, via, keys)
        c.net.run_for(0.1)

        async def refuse(_msg: Message) -> Message:
            raise wire.BadRequest("REPLICA_GET_MANY refused (the test's)")

        for name in c.names[1:]:
            c.nodes[name].services[wire.REPLICA_GET_MANY] = refuse
        assert _read_burst(c, via, keys) == [b"v" + k for k in keys]
        for name in c.names[1:]:
            assert c.nodes[name].stats.requests.get("REPLICA_GET", 0) >= len(keys)
    finally:
        c.close()


def test_a_read_batch_to_unreachable_replicas_fails_each_read_as_a_single_request_would() -> None:
    c, via, keys = _batched(seed=14)
    try:
        _burst(c, via, keys)
        c.net.run_for(0.1)
        c.net.cut([c.addr[via]], [c.addr[n] for n in c.names[1:]])
        got = _read_burst(c, via, keys)
        assert all(isinstance(r, shmkv.QuorumError) and not isinstance(r, shmkv.MaybeApplied) for r in got), got
    finally:
        c.close()


def test_a_large_copy_is_read_alone() -> None:
    c, via, keys = _batched(seed=15)
    try:
        big = b"x" * (coordinator.BATCH_VALUE_MAX + 1)
        for k in keys:
            c.put(via, k, big)
        c.net.run_for(0.1)
        before = {n: c.nodes[n].stats.requests.get("REPLICA_GET_MANY", 0) for n in c.names[1:]}
        assert _read_burst(c, via, keys) == [big] * len(keys)
        assert all(c.nodes[n].stats.requests.get("REPLICA_GET_MANY", 0) == before[n] for n in c.names[1:])
    finally:
        c.close()
