"""Anti-entropy (antientropy.py) as scenarios over the simulated network, seeded.

Real nodes (coordinator.Node over real shmkv Stores) talk through tests/cluster/sim.py; the
tombstone clock is the network's virtual clock, so the same seed gives the same run. Each
scenario checks a promise of issue 12: trees follow writes, a wiped replica converges within a
bounded number of rounds, the bytes exchanged grow with the difference and not with the data
set, a deleted key never comes back and its tombstones are collected after the grace.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from shmkv.cluster import wire
from shmkv.cluster.antientropy import AntiEntropy, Service, Settings
from shmkv.cluster.coordinator import Node
from shmkv.cluster.merkle import MerkleTree
from shmkv.cluster.replica import COUNTER, VERSIONS, Replica
from shmkv.cluster.versions import VersionSet
from shmkv.cluster.wire import BadRequest, Message

from .test_coordinator import Cluster

INTERVAL = 1.0
GRACE = 20.0


class AECluster(Cluster):
    """Cluster with anti-entropy on every node (interval 1 s virtual, grace 20 s, no rebuilds)."""

    settings = Settings(interval=INTERVAL, grace=GRACE, rebuild=0.0, timeout=2.0)

    def start(self, name: str) -> Node:
        if not hasattr(self, "svc"):
            self.svc: dict[str, Service] = {}
        node = Node(self.cfg[name], self.net.transport(self.addr[name]), self.replica(name))
        node.ring = self.ring
        svc = Service(node, self.settings, owner=True, workers=1)
        assert svc.owner is not None
        svc.owner.clock = self.net.loop.time
        self.net.run(node.transport.serve(self.addr[name], svc.wrap(node.handle)))
        self.net.spawn(node.probe_forever(0.5))
        self.net.run(svc.start())
        self.nodes[name] = node
        self.svc[name] = svc
        return node

    def ae(self, name: str) -> AntiEntropy:
        owner = self.svc[name].owner
        assert owner is not None
        return owner

    def restart(self, name: str, wipe: bool) -> None:
        """Stop node ``name`` (its loop too) and start it again; ``wipe``: with an empty store."""
        self.net.crash(self.addr[name])
        self.net.run(self.svc[name].stop())
        if wipe:
            self.stores[name].clear()
        self.start(name)

    def copies(self, name: str) -> dict[bytes, Any]:
        """Node ``name``'s stored replica entries (b"v"/b"c" + key -> bytes)."""
        return {k: v for k, v in self.stores[name].items() if k[:1] in (VERSIONS, COUNTER)}

    def converged(self) -> bool:
        first = self.copies(self.names[0])
        return all(self.copies(n) == first for n in self.names[1:])

    def put_all(self, count: int, prefix: str = "k") -> None:
        for i in range(count):
            key = f"{prefix}{i}".encode()
            self.put(self.coordinators(key)[0], key, b"value %d" % i, w=3)


@pytest.fixture
def ae_cluster() -> Iterator[AECluster]:
    c = AECluster(seed=3)
    yield c
    c.close()


def _rounds_until(c: AECluster, done: Any, limit: int = 10) -> int:
    """Virtual rounds until ``done()``, at most ``limit`` (then the test fails)."""
    for i in range(limit):
        if done():
            return i
        c.net.run_for(INTERVAL)
    assert done(), f"not converged after {limit} rounds"
    return limit


def test_trees_follow_writes_and_equal_a_build_from_the_store(ae_cluster: AECluster) -> None:
    c = ae_cluster
    c.net.run_for(0.1)
    c.put_all(200)
    c.request(c.names[0], wire.INCR, key=b"ctr", delta=5)
    c.request(c.names[0], wire.DELETE, key=b"k7")
    c.net.run_for(0.5)
    for name in c.names:
        ae = c.ae(name)
        roots = {r: t.root for r, t in ae.trees.items()}
        assert sum(len(t) for t in ae.trees.values()) == len(c.copies(name)) == 201
        c.net.run(ae.build())
        assert {r: t.root for r, t in ae.trees.items()} == roots
    # equal replicas: the roots agree, and the three nodes' trees are the same
    assert len({tuple(sorted((r, t.root) for r, t in c.ae(n).trees.items())) for n in c.names}) == 1


