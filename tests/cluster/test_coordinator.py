"""The coordinator as specs, over the simulated network (tests/cluster/sim.py), seeded.

Each test builds a cluster of real nodes -- coordinator.Node over a real shmkv Store (real shared
memory) -- whose transports are the simulator's, so every request, timeout and fault runs in
virtual time and the same seed gives the same run. A "client" is one more address on the network
that sends the client requests of wire.py, exactly as shmkv.connect does.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator

import pytest

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.coordinator import Config, Node
from shmkv.cluster.errors import ConfigError
from shmkv.cluster.replica import Replica
from shmkv.cluster.ring import Member, Ring
from shmkv.cluster.versions import Context
from shmkv.cluster.wire import Message, Overloaded

from .sim import SimNetwork

_seq = itertools.count()
CLIENT = "client:1"


class Cluster:
    """N sim nodes n1..nN at addresses nI:1, one ring (epoch 1), N/W/R = 3/2/2 by default."""

    def __init__(self, seed: int, nodes: int = 3, n: int = 3, w: int = 2, r: int = 2, **knobs: object) -> None:
        self.net = SimNetwork(seed, **knobs)  # type: ignore[arg-type]
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.addr = {name: f"{name}:1" for name in self.names}
        self.ring = Ring([Member(name, self.addr[name]) for name in self.names], 1)
        self.cfg = {name: Config(name, self.addr[name], n=n, w=w, r=r, timeout=0.5) for name in self.names}
        self.stores: dict[str, shmkv.Store] = {}
        self.nodes: dict[str, Node] = {}
        #: the nodes' wall clock (what TTL expiries are judged by): the real one while None,
        #: else this many seconds since the epoch; plus a per-node skew
        self.wall: float | None = None
        self.skew: dict[str, float] = {}
        try:
            for name in self.names:
                self.stores[name] = shmkv.attach(f"simtest.{os.getpid()}.{next(_seq)}", size="16MiB")
                self.start(name)
        except BaseException:
            self.close()
            raise
        self.client = self.net.transport(CLIENT)

    def replica(self, name: str) -> Replica:
        """Node ``name``'s replica over its store, on the cluster's wall clock."""

        def wall() -> float:
            return (time.time() if self.wall is None else self.wall) + self.skew.get(name, 0.0)

        return Replica(self.stores[name], name, clock=wall)

    def start(self, name: str) -> Node:
        node = Node(self.cfg[name], self.net.transport(self.addr[name]), self.replica(name))
        node.ring = self.ring
        self.net.run(node.transport.serve(self.addr[name], node.handle))
        # as the daemon does: suspected peers are probed every 0.5 s (virtual)
        self.net.spawn(node.probe_forever(0.5))
        self.nodes[name] = node
        return node

    def close(self) -> None:
        self.net.close()
        for kv in self.stores.values():
            name = kv.name
            kv.close()
            shmkv.unlink(name)

    # -- client requests, as shmkv.connect sends them --------------------------------------

    def coordinators(self, key: bytes) -> list[str]:
        return self.ring.preference_list(key, 3)

    def request(self, via: str, code: int, timeout: float = 2.0, **fields: object) -> Message:
        fields.setdefault("epoch", 1)
        return self.net.run(self.client.request(self.addr[via], Message(code, 0, fields), timeout))

    def put(self, via: str, key: bytes, value: bytes, **kw: object) -> Message:
        return self.request(via, wire.PUT, key=key, value=value, **kw)

    def get(self, via: str, key: bytes, **kw: object) -> list[bytes | None]:
        return list(self.request(via, wire.GET_VERSIONS, key=key, **kw).fields["values"])

    def held(self, name: str, key: bytes) -> list[bytes | None]:
        """What node ``name``'s own copy of ``key`` holds (no network)."""
        return self.nodes[name].replica.get(key).values


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster(seed=1)
    yield c
    c.close()


def test_quorum_success_every_replica_gets_the_write(cluster: Cluster) -> None:
    key = b"user:1"
    first = cluster.coordinators(key)[0]
    cluster.put(first, key, b"v1")
    assert cluster.get(first, key) == [b"v1"]
    cluster.net.run_for(1.0)  # the third replica's ack arrives after the answer
    assert all(cluster.held(n, key) == [b"v1"] for n in cluster.names)


def test_two_replicas_down_loud_quorum_errors_and_nothing_written_once_known(cluster: Cluster) -> None:
    key = b"k"
    c1, c2, c3 = cluster.coordinators(key)
    cluster.net.crash(cluster.addr[c2])
    cluster.net.crash(cluster.addr[c3])
    with pytest.raises(shmkv.QuorumError, match="1 of 3 replicas answered, R=2 needed") as ei:
        cluster.get(c1, key)
    assert ei.value.answered == 1 and ei.value.needed == 2 and ei.value.n == 3
    assert not isinstance(ei.value, shmkv.MaybeApplied)
    # The read showed the two down: the write is refused before anything is written.
    with pytest.raises(shmkv.QuorumError, match=r"write of b'k' not applied: only 1 of N=3 replicas are up \(n\d, n\d down\), W=2 needed") as ei:
        cluster.put(c1, key, b"lost?")
    assert not isinstance(ei.value, shmkv.MaybeApplied)
    assert cluster.held(c1, key) == []
    with pytest.raises(shmkv.QuorumError, match="read of b'k' failed: only 1 of N=3 replicas are up"):
        cluster.get(c1, key)
    # With R=1 / W=1 the up replica serves alone.
    cluster.put(c1, key, b"solo", w=1)
    assert cluster.get(c1, key, r=1) == [b"solo"]


def test_a_write_that_meets_down_replicas_first_is_maybe_applied_never_failed(cluster: Cluster) -> None:
    key = b"k2"
    c1, c2, c3 = cluster.coordinators(key)
    cluster.net.crash(cluster.addr[c2])
    cluster.net.crash(cluster.addr[c3])
    with pytest.raises(shmkv.MaybeApplied, match="may have been applied"):
        cluster.put(c1, key, b"v")
    assert cluster.held(c1, key) == [b"v"]  # and indeed it was: an R=1 read sees it
    assert cluster.get(c1, key, r=1) == [b"v"]


def test_replies_lost_after_the_replicas_applied_is_maybe_applied(cluster: Cluster) -> None:
    key = b"k3"
    c1, c2, c3 = cluster.coordinators(key)
    # One-way cut: the replica requests arrive and are applied, their acks vanish.
    cluster.net.cut([cluster.addr[c2], cluster.addr[c3]], [cluster.addr[c1]])
    with pytest.raises(shmkv.MaybeApplied, match=r"1 of 3 replicas acknowledged, W=2 needed.*no reply to REPLICA_PUT within 0.5 s") as ei:
        cluster.put(c1, key, b"v", w=2)
    assert ei.value.answered == 1
    assert cluster.net.now >= 0.5  # decided at the replica timeout, not before
    cluster.net.heal()
    cluster.net.run_for(1.0)  # the probe finds them again
    for n in cluster.nodes.values():
        cluster.net.run(n.probe())
    assert cluster.get(c1, key, r=3) == [b"v"]  # it was applied everywhere


def test_concurrent_puts_through_two_coordinators_become_siblings(cluster: Cluster) -> None:
    key = b"cart"
    c1, c2, _ = cluster.coordinators(key)
    a = cluster.net.spawn(cluster.client.request(cluster.addr[c1], Message(wire.PUT, 0, {"key": key, "value": b"A", "epoch": 1}), 2.0))
    b = cluster.net.spawn(cluster.client.request(cluster.addr[c2], Message(wire.PUT, 0, {"key": key, "value": b"B", "epoch": 1}), 2.0))
    cluster.net.run(a)
    cluster.net.run(b)
    cluster.net.run_for(1.0)
    # every replica's own copy holds both: replica puts merge, they never overwrite
    assert all(sorted(cluster.held(n, key)) == [b"A", b"B"] for n in cluster.names)
    assert sorted(cluster.get(c1, key, r=3)) == [b"A", b"B"]  # neither write is lost