def test_a_wiped_replica_converges_within_a_bounded_number_of_rounds(ae_cluster: AECluster) -> None:
    c = ae_cluster
    c.net.run_for(0.1)
    c.put_all(300)
    c.request(c.names[0], wire.INCR, key=b"ctr", delta=7)
    c.net.run_for(0.5)
    assert c.converged()
    c.restart("n3", wipe=True)
    assert c.copies("n3") == {}
    rounds = _rounds_until(c, c.converged, limit=5)
    assert rounds <= 3
    assert c.ae("n3").stats.repaired + c.ae("n1").stats.repaired + c.ae("n2").stats.repaired >= 301


def test_without_anti_entropy_the_wiped_replica_stays_empty(ae_cluster: AECluster) -> None:
    """The control: the convergence above is anti-entropy's doing (no reads ran)."""
    c = ae_cluster
    c.net.run_for(0.1)
    c.put_all(50)
    for name in c.names:
        c.net.run(c.svc[name].stop())
    c.stores["n3"].clear()
    c.net.run_for(5 * INTERVAL)
    assert not c.converged() and c.copies("n3") == {}


def test_keys_removed_behind_the_daemons_back_come_back_after_a_rebuild(ae_cluster: AECluster) -> None:
    c = ae_cluster
    c.net.run_for(0.1)
    c.put_all(100)
    c.net.run_for(0.5)
    gone = [k for k in c.copies("n2")][:10]
    for k in gone:
        c.stores["n2"].delete(k)  # no write announced it: the tree still has the keys
    c.net.run_for(3 * INTERVAL)
    assert not c.converged()
    c.net.run(c.ae("n2").build())  # what --ae-rebuild does on its schedule
    _rounds_until(c, c.converged, limit=5)


def _exchange_bytes(c: AECluster, a: str, b: str) -> int:
    before = c.net.bytes_sent
    c.net.run(c.ae(a).exchange(b))
    return c.net.bytes_sent - before


@pytest.mark.parametrize("size", [500, 2000])
def test_bytes_exchanged_grow_with_the_difference_not_the_data_set(size: int) -> None:
    c = AECluster(seed=5)
    try:
        c.net.run_for(0.1)
        for name in c.names:  # exchanges by hand below: no background rounds
            c.net.run(c.svc[name].stop())
        c.put_all(size)
        c.net.run_for(0.5)
        data = sum(len(k) + len(v) for k, v in c.copies("n1").items())
        same = _exchange_bytes(c, "n1", "n2")
        assert same < 300  # equal roots: one small round trip
        per_key = {}
        for d in (1, 10, 100):
            keys = sorted(c.copies("n2"))[:d]
            for k in keys:
                c.stores["n2"].delete(k)
            c.net.run(c.ae("n2").build())
            sent = _exchange_bytes(c, "n1", "n2")
            assert c.copies("n2") == c.copies("n1")  # one exchange repaired all d keys
            per_key[d] = sent / d
            print(size, data, same, d, sent)
        # the cost per differing key does not grow with d, and is far below the data set
        assert per_key[100] <= per_key[1]
        assert per_key[1] < 0.1 * data
    finally:
        c.close()