def test_put_with_context_supersedes_exactly_what_it_saw(cluster: Cluster) -> None:
    key = b"doc"
    c1, c2, _ = cluster.coordinators(key)
    seen = cluster.request(c1, wire.GET_VERSIONS, key=key).fields["context"]
    # Two writers from the same (empty) context: siblings.
    cluster.put(c1, key, b"A", context=seen)
    cluster.put(c2, key, b"B", context=seen)
    got = cluster.request(c1, wire.GET_VERSIONS, key=key, r=3)
    assert sorted(got.fields["values"]) == [b"A", b"B"]
    ctx_ab = got.fields["context"]
    # A third write C that the resolver has not seen...
    cluster.put(c2, key, b"C", context=ctx_ab, w=3)
    # ...survives the resolution of A and B, which supersedes only A and B.
    cluster.put(c1, key, b"AB", context=ctx_ab, w=3)
    assert sorted(cluster.get(c1, key, r=3)) == [b"AB", b"C"]
    # Resolving with the latest context collapses everything to one value.
    latest = cluster.request(c1, wire.GET_VERSIONS, key=key, r=3).fields["context"]
    cluster.put(c2, key, b"final", context=latest, w=3)
    assert cluster.get(c1, key, r=3) == [b"final"]


def test_put_without_context_supersedes_what_the_coordinator_holds(cluster: Cluster) -> None:
    key = b"plain"
    c1, c2, _ = cluster.coordinators(key)
    cluster.put(c1, key, b"1", w=3)
    cluster.put(c2, key, b"2", w=3)  # c2 held "1": superseded
    assert cluster.get(c1, key, r=3) == [b"2"]


def test_read_repair_fixes_a_stale_replica(cluster: Cluster) -> None:
    key = b"repair-me"
    c1, c2, c3 = cluster.coordinators(key)
    cluster.net.crash(cluster.addr[c3])
    with pytest.raises(shmkv.MaybeApplied):  # W=3 with c3 down (not yet known)
        cluster.put(c1, key, b"new", w=3)
    cluster.net.run_for(1.0)
    cluster.start(c3)  # back, with its old (empty) copy of the key
    cluster.net.run(cluster.nodes[c1].probe())
    assert cluster.held(c3, key) == []
    assert cluster.get(c1, key, r=2) == [b"new"]  # answered by c1 and c2 ...
    cluster.net.run_for(1.0)  # ... and c3's late, stale answer is repaired in the background
    assert cluster.held(c3, key) == [b"new"]
    assert cluster.nodes[c1].stats.read_repairs == 1


def _newer_on_one(cluster: Cluster, key: bytes) -> tuple[str, str, str]:
    """A strict cluster where ``key`` is "old" on every replica and "new" on its first only (a
    write that timed out after reaching it: MaybeApplied); the second is back with its old
    copy, the third down and not known to be. Returns the three replicas."""
    c1, c2, c3 = cluster.coordinators(key)
    for node in cluster.nodes.values():
        node.config.strict = True
    cluster.put(c1, key, b"old", w=3)
    cluster.net.crash(cluster.addr[c2])
    cluster.net.crash(cluster.addr[c3])
    with pytest.raises(shmkv.MaybeApplied):
        cluster.put(c1, key, b"new", w=2)  # on c1 only
    cluster.start(c2)
    cluster.net.run(cluster.nodes[c1].probe())
    return c1, c2, c3


def test_a_strict_read_writes_back_what_it_saw_before_answering(cluster: Cluster) -> None:
    """A write that reached one replica (MaybeApplied) and is then seen by a strict read must
    be seen by every later read: the read writes it back to N - R + 1 replicas before it
    answers. (Before: the repair waited for every answer, in the background, so with the third
    replica down the coordinator could crash first and a read of the other two went back in
    time -- the simulator's linearizability checker found it, seed 439.)"""
    key = b"monotonic"
    c1, c2, c3 = _newer_on_one(cluster, key)
    assert cluster.held(c2, key) == [b"old"]
    assert cluster.get(c1, key, r=2) == [b"new"]  # c1's copy and c2's stale one
    assert cluster.held(c2, key) == [b"new"]  # written back before the answer
    cluster.net.crash(cluster.addr[c1])  # before any background repair could run
    cluster.start(c3)
    assert cluster.get(c2, key, r=2) == [b"new"]  # c2 and c3: not back in time


def test_a_strict_batch_read_writes_back_every_key_in_one_request_per_replica(cluster: Cluster) -> None:
    first = cluster.names[0]
    keys = [k for k in (b"wb%d" % i for i in range(300)) if first in cluster.coordinators(k)][:10]
    for node in cluster.nodes.values():
        node.config.strict = True
    others = [n for n in cluster.names if n != first]
    for n in others:
        cluster.net.crash(cluster.addr[n])
    with pytest.raises(shmkv.MaybeApplied):
        cluster.request(first, wire.PUT_MANY, items=[[k, b"new"] for k in keys], w=2)  # on `first` only
    cluster.start(others[0])  # the other stays down, unknown to `first`
    cluster.net.run(cluster.nodes[first].probe())
    before = len(cluster.net.trace)
    got = cluster.request(first, wire.GET_MANY, keys=keys, r=2).fields["results"]
    assert [vals for vals, _ in got] == [[b"new"]] * len(keys)
    assert all(cluster.held(others[0], k) == [b"new"] for k in keys)  # before the answer
    backs = [t for t in cluster.net.trace[before:] if t[1] == "send" and t[4] == "REPLICA_PUT_MANY"]
    assert [(t[2], t[3]) for t in backs] == [(cluster.addr[first], cluster.addr[others[0]])]


def test_a_strict_read_that_cannot_write_back_is_refused_loudly(cluster: Cluster) -> None:
    key = b"refused"
    c1, c2, _c3 = _newer_on_one(cluster, key)
    # c2 answers the read but refuses what it is sent back (overloaded): 1 of the 2 replicas
    # a later read must meet hold "new"
    n2 = cluster.nodes[c2]
    dispatch = n2._dispatch

    async def refuse_puts(code: int, f: object) -> Message:
        if code in (wire.REPLICA_PUT, wire.REPLICA_PUT_MANY):
            raise Overloaded("busy")
        return await dispatch(code, f)

    n2._dispatch = refuse_puts  # type: ignore[method-assign]
    with pytest.raises(shmkv.QuorumError, match="could be written back to only 1 of the 2 replicas") as ei:
        cluster.get(c1, key, r=2)
    assert not isinstance(ei.value, shmkv.MaybeApplied) and (ei.value.needed, ei.value.answered) == (2, 1)
    # the request's strict=0 asks for the cheaper read: answered, repaired in the background
    assert cluster.get(c1, key, r=2, strict=0) == [b"new"]
    assert cluster.held(c2, key) == [b"old"]


def test_batch_read_repairs_every_stale_key_in_one_round_per_replica(cluster: Cluster) -> None:
    first = cluster.names[0]
    keys = [k for k in (b"r%d" % i for i in range(300)) if first in cluster.coordinators(k)][:10]
    stale = next(n for n in cluster.names if n != first)
    cluster.net.crash(cluster.addr[stale])
    with pytest.raises(shmkv.MaybeApplied):
        cluster.request(first, wire.PUT_MANY, items=[[k, b"new"] for k in keys], w=3)
    cluster.start(stale)
    cluster.net.run(cluster.nodes[first].probe())
    assert all(cluster.held(stale, k) == [] for k in keys)
    before = len(cluster.net.trace)
    got = cluster.request(first, wire.GET_MANY, keys=keys, r=2).fields["results"]
    assert [vals for vals, _ in got] == [[b"new"]] * len(keys)
    cluster.net.run_for(1.0)
    assert all(cluster.held(stale, k) == [b"new"] for k in keys)
    repairs = [t for t in cluster.net.trace[before:] if t[1] == "send" and t[4] == "REPLICA_PUT_MANY"]
    assert [(t[2], t[3]) for t in repairs] == [(cluster.addr[first], cluster.addr[stale])]