def test_bytes_per_differing_key_do_not_grow_with_the_data_set() -> None:
    costs = []
    for size in (300, 3000):
        c = AECluster(seed=6)
        try:
            c.net.run_for(0.1)
            for name in c.names:
                c.net.run(c.svc[name].stop())
            c.put_all(size)
            c.net.run_for(0.5)
            for k in sorted(c.copies("n2"))[:20]:
                c.stores["n2"].delete(k)
            c.net.run(c.ae("n2").build())
            costs.append(_exchange_bytes(c, "n2", "n1"))
            assert c.copies("n2") == c.copies("n1")
        finally:
            c.close()
    # 10x the data, the same 20-key difference: well under 10x the bytes (leaves hold more keys)
    assert costs[1] < 3 * costs[0], costs


def test_a_delete_missed_by_a_down_replica_never_comes_back(ae_cluster: AECluster) -> None:
    c = ae_cluster
    c.net.run_for(0.1)
    c.put_all(20)
    c.net.run_for(0.5)
    key = b"k3"
    c1, c2, c3 = c.coordinators(key)
    c.net.crash(c.addr[c3])
    c.net.run(c.svc[c3].stop())
    c.request(c1, wire.DELETE, key=key, w=2)
    assert c.held(c3, key) == [b"value 3"]  # the down replica keeps the old value
    c.start(c3)  # back, with its old copy
    _rounds_until(c, c.converged, limit=5)
    for name in c.names:
        assert c.nodes[name].replica.get(key).is_deleted
        assert VERSIONS + key in c.ae(name).tombs
    assert c.get(c1, key, r=3) in ([None], [])


def test_tombstones_are_collected_after_the_grace_and_the_key_stays_deleted(ae_cluster: AECluster) -> None:
    c = ae_cluster
    c.net.run_for(0.1)
    c.put_all(30)
    key = b"k5"
    c.request(c.coordinators(key)[0], wire.DELETE, key=key, w=3)
    c.net.run_for(0.5)
    assert all(c.nodes[n].replica.get(key).is_deleted for n in c.names)
    c.restart("n2", wipe=True)  # a wiped replica gets the tombstone back, within the grace
    _rounds_until(c, c.converged, limit=5)
    assert c.nodes["n2"].replica.get(key).is_deleted and c.held("n2", key) == [None]
    c.net.run_for(GRACE + 3 * INTERVAL)
    time.sleep(0.002)  # a tombstone collected in the last round stays readable up to 1 ms (ttl in ms)
    for name in c.names:
        assert VERSIONS + key not in c.stores[name], name
        assert VERSIONS + key not in c.ae(name).tombs
        assert c.ae(name).stats.collected >= 1
    assert c.converged()
    c.net.run_for(5 * INTERVAL)  # and it stays gone: no ping-pong of the collected tombstone
    assert all(VERSIONS + key not in c.stores[n] for n in c.names)
    assert c.get(c.coordinators(key)[0], key, r=3) == []
    assert len(c.copies("n1")) == 29


def _a_tombstone_past_its_grace(c: AECluster) -> bytes:
    """Key k0 deleted on every replica, the loops stopped, the clock past the grace; its key."""
    c.net.run_for(0.1)
    key = b"k0"
    c.put_all(5)
    c.request(c.coordinators(key)[0], wire.DELETE, key=key, w=3)
    c.net.run_for(0.5)
    for name in c.names:
        c.net.run(c.svc[name].stop())
    c.net.run_for(GRACE + 1)
    return key


def test_a_tombstone_past_its_grace_is_not_stored_again(ae_cluster: AECluster) -> None:
    """One replica collected (its clock ran ahead), the other still holds it: the exchange must
    not hand the tombstone back for a second grace period."""
    c = ae_cluster
    key = _a_tombstone_past_its_grace(c)
    assert c.ae("n1").collect() == 1  # n1 alone collects; n2 and n3 still hold it
    c.net.run(c.ae("n2").exchange("n1"))  # often within the millisecond the collected entry
    # stays readable (the Store rounds a ttl up to 1 ms): the exchange must not store it again
    time.sleep(0.002)  # then it is gone -- unless it was stored again (no ttl)
    assert VERSIONS + key not in c.stores["n1"]
    assert VERSIONS + key not in c.ae("n1").tombs


class _LastMillisecond:
    """A Store that answers ``get(skey)`` once more with ``raw`` -- a collected entry read within
    the millisecond its expiry is rounded up to -- and is the real Store otherwise."""

    def __init__(self, store: Any, skey: bytes, raw: bytes) -> None:
        self._store, self._skey, self._raw = store, skey, raw

    def get(self, key: bytes, *a: Any) -> Any:
        if key == self._skey and self._raw is not None:
            raw, self._raw = self._raw, None
            return raw
        return self._store.get(key, *a)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_collected_tombstone_still_readable_is_not_stored_again(ae_cluster: AECluster) -> None:
    """collect() expires a tombstone with a ttl the Store rounds up to a whole millisecond: a
    peer's past-grace copy arriving within it finds the collected entry (still readable), and
    must not be merged -- the merge, finding the entry gone by then, stored it again, for a new
    grace (seen once in ~160 exchanges right after a collect)."""
    c = ae_cluster
    skey = VERSIONS + _a_tombstone_past_its_grace(c)
    replica = c.nodes["n1"].replica
    raw = replica.store.get(skey)
    assert c.ae("n1").collect() == 1
    time.sleep(0.002)  # the real entry is gone now ...
    real = replica.store
    replica.store = _LastMillisecond(real, skey, raw)  # ... but the next read still sees it
    try:
        c.net.run(c.ae("n2").exchange("n1"))
    finally:
        replica.store = real
    assert skey not in real and skey not in c.ae("n1").tombs  # not stored again
    assert c.ae("n1").stats.repaired == 0


def test_an_expiring_key_synced_to_a_wiped_replica_keeps_its_expiry(ae_cluster: AECluster) -> None:
    c = ae_cluster
    c.wall = 3_000_000.0
    c.net.run_for(0.1)
    c.put(c.coordinators(b"t")[0], b"t", b"v", ttl_ms=10_000, w=3)
    c.restart("n3", wipe=True)
    _rounds_until(c, c.converged, limit=5)
    assert c.nodes["n3"].replica.get(b"t").siblings[0].expires == 3_000_010_000
    assert c.get("n3", b"t", r=1) == [b"v"]
    c.wall += 11
    c.net.run_for(3 * INTERVAL)  # more exchanges: nothing brings an unexpired copy back
    for name in c.names:
        assert c.get(name, b"t", r=1) == [] and c.get(name, b"t", r=3) == []
        assert c.nodes[name].replica.get(b"t").siblings[0].expires == 3_000_010_000


def test_counters_diverged_by_a_wipe_are_repaired(ae_cluster: AECluster) -> None:
    c = ae_cluster
    c.net.run_for(0.1)
    for i in range(10):
        c.request(c.names[i % 3], wire.INCR, key=b"hits", delta=1)
    c.net.run_for(0.5)
    c.restart("n1", wipe=True)
    _rounds_until(c, c.converged, limit=5)
    assert c.nodes["n1"].replica.counter(b"hits").value == 10


def _same_run(seed: int) -> tuple[list[Any], dict[bytes, Any]]:
    c = AECluster(seed=seed)
    try:
        c.net.run_for(0.1)
        c.put_all(60)
        c.restart("n2", wipe=True)
        c.net.run_for(4 * INTERVAL)
        # values, not bytes: each store's actor has a random incarnation (replica.py)
        return list(c.net.trace), {k: VersionSet.decode(v).values for k, v in c.copies("n2").items()}
    finally:
        c.close()


def test_the_same_seed_gives_the_same_run() -> None:
    a, b = _same_run(11), _same_run(11)
    assert a[0] == b[0]
    assert a[1] == b[1] and len(a[1]) == 60
    assert [e[1:] for e in _same_run(12)[0]] != [e[1:] for e in a[0]]