def test_delete_is_a_versioned_tombstone(cluster: Cluster) -> None:
    key = b"gone"
    c1, c2, _ = cluster.coordinators(key)
    cluster.put(c1, key, b"v", w=3)
    cluster.request(c2, wire.DELETE, key=key, w=3)
    assert cluster.get(c1, key, r=3) == [None]
    assert all(cluster.held(n, key) == [None] for n in cluster.names)


def test_counter_increments_through_different_coordinators_all_count(cluster: Cluster) -> None:
    key = b"hits"
    c1, c2, c3 = cluster.coordinators(key)
    tasks = [
        cluster.net.spawn(cluster.client.request(cluster.addr[c], Message(wire.INCR, 0, {"key": key, "delta": d, "epoch": 1}), 2.0))
        for c, d in ((c1, 5), (c2, 7), (c3, -2), (c1, 1))
    ]
    for t in tasks:
        cluster.net.run(t)
    cluster.net.run_for(1.0)
    final = cluster.request(c2, wire.INCR, key=key, delta=0, w=3)
    assert final.fields["value"] == 11


def test_wrong_epoch_and_not_my_key_answer_wrong_epoch() -> None:
    c = Cluster(seed=3, nodes=4)
    try:
        key = b"somewhere"
        outsider = next(n for n in c.names if n not in c.coordinators(key))
        with pytest.raises(shmkv.WrongEpoch, match="does not coordinate"):
            c.put(outsider, key, b"v")
        with pytest.raises(shmkv.WrongEpoch) as ei:
            c.put(c.coordinators(key)[0], key, b"v", epoch=7)
        assert ei.value.expected == 1 and ei.value.got == 7
        # Without an epoch (a ring-unaware tool) the outsider forwards to a replica.
        msg = Message(wire.PUT, 0, {"key": key, "value": b"fwd"})
        c.net.run(c.client.request(c.addr[outsider], msg, 3.0))
        assert c.get(c.coordinators(key)[0], key) == [b"fwd"]
        assert c.held(outsider, key) == []
        # Batches too: each key goes to one of its own replicas.
        keys = [b"fwd%d" % i for i in range(12)]
        msg = Message(wire.PUT_MANY, 0, {"items": [[k, k] for k in keys]})
        c.net.run(c.client.request(c.addr[outsider], msg, 3.0))
        got = c.net.run(c.client.request(c.addr[outsider], Message(wire.GET_MANY, 0, {"keys": keys}), 3.0))
        assert [vals for vals, _ in got.fields["results"]] == [[k] for k in keys]
    finally:
        c.close()


def test_batches_one_round_per_replica(cluster: Cluster) -> None:
    # keys all coordinated by one node: the node's own batch
    first = cluster.names[0]
    keys = [k for k in (b"b%d" % i for i in range(200)) if first in cluster.coordinators(k)][:20]
    before = len(cluster.net.trace)
    cluster.request(first, wire.PUT_MANY, items=[[k, k + b"!"] for k in keys], w=3)
    sends = [t for t in cluster.net.trace[before:] if t[1] == "send" and t[4] == "REPLICA_PUT_MANY"]
    assert len(sends) == 2  # one per other replica, for all 20 keys
    got = cluster.request(first, wire.GET_MANY, keys=keys).fields["results"]
    assert [vals for vals, _ctx in got] == [[k + b"!"] for k in keys]


def test_bad_w_is_refused_as_a_config_error(cluster: Cluster) -> None:
    key = b"x"
    with pytest.raises(ConfigError, match="W=4 > N=3"):
        cluster.put(cluster.coordinators(key)[0], key, b"v", w=4)
    assert cluster.held(cluster.coordinators(key)[0], key) == []