def test_malformed_anti_entropy_requests_are_refused_by_name(ae_cluster: AECluster) -> None:
    c = ae_cluster
    c.net.run_for(0.1)
    ae = c.ae("n1")
    rng = ["n1", "n2", "n3"]
    bad: list[tuple[int, dict[str, Any], str]] = [
        (wire.AE_CHILDREN, {"range": rng, "level": 9, "idxs": [0]}, "level"),
        (wire.AE_CHILDREN, {"range": rng, "level": 1, "idxs": [16]}, "index"),
        (wire.AE_CHILDREN, {"range": ["n2", "n1"], "level": 0, "idxs": [0]}, "sorted"),
        (wire.AE_LEAVES, {"range": ["n2", "n3"], "idxs": [0]}, "does not hold"),
        (wire.AE_SYNC, {"from": "n2", "range": rng, "items": [[b"xkey", None, None]]}, "b'v' or b'c'"),
        (wire.AE_SYNC, {"from": "zz", "range": rng, "items": []}, "holds no copies"),
        (wire.AE_ROOTS, {"from": "stranger"}, "not a member"),
    ]
    for code, fields, match in bad:
        with pytest.raises(BadRequest, match=match):
            c.net.run(ae.handle(code, {**fields, "epoch": 1}))
    # a bad copy in AE_SYNC is refused before anything is merged
    with pytest.raises(Exception, match="version set|undecodable"):
        c.net.run(ae.handle(wire.AE_SYNC, {"from": "n2", "range": rng, "epoch": 1,
                                           "items": [[b"vk1", b"\x93garbage", None]]}))
    # over the wire, too: the node answers an error and keeps serving
    with pytest.raises(BadRequest, match="tree node index -1"):
        c.net.run(c.client.request(c.addr["n1"], Message(wire.AE_LEAVES, 0, {"range": rng, "idxs": [-1], "epoch": 1}), 1.0))
    assert c.put("n1", b"still", b"serving").code == wire.OK


def test_with_workers_a_relay_announces_its_writes_and_forwards_peers_requests(ae_cluster: AECluster) -> None:
    """--workers 2 on n1: worker 0 owns the trees, worker 1 (another Node over the same Store)
    is a relay. Writes through the relay reach the owner's trees; an AE request a peer's
    connection brought to the relay is answered by the owner."""
    c = ae_cluster
    c.net.run_for(0.1)
    c.net.run(c.svc["n1"].stop())
    owner_node = c.nodes["n1"]
    owner = Service(owner_node, c.settings, owner=True, workers=2)
    assert owner.owner is not None
    owner.owner.clock = c.net.loop.time
    c.net.run(owner.start())
    assert owner.private is not None
    worker1 = Node(c.cfg["n1"], c.net.transport("n1w1:1"), Replica(c.stores["n1"], "n1"))
    worker1.ring = c.ring
    relay = Service(worker1, c.settings, owner=False, workers=2)
    c.net.run(worker1.transport.serve("n1w1:1", relay.wrap(worker1.handle)))
    c.net.run(relay.start())
    c.net.run_for(0.5)  # the owner's first build
    for i in range(40):
        key = b"w%d" % i
        c.net.run(c.client.request("n1w1:1", Message(wire.PUT, 0, {"key": key, "value": b"x", "epoch": 1}), 2.0))
    c.net.run_for(1.0)  # a few relay flushes
    ae = owner.owner
    assert ae.stats.notified >= 40
    roots = {r: t.root for r, t in ae.trees.items()}
    c.net.run(ae.build())
    assert {r: t.root for r, t in ae.trees.items()} == roots  # the trees saw every relayed write
    reply = c.net.run(c.client.request("n1w1:1", Message(wire.AE_ROOTS, 0, {"from": "n2", "epoch": 1}), 2.0))
    assert [(tuple(r), h) for r, h in reply.fields["roots"]] == [
        (r, t.root.to_bytes(16, "big")) for r, t in sorted(ae.trees.items())
    ]
    c.net.run(relay.stop())
    c.net.run(owner.stop())


# -- streaming a wiped replica, the rate limit, trees that regrow ------------------------------


def _cluster(seed: int, **settings: Any) -> AECluster:
    """An AECluster with other settings (the class attribute is what start() reads)."""
    s = Settings(**{"interval": INTERVAL, "grace": GRACE, "rebuild": 0.0, "timeout": 2.0, **settings})
    return type("Custom", (AECluster,), {"settings": s})(seed=seed)


def _kv_bytes(c: AECluster, name: str) -> int:
    """What a full copy of node ``name``'s replicas weighs: store keys plus stored copies."""
    return sum(len(k) + len(v) for k, v in c.copies(name).items())


def test_a_wiped_replica_is_streamed_at_about_the_size_of_its_copies_either_way() -> None:
    c = _cluster(21)
    try:
        c.net.run_for(0.1)
        for name in c.names:  # exchanges by hand below
            c.net.run(c.svc[name].stop())
        c.put_all(800)
        c.net.run_for(0.5)
        full = _kv_bytes(c, "n1")
        for initiator, peer in (("n3", "n1"), ("n1", "n3")):  # n3 pulls, then n1 pushes
            c.stores["n3"].clear()
            c.net.run(c.ae("n3").build())
            before = c.ae(initiator).stats.streamed
            sent = _exchange_bytes(c, initiator, peer)
            assert c.copies("n3") == c.copies("n1")
            assert c.ae(initiator).stats.streamed - before == 800  # no leaf walk, no hashes
            # each copy once, plus a few bytes of framing per key (msgpack headers, its
            # tombstone time) -- no hashes, no echo of the copies back
            assert sent < full + 8 * 800, (initiator, sent, full)
    finally:
        c.close()


def test_a_wiped_replica_is_filled_once_at_the_rate_limit_by_the_background_rounds() -> None:
    rate, keys = 200.0, 600
    c = _cluster(22, rate=rate)
    try:
        c.net.run_for(0.1)
        c.put_all(keys)
        c.net.run_for(0.5)
        c.restart("n3", wipe=True)
        t0 = c.net.now
        _rounds_until(c, c.converged, limit=12)
        took = c.net.now - t0
        assert took >= keys / rate * 0.95  # --ae-rate held on the merging side
        assert took <= keys / rate + 4 * INTERVAL
        streamed = sum(c.ae(n).stats.streamed for n in c.names)
        assert streamed <= 1.05 * keys, streamed  # one peer filled it; the others were refused
        assert sum(c.ae(n).stats.busy for n in c.names) >= 1
        assert c.ae("n3").stats.throttled_s > 0
    finally:
        c.close()


def _timed_exchange(c: AECluster, initiator: str, peer: str) -> float:
    """Virtual seconds one exchange by hand takes (it raises if a request timed out)."""
    t0 = c.net.now
    c.net.run(c.ae(initiator).exchange(peer))
    return c.net.now - t0