def test_get_answers_one_value_or_a_conflict_naming_the_siblings(cluster: Cluster) -> None:
    key = b"g"
    c1, c2, _ = cluster.coordinators(key)
    got = cluster.request(c1, wire.GET, key=key)
    assert got.fields["value"] is None
    cluster.put(c1, key, b"one", w=3)
    assert cluster.request(c2, wire.GET, key=key).fields["value"] == b"one"
    ctx = cluster.request(c1, wire.GET_VERSIONS, key=key).fields["context"]
    cluster.put(c1, key, b"A", context=ctx, w=3)
    cluster.put(c2, key, b"B", context=ctx, w=3)
    with pytest.raises(shmkv.Conflict, match="2 concurrent versions") as ei:
        cluster.request(c1, wire.GET, key=key)
    assert sorted(ei.value.values) == [b"A", b"B"]
    cluster.put(c1, key, b"AB", context=ei.value.context, w=3)
    assert cluster.request(c2, wire.GET, key=key).fields["value"] == b"AB"
    cluster.request(c2, wire.DELETE, key=key, w=3)
    assert cluster.request(c1, wire.GET, key=key).fields["value"] is None


def test_oversized_value_is_refused_by_name_and_not_written(cluster: Cluster) -> None:
    key = b"big"
    c1 = cluster.coordinators(key)[0]
    with pytest.raises(shmkv.ValueTooLarge):
        cluster.put(c1, key, b"x" * (2 << 20))
    assert all(cluster.held(n, key) == [] for n in cluster.names)


def _scenario(seed: int) -> list[tuple[float, str, str, str, str, int]]:
    c = Cluster(seed=seed, delay=(0.001, 0.02), drop=0.05)
    try:
        for i in range(20):
            key = b"key%d" % i
            via = c.coordinators(key)[i % 2]
            try:
                c.put(via, key, b"v%d" % i)
                c.get(via, key)
            except shmkv.ClusterError:  # a lost client request times out; a short quorum raises
                pass
        return list(c.net.trace)
    finally:
        c.close()


def test_same_seed_same_run() -> None:
    assert _scenario(11) == _scenario(11)
    assert Context  # the context type is what GET_VERSIONS encodes


@pytest.mark.parametrize("seed", range(6))
def test_no_acknowledged_write_is_lost_under_drops_and_crashes(seed: int) -> None:
    """Sequential writers per key through random coordinators, 10% of messages lost and a node
    crashing and coming back mid-run: after healing, a quorum read of every key returns the last
    acknowledged value or a later attempted one -- never something older, never nothing."""
    import random

    c = Cluster(seed=seed, delay=(0.001, 0.01), drop=0.1)
    rng = random.Random(seed)
    try:
        keys = [b"key%d" % i for i in range(8)]
        acked = {k: -1 for k in keys}
        tried = {k: -1 for k in keys}
        victim = c.names[seed % 3]
        for step in range(120):
            if step == 40:
                c.net.crash(c.addr[victim])
            if step == 80:
                c.start(victim)
            k = rng.choice(keys)
            via = rng.choice([n for n in c.coordinators(k) if n != victim or not 40 <= step < 80])
            tried[k] = step
            try:
                c.put(via, k, b"%d" % step)
                acked[k] = step
            except shmkv.ClusterError:
                pass  # QuorumError / MaybeApplied / a lost client request: not acknowledged
            c.net.run_for(0.2)  # think time: probes clear suspicions of nodes that answer
        assert sum(v >= 0 for v in acked.values()) >= 4  # the run did acknowledge writes
        c.net.drop = 0.0
        c.net.run_for(2.0)
        for n in c.nodes.values():
            c.net.run(n.probe())
        for k in keys:
            values = [int(v) for v in c.get(c.coordinators(k)[0], k, r=3) if v is not None]
            if acked[k] >= 0:
                assert values and max(values) >= acked[k], (k, values, acked[k])
            assert all(v <= tried[k] for v in values)
    finally:
        c.close()