@pytest.mark.parametrize(("initiator", "peer"), [("n3", "n1"), ("n1", "n3")])  # n3 pulls; n1 pushes
def test_the_byte_limit_paces_large_copies_and_lets_as_many_small_ones_through(initiator: str, peer: str) -> None:
    """--ae-bytes-rate counts what the copies weigh: 120 copies of 2 KB take their bytes / rate
    on the merging side (the wiped n3, whichever side started), 120 small ones almost nothing --
    the same key count. A pusher sizes its batches from the receiver's byte rate, so no request
    outwaits the 2 s time-out (a 240 KB batch would wait 2.4 s)."""
    byte_rate, keys = 100_000.0, 120
    c = _cluster(24, rate=0.0, byte_rate=byte_rate)
    try:
        c.net.run_for(0.1)
        for name in c.names:  # exchanges by hand below
            c.net.run(c.svc[name].stop())
        took = {}
        for size in (8, 2000):
            for i in range(keys):
                key = b"s%d-%d" % (size, i)
                c.put(c.coordinators(key)[0], key, bytes([65 + i % 26]) * size, w=3)
            c.net.run_for(0.5)
            c.stores["n3"].clear()
            c.net.run(c.ae("n3").build())
            took[size] = _timed_exchange(c, initiator, peer)
            assert c.copies("n3") == c.copies("n1")
        cost = sum(len(k) + len(v) + 16 for k, v in c.copies("n3").items())  # antientropy._cost
        burst = byte_rate * 0.05  # TokenBucket.BURST_S
        assert took[2000] >= (cost - burst) / byte_rate * 0.95, (took, cost)
        assert took[2000] <= cost / byte_rate * 1.3 + 0.5, (took, cost)
        assert took[8] < 0.2 * took[2000], took  # small copies: the byte limit hardly binds
        assert c.ae("n3").stats.throttled_s >= (cost - burst) / byte_rate * 0.9
        assert sum(c.ae(n).stats.failed for n in c.names) == 0
    finally:
        c.close()


def test_the_key_and_byte_limits_each_hold_where_they_bind() -> None:
    """Both limits on: small copies are held to the key rate, large ones to the byte rate."""
    c = _cluster(25, rate=400.0, byte_rate=200_000.0)
    try:
        c.net.run_for(0.1)
        for name in c.names:
            c.net.run(c.svc[name].stop())
        took = {}
        for size, n in ((8, 400), (4000, 100)):  # 1 s of keys; 2 s of bytes (~4.05 KB a copy)
            for i in range(n):
                key = b"b%d-%d" % (size, i)
                c.put(c.coordinators(key)[0], key, b"v" * size, w=3)
            c.net.run_for(0.5)
            before = c.copies("n3")
            c.stores["n3"].clear()
            c.net.run(c.ae("n3").build())
            took[size] = _timed_exchange(c, "n3", "n1")
            assert c.copies("n3") == c.copies("n1")
            assert len(c.copies("n3")) == len(before)
        assert 0.9 <= took[8] <= 1.6, took  # 400 keys at 400 keys/s (bytes: ~12 KB, no bind)
        # then 500 keys, ~420 KB: the bytes bind (2.1 s), not the keys (1.25 s)
        assert took[4000] >= 1.9, took
    finally:
        c.close()


def test_bad_anti_entropy_limits_are_refused_by_name() -> None:
    from click.testing import CliRunner

    from shmkv.cli import main
    from shmkv.cluster.daemon import Options, check_options
    from shmkv.cluster.errors import ConfigError

    base = ["serve", "--listen", "127.0.0.1:1", "--seeds", "127.0.0.1:1", "--n", "1", "--w", "1", "--r", "1"]
    r = CliRunner().invoke(main, [*base, "--ae-rate", "8MB"])  # the old flag given a size
    assert r.exit_code == 2 and "--ae-bytes-rate 8MB" in r.output, r.output
    r = CliRunner().invoke(main, [*base, "--ae-rate", "lots"])
    assert r.exit_code == 2 and "--ae-rate is keys per second" in r.output, r.output
    r = CliRunner().invoke(main, [*base, "--ae-bytes-rate", "fast"])
    assert r.exit_code == 2 and "--ae-bytes-rate 'fast' is not a size" in r.output, r.output
    ok = {"listen": "127.0.0.1:1", "seeds": ["127.0.0.1:1"], "n": 1, "w": 1, "r": 1}
    for field, value, words in (("ae_bytes_rate", 1000.0, "at least 65536"), ("ae_bytes_rate", float("inf"), "--ae-bytes-rate"),
                                ("ae_rate", -1.0, "--ae-rate must be >= 0"), ("ae_rate", float("nan"), "--ae-rate")):
        with pytest.raises(ConfigError, match=words):
            check_options(Options(**{**ok, field: value}))  # type: ignore[arg-type]
    for field, value in (("ae_bytes_rate", 0.0), ("ae_bytes_rate", 65536.0), ("ae_rate", 0.0)):
        check_options(Options(**{**ok, field: value}))  # type: ignore[arg-type]