def test_a_ttl_expires_on_every_replica_by_the_version_and_read_repair_keeps_it_expired(
    cluster: Cluster,
) -> None:
    key = b"ttl"
    c1, c2, c3 = cluster.coordinators(key)
    cluster.wall = 1_000_000.0
    cluster.put(c1, key, b"v", ttl_ms=1500)
    cluster.net.run_for(1.0)
    assert all(cluster.held(n, key) == [b"v"] for n in cluster.names)
    expires = {cluster.nodes[n].replica.get(key).siblings[0].expires for n in cluster.names}
    assert expires == {1_000_001_500}  # the coordinator's clock + ttl, the same on every copy
    cluster.wall += 1.4
    assert cluster.get(c2, key, r=3) == [b"v"]
    cluster.wall += 0.2  # past the expiry: absent through every coordinator and at every R
    for via in (c1, c2, c3):
        for r in (1, 2, 3):
            assert cluster.get(via, key, r=r) == [], (via, r)
            assert cluster.request(via, wire.GET, key=key, r=r).fields["value"] is None
    # a replica that lost its copy gets the expired one back by read repair -- still expired
    cluster.stores[c3].delete(b"v" + key)
    assert cluster.get(c1, key, r=3) == []
    cluster.net.run_for(1.0)
    assert cluster.held(c3, key) == [b"v"]
    assert cluster.nodes[c3].replica.get(key).siblings[0].expires == 1_000_001_500
    assert cluster.get(c3, key, r=1) == []
    # a plain SET afterwards is a version without expiry: it stays
    cluster.put(c2, key, b"w")
    cluster.wall += 3600
    assert cluster.get(c1, key, r=3) == [b"w"]


def test_expiry_is_judged_by_each_coordinators_wall_clock(cluster: Cluster) -> None:
    key = b"skewed"
    c1, c2, _ = cluster.coordinators(key)
    cluster.wall = 2_000_000.0
    cluster.skew[c2] = 5.0  # c2's clock runs 5 s ahead (README, "TTLs": the clock caveat)
    cluster.put(c1, key, b"v", ttl_ms=3000)
    assert cluster.get(c1, key, r=3) == [b"v"]
    assert cluster.get(c2, key, r=3) == []


def test_bad_ttls_are_refused_and_nothing_is_written(cluster: Cluster) -> None:
    key = b"badttl"
    c1 = cluster.coordinators(key)[0]
    for bad in (0, -5, 2**62 + 1):  # (a non-int is refused by wire.py before it gets here)
        with pytest.raises(wire.BadRequest, match="ttl_ms must be an int of milliseconds"):
            cluster.put(c1, key, b"v", ttl_ms=bad)
    cluster.net.run_for(1.0)
    assert all(cluster.held(n, key) == [] for n in cluster.names)
    # a DELETE never makes an expiring tombstone (anti-entropy collects tombstones by grace)
    cluster.put(c1, key, b"v")
    cluster.request(c1, wire.DELETE, key=key, ttl_ms=10)
    assert all(s.expires is None for s in cluster.nodes[c1].replica.get(key).siblings)


def test_a_replica_refuses_copies_it_does_not_hold_and_bad_batches_change_nothing() -> None:
    from shmkv.cluster.versions import VersionSet

    c = Cluster(seed=4, nodes=4)
    try:
        key = b"elsewhere"
        outsider = next(n for n in c.names if n not in c.coordinators(key))
        vs = VersionSet().put(b"v", None, "x@1").to_wire()
        with pytest.raises(shmkv.WrongEpoch, match="holds no copy"):
            c.request(outsider, wire.REPLICA_PUT, key=key, versions=vs)
        assert c.held(outsider, key) == []
        mine = c.coordinators(key)[0]
        with pytest.raises(shmkv.ClusterError):
            c.request(mine, wire.REPLICA_PUT_MANY, items=[[key, vs], [key, [1, "garbage", []]]])
        assert c.held(mine, key) == []  # the good first item was not merged either
    finally:
        c.close()