def test_trees_regrow_with_their_range_and_compare_across_depths() -> None:
    c = _cluster(23, depth=1, rate=0.0)  # depth 1 holds 512 keys: 700 need depth 2
    try:
        c.net.run_for(0.1)
        c.put_all(700)
        c.net.run_for(2 * INTERVAL)  # the loops' grow step
        for name in c.names:
            ae = c.ae(name)
            assert {t.depth for t in ae.trees.values()} == {2} and ae.stats.regrown == 1
            roots = {r: t.root for r, t in ae.trees.items()}
            c.net.run(ae.build())
            assert {r: t.root for r, t in ae.trees.items()} == roots
        # a wiped node starts at depth 1 again; the exchanges compare it with depth-2 peers
        c.restart("n3", wipe=True)
        _rounds_until(c, c.converged, limit=5)
        # keys removed behind n2's back: found by walking depth-1 against depth-2 trees
        for name in c.names:
            c.net.run(c.svc[name].stop())
        shallow = MerkleTree(1)
        for k, v in c.copies("n1").items():
            shallow.update(k, v)
        c.ae("n1").trees = {r: shallow for r in c.ae("n1").trees}
        gone = sorted(c.copies("n2"))[:5]
        for k in gone:
            c.stores["n2"].delete(k)
        c.net.run(c.ae("n2").build())
        assert c.ae("n2").trees and {t.depth for t in c.ae("n2").trees.values()} == {2}
        assert c.net.run(c.ae("n1").exchange("n2")) == 5
        assert c.copies("n2") == c.copies("n1")
    finally:
        c.close()


def test_malformed_pull_requests_are_refused_by_name(ae_cluster: AECluster) -> None:
    c = ae_cluster
    c.net.run_for(0.1)
    ae = c.ae("n1")
    rng = ["n1", "n2", "n3"]
    top = (1 << 64) - 1
    bad: list[tuple[int, dict[str, Any], str]] = [
        (wire.AE_PULL, {"from": "n2", "range": rng, "spans": []}, "1..256 token spans"),
        (wire.AE_PULL, {"from": "n2", "range": rng, "spans": [[5, 3]]}, "sorted, disjoint"),
        (wire.AE_PULL, {"from": "n2", "range": rng, "spans": [[0, 9], [4, 20]]}, "sorted, disjoint"),
        (wire.AE_PULL, {"from": "n2", "range": rng, "spans": [[0, top + 1]]}, "within 0..2"),
        (wire.AE_PULL, {"from": "n2", "range": rng, "spans": [["a", 1]]}, "two ints"),
        (wire.AE_PULL, {"from": "n2", "range": rng, "spans": [[0, top]], "after": [1]}, "cursor"),
        (wire.AE_PULL, {"from": "n2", "range": rng, "spans": [[0, top]], "max": 10**6}, "max"),
        (wire.AE_PULL, {"range": rng, "spans": [[0, top]]}, "names its sender"),
        (wire.AE_PULL, {"from": "zz", "range": rng, "spans": [[0, top]]}, "holds no copies"),
        (wire.AE_LEAVES, {"range": rng, "idxs": [0], "level": 7}, "leaf level"),
    ]
    for code, fields, match in bad:
        with pytest.raises(BadRequest, match=match):
            c.net.run(ae.handle(code, {**fields, "epoch": 1}))
    reply = c.net.run(ae.handle(wire.AE_PULL, {"from": "n2", "range": rng, "spans": [[0, top]], "epoch": 1}))
    assert reply.fields["items"] == [] and reply.fields["next"] is None
