"""Pending ranges while copies move (cluster_config.Move, Node.moving, rebalance.py).

The state machine first (pure): a ring change starts a move that waits for the old owners still
in the ring, refuses another ring change until they have all reported, and ends with the last
report. Then the coordinators over the simulated network (seeded, virtual time): while a move
is on and no copy has been pushed yet, a read through a new owner -- even at R=1 -- is answered
from the old owners and misses nothing acknowledged (the same read without the move's routing
misses: the test can fail); a write during the move lands on W old and W new owners; once every
old owner has pushed and reported, the move ends everywhere and the new owner serves the keys
itself. A pusher stopped mid-move resumes after its cursor in the Store.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.cluster_config import ClusterConfig, apply, bootstrap_command
from shmkv.cluster.config_service import ConfigService
from shmkv.cluster.coordinator import Config, Node
from shmkv.cluster.errors import ConfigError, ProtocolError, WrongEpoch
from shmkv.cluster.raft.core import Role
from shmkv.cluster.rebalance import PROGRESS_KEY, Rebalancer, moving_ranges, parse_rate
from shmkv.cluster.replica import Replica
from shmkv.cluster.ring import Member, Ring
from shmkv.cluster.transport import Unreachable
from shmkv.cluster.wire import Message

from .test_config_service import Group, _seq

# -- the state machine ---------------------------------------------------------------------------


def _base(members: int = 4, moves: bool = True) -> ClusterConfig:
    ring = Ring([Member(f"n{i + 1}", f"n{i + 1}:1") for i in range(members)], 1)
    state, why = apply(None, bootstrap_command(ring, 3, 2, 2, moves=moves))
    assert why is None and state is not None
    return state


def test_consistency_levels_are_replicated_defaults_and_bad_ones_are_refused() -> None:
    # --w/--r may be level names with the configuration group: they travel in the replicated
    # configuration like counts, and a bootstrap or a stored form with another value is refused
    ring = Ring([Member(f"n{i + 1}", f"n{i + 1}:1", dc="ab"[i % 2]) for i in range(4)], 1)
    state, why = apply(None, bootstrap_command(ring, 4, "local_quorum", "quorum", moves=True))
    assert why is None and state is not None and (state.w, state.r) == ("local_quorum", "quorum")
    assert ClusterConfig.from_wire(state.to_wire()) == state
    assert ClusterConfig.decode(state.encode()) == state
    for w in ("bogus", 0, -1, True, 1.5, None):
        _, why = apply(None, bootstrap_command(ring, 4, w, 2))  # type: ignore[arg-type]
        assert why is not None and "bad bootstrap" in why, w
        with pytest.raises(ProtocolError, match="W and R ints > 0 or one of"):
            ClusterConfig.from_wire({**state.to_wire(), "w": w})
    # a removal at a level: judged on the safe side -- the removed node reports its push too,
    # unless the level is "all" (no write lives on one replica alone)
    for w, waited in (("quorum", True), ("local_quorum", True), ("one", True), ("all", False), (2, False)):
        st = ClusterConfig(state.ring, 3, w, 2, moves=True)
        after, why = apply(st, {"op": "remove", "name": "n2"})
        assert why is None and after is not None and after.moving is not None
        assert ("n2" in after.moving.waiting) is waited, w


def test_a_ring_change_starts_a_move_that_ends_with_the_last_old_owners_report() -> None:
    s1 = _base()
    s2, why = apply(s1, {"op": "add", "name": "n5", "addr": "n5:1"})
    assert why is None and s2 is not None and s2.epoch == 2
    assert s2.moving is not None and s2.moving.epoch == 2 and s2.moving.ring == s1.ring
    assert s2.moving.waiting == {"n1", "n2", "n3", "n4"}  # the old owners; not the new node
    refused, why = apply(s2, {"op": "weight", "name": "n1", "weight": 2.0})
    assert refused is s2 and why is not None and "in progress" in why and "n1, n2, n3, n4" in why
    _, why = apply(s2, {"op": "streamed", "name": "n5", "move": 2})
    assert why is not None and "not among" in why
    _, why = apply(s2, {"op": "streamed", "name": "n1", "move": 1})
    assert why is not None and "is over" in why
    s = s2
    for i, name in enumerate(["n3", "n1", "n4", "n2"]):
        s, why = apply(s, {"op": "streamed", "name": name, "move": 2})
        assert why is None and s is not None and s.epoch == 3 + i
        assert s.ring.members == s2.ring.members  # reports move nothing
    assert s.moving is None
    assert ClusterConfig.from_wire(s2.to_wire()) == s2  # the move travels with the configuration
    s3, why = apply(s, {"op": "remove", "name": "n2"})
    assert why is None and s3 is not None and s3.moving is not None
    assert s3.moving.waiting == {"n1", "n3", "n4", "n5"}  # the removed node is not waited for
    w1 = ClusterConfig(s.ring, 3, 1, 3, moves=True)  # W=1: a write may live on the removed node only
    s4, _ = apply(w1, {"op": "remove", "name": "n2"})
    assert s4 is not None and s4.moving is not None and "n2" in s4.moving.waiting
    forced, why = apply(s3, {"op": "streamed", "force": True, "move": s3.epoch})
    assert why is None and forced is not None and forced.moving is None


def test_without_moves_changes_apply_at_once_as_before() -> None:
    s1 = _base(moves=False)
    s2, _ = apply(s1, {"op": "add", "name": "n5", "addr": "n5:1"})
    assert s2 is not None and s2.moving is None
    s3, why = apply(s2, {"op": "weight", "name": "n1", "weight": 2.0})
    assert why is None and s3 is not None and s3.epoch == 3
    assert "moves" not in s1.to_wire() and "moving" not in s2.to_wire()  # the old wire form


def test_stream_rate_is_bytes_per_second_and_bad_values_are_refused() -> None:
    assert parse_rate("20M") == 20e6 and parse_rate("500k") == 500e3 and parse_rate("1000") == 1000.0
    for bad in ("0", "-1M", "fast", "", "inf", "nan"):
        with pytest.raises(ConfigError, match="--stream-rate"):
            parse_rate(bad)
    assert issubclass(ConfigError, shmkv.Error)


def test_moving_ranges_counts_the_ranges_whose_owners_change() -> None:
    s1 = _base()
    s2, _ = apply(s1, {"op": "add", "name": "n5", "addr": "n5:1"})
    assert s2 is not None
    moved = moving_ranges(s1.ring, s2.ring, 3)
    assert 0 < moved < len(s2.ring._tokens)
    assert moving_ranges(s1.ring, s1.ring, 3) == 0


# -- coordinators over the simulated network -----------------------------------------------------


class MoveGroup(Group):
    """Group with each node's rebalancer kept (``rebalancers``) and able to report."""

    def __init__(self, seed: int, tmp: Path, **knobs: Any) -> None:
        self.rebalancers: dict[str, Rebalancer] = {}
        self.pushing = False  # pushers stay idle until a test lets them run
        super().__init__(seed, tmp, **knobs)

    def start(self, name: str, ring: Ring | None = None, raft_dir: str | None = None) -> Node:
        cfg = Config(name, self.addr[name], n=3, w=2, r=2, timeout=0.5)
        node = Node(cfg, self.net.transport(self.addr[name]), Replica(self.stores[name], name))
        rb = Rebalancer(node, retry=0.5, timeout=0.5)
        self.rebalancers[name] = rb

        def on_change(old: Ring | None, new: Ring) -> None:
            self.changes[name].append(new.epoch)
            if self.pushing:
                rb.on_change(old, new)

        svc = ConfigService(node, node.transport, self.voters, raft_dir or str(self.tmp / name),
                            seed=self.net.seed, on_change=on_change)
        rb.report = svc.change
        self.nodes[name], self.services[name] = node, svc

        async def boot() -> None:
            if svc.restored() is None and ring is not None:
                node.ring = ring
            elif node.ring is None and name in self.ring.members:
                node.ring = self.ring
            await node.transport.serve(self.addr[name], node.handle)
            svc.start()

        self.net.run(boot())
        return node

    def leaders(self, alive: set[str] | None = None) -> list[str]:
        """Leaders among every node (the voter set may change here)."""
        alive = alive or set(self.names)
        return [n for n in self.names if n in alive and self.services[n].raft is not None
                and self.services[n].raft.role == Role.LEADER]

    def add_node(self, name: str) -> None:
        self.stores[name] = shmkv.attach(f"cfgtest.{os.getpid()}.{next(_seq)}", size="16MiB")
        self.addr[name] = f"{name}:1"
        self.changes[name] = []
        cmd = {"op": "add", "name": name, "addr": self.addr[name]}
        assert self.request("n4", wire.CONFIG_CHANGE, cmd=cmd).code == wire.OK
        self.names.append(name)
        self.start(name)
        self.net.run(self.services[name].pull(["n1:1"]))
        self.net.run_for(2.0)

    def let_push(self) -> None:
        self.pushing = True

        async def kick() -> None:
            for name in self.names:
                node = self.nodes[name]
                if node.ring is not None:
                    self.rebalancers[name].on_change(None, node.ring)

        self.net.run(kick())


@pytest.fixture
def mg(tmp_path: Path) -> Iterator[MoveGroup]:
    g = MoveGroup(seed=4, tmp=tmp_path)
    yield g
    g.close()


def _put(g: Group, key: bytes, value: bytes, ring: Ring, **kw: Any) -> None:
    via = ring.preference_list(key, 3)[0]
    assert g.request(via, wire.PUT, key=key, value=value, epoch=ring.epoch, **kw).code == wire.OK


def _get(g: Group, via: str, key: bytes, **kw: Any) -> list[bytes]:
    ring = g.nodes[via].ring
    reply = wire.raise_for_error(g.request(via, wire.GET_VERSIONS, key=key, epoch=ring.epoch, **kw))
    return list(reply.fields["values"])


def test_reads_of_a_moving_range_are_answered_by_the_old_owners_until_the_push(mg: MoveGroup) -> None:
    mg.wait_leader()
    keys = [f"key{i}".encode() for i in range(200)]
    for k in keys:
        _put(mg, k, b"v-" + k, mg.ring, w=3)
    mg.add_node("n5")
    new = mg.nodes["n1"].ring
    mv = mg.nodes["n1"].moving
    assert mv is not None and new.epoch == 2 and mv.epoch == 2
    assert all(mg.nodes[n].moving == mv for n in mg.names)  # every node learnt the move
    gained = [k for k in keys if "n5" in new.preference_list(k, 3)]
    assert len(gained) > 10
    assert all(mg.nodes["n5"].replica.get(k).values == [] for k in gained)  # nothing pushed yet
    # the control first: a read routed by the new ring alone misses (the test can fail)
    saved, mg.nodes["n5"].moving = mg.nodes["n5"].moving, None
    try:
        assert _get(mg, "n5", gained[-1], r=1) == []
    finally:
        mg.nodes["n5"].moving = saved
    for k in gained:  # R=1 through the new owner: a read of its own (empty) copy would miss
        assert _get(mg, "n5", k, r=1) == [b"v-" + k], k
    # a write during the move: on W of the old owners and W of the new ones
    k = gained[0]
    assert mg.request("n5", wire.PUT, key=k, value=b"during", epoch=new.epoch, w=2).code == wire.OK
    mg.net.run_for(1.0)
    for owners in (mv.ring.preference_list(k, 3), new.preference_list(k, 3)):
        holding = [o for o in owners if b"during" in mg.nodes[o].replica.get(k).values]
        assert len(holding) >= 2, (owners, holding)
    # a ring change while the move is on is refused, naming who is awaited
    with pytest.raises(ConfigError, match="in progress.*waiting for n1, n2, n3, n4"):
        wire.raise_for_error(mg.request("n1", wire.CONFIG_CHANGE, cmd={"op": "weight", "name": "n2", "weight": 2.0}))
    # now the old owners push and report; the move ends on every node
    mg.let_push()
    end = mg.net.now + 30.0
    while mg.net.now < end and any(mg.nodes[n].moving is not None for n in mg.names):
        mg.net.run_for(0.5)
    assert all(mg.nodes[n].moving is None for n in mg.names)
    assert len({mg.nodes[n].ring.epoch for n in mg.names}) == 1
    assert mg.nodes["n1"].ring.epoch == 2 + 4  # one report per old owner
    for k2 in gained:  # the new owner holds every copy itself now (the fast path reads it)
        want = [b"during"] if k2 == k else [b"v-" + k2]
        assert mg.nodes["n5"].replica.get(k2).values == want, k2
        assert _get(mg, "n5", k2, r=1) == want
    st = mg.rebalancers["n1"].progress
    assert st["state"] == "idle" and st["report"] == "committed" and st["keys_sent"] > 0


def test_a_request_with_a_far_future_epoch_is_refused_and_writes_nothing(mg: MoveGroup) -> None:
    mg.wait_leader()
    key = b"far"
    via = mg.ring.preference_list(key, 3)[0]
    with pytest.raises(WrongEpoch) as e:
        wire.raise_for_error(mg.request(via, wire.PUT, key=key, value=b"v", epoch=10**9))
    assert e.value.got == 10**9 and e.value.expected == 1 and isinstance(e.value, shmkv.Error)
    with pytest.raises(WrongEpoch):  # a replica request too
        wire.raise_for_error(mg.request(via, wire.REPLICA_PUT, key=key, epoch=10**9,
                                        versions=mg.nodes[via].replica.get(b"other").to_wire()))
    mg.net.run_for(1.5)  # the pull it triggered found nothing newer: the ring stays
    assert all(mg.nodes[n].replica.get(key).values == [] for n in mg.names)
    assert mg.epochs() == dict.fromkeys(mg.names, 1)


class _FlakyTransport:
    """Wraps a transport: REPLICA_PUT_MANY fails after ``ok`` successes (a pusher cut off)."""

    def __init__(self, inner: Any, ok: int) -> None:
        self.inner, self.ok = inner, ok

    async def request(self, addr: str, msg: Message, timeout: float) -> Message:
        if msg.code == wire.REPLICA_PUT_MANY:
            if self.ok <= 0:
                raise Unreachable(f"{addr}: cut off (test)", sent=False)
            self.ok -= 1
        return await self.inner.request(addr, msg, timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_push_cut_off_mid_move_resumes_after_its_cursor(mg: MoveGroup) -> None:
    mg.wait_leader()
    keys = [f"key{i}".encode() for i in range(400)]
    for k in keys:
        _put(mg, k, b"v-" + k, mg.ring, w=3)
    mg.add_node("n5")
    node = mg.nodes["n1"]
    mv = node.moving
    assert mv is not None
    real = node.transport
    rb = Rebalancer(node, batch=16, retry=0.1, attempts=2, timeout=0.5)
    node.transport = _FlakyTransport(real, ok=3)  # type: ignore[assignment]
    try:
        assert mg.net.run(rb._pass(mv)) is False  # cut off after 3 batches
    finally:
        node.transport = real
    first = rb.progress["keys_sent"]
    assert first == 3 * 16 and isinstance(node.replica.store.get(PROGRESS_KEY), bytes)
    again = Rebalancer(node, batch=16, retry=0.1, timeout=0.5)  # as after a restart: the Store's cursor
    assert mg.net.run(again._pass(mv)) is True
    assert again.progress["resumed_after"] == first
    assert again.progress["to_scan"] < len([k for k in node.replica.store.keys() if k[:1] == b"v"])
    n1_gains = [k for k in keys if "n1" in mv.ring.preference_list(k, 3)
                and "n5" in node.ring.preference_list(k, 3)]
    assert n1_gains and all(mg.nodes["n5"].replica.get(k).values == [b"v-" + k] for k in n1_gains)
    assert again.progress["keys_sent"] == len(n1_gains)  # nothing sent twice across the restart


def test_gossip_follows_a_ring_change() -> None:
    import random

    from shmkv.cluster.liveness import Gossiper

    g = Gossiper("n1", 1, {"n1": "a:1", "n2": "b:1", "n3": "c:1"}, random.Random(0))
    assert g.peers == ["n2", "n3"]
    g.set_members({"n2": "b:1", "n3": "c:1", "n4": "d:1"}, now=5.0)  # n4 added; n1 keeps itself
    assert g.peers == ["n2", "n3", "n4"] and "n4" in g.detector.peers
    assert g.receive([["n4", 7, 1]], now=5.5) == []  # a new member's gossip is taken, not refused
    g.set_members({"n1": "a:1", "n2": "b:1", "n4": "d:1"}, now=6.0)  # n3 removed
    assert g.peers == ["n2", "n4"] and "n3" not in g.detector.peers


def test_voters_are_added_and_removed_one_at_a_time(mg: MoveGroup) -> None:
    mg.wait_leader()

    def change(via: str, **cmd: Any) -> Message:
        return wire.raise_for_error(mg.request(via, wire.CONFIG_CHANGE, cmd=cmd))

    with pytest.raises(ConfigError, match="not a member"):
        change("n2", op="voter", action="add", name="nobody")
    with pytest.raises(ConfigError, match="is a configuration voter; first"):
        change("n2", op="remove", name="n1")
    change("n4", op="voter", action="add", name="n4")  # n4 is a learner: forwarded to the leader
    mg.net.run_for(3.0)
    assert mg.services["n4"].raft is not None and sorted(mg.services["n4"].raft.voters) == ["n1", "n2", "n3", "n4"]
    assert all(mg.services[n].voters == ("n1", "n2", "n3", "n4") for n in mg.names)
    with pytest.raises(ConfigError, match="already a configuration voter"):
        change("n1", op="voter", action="add", name="n4")
    change("n3", op="voter", action="remove", name="n1")
    mg.net.run_for(3.0)
    for n in ("n2", "n3", "n4"):
        assert sorted(mg.services[n].raft.voters) == ["n2", "n3", "n4"], n
    assert mg.services["n1"].status()["voter"] is False
    # the new group commits without n1: kill its leader, a ring change still goes through
    lead = mg.wait_leader({"n2", "n3", "n4"})
    if lead != "n1":
        mg.crash(lead)
    rest = {"n2", "n3", "n4"} - {lead}
    mg.wait_leader(rest | ({"n1"} if lead == "n1" else set()))
    via = sorted(rest)[0]
    assert mg.request(via, wire.CONFIG_CHANGE, cmd={"op": "weight", "name": "n2", "weight": 2.0}).code == wire.OK
    assert mg.services[via].state.ring.members["n2"].weight == 2.0


def test_a_removed_node_serves_its_old_copies_until_the_move_ends_and_is_not_waited_for(mg: MoveGroup) -> None:
    mg.wait_leader()
    keys = [f"key{i}".encode() for i in range(120)]
    for k in keys:
        _put(mg, k, b"v-" + k, mg.ring, w=3)
    assert mg.request("n2", wire.CONFIG_CHANGE, cmd={"op": "remove", "name": "n4"}).code == wire.OK
    mg.net.run_for(2.0)
    mv = mg.nodes["n1"].moving
    assert mv is not None and mv.waiting == {"n1", "n2", "n3"}  # n4 (removed) is not awaited
    assert mg.nodes["n4"].moving == mv  # the removed node learnt the move: it serves its copies
    held = [k for k in keys if "n4" in mv.ring.preference_list(k, 3)]
    assert held
    # every old owner but n4 loses its copy of one key: only the removed node still has it
    k = held[0]
    for o in mv.ring.preference_list(k, 3):
        if o != "n4":
            del mg.stores[o][b"v" + k]
    new = mg.nodes["n1"].ring
    via = new.preference_list(k, 3)[0]
    assert _get(mg, via, k, r=3) == [b"v-" + k]  # R=3 of the old owners: the removed one answers too
    mg.crash("n4")  # gone mid-move: the other old owners answer (R=2 of the old three)
    for k2 in held[1:10]:
        assert _get(mg, new.preference_list(k2, 3)[0], k2) == [b"v-" + k2]
    mg.let_push()
    end = mg.net.now + 30.0
    while mg.net.now < end and any(mg.nodes[n].moving is not None for n in ("n1", "n2", "n3")):
        mg.net.run_for(0.5)
    assert all(mg.nodes[n].moving is None for n in ("n1", "n2", "n3"))  # ended without n4's report
    for k2 in held:  # its copies reached the new owners (from the remaining old owners)
        if k2 != k:
            for o in new.preference_list(k2, 3):
                assert mg.nodes[o].replica.get(k2).values == [b"v-" + k2], (k2, o)


def test_a_node_still_in_the_move_reads_a_write_made_after_the_move_ended_elsewhere(mg: MoveGroup) -> None:
    """The end of a move reaches nodes one by one: a write coordinated by a node that has learnt
    it goes to W *new* owners only. A reader still in the move asks R old AND R new owners, so it
    sees that write; R old owners alone would miss it (the control)."""
    mg.wait_leader()
    mg.add_node("n5")
    mv = mg.nodes["n1"].moving
    new = mg.nodes["n1"].ring
    assert mv is not None
    # a key whose owners go from {a, b, c} to {a, b, n5}, with a coordinator a
    k = next(k for k in (f"key{i}".encode() for i in range(2000))
             if "n5" in new.preference_list(k, 3) and new.preference_list(k, 3)[0] != "n5")
    a, b = [o for o in new.preference_list(k, 3) if o != "n5"]
    c = next(o for o in mv.ring.preference_list(k, 3) if o not in (a, b))
    mg.nodes[a].moving = None  # a has learnt the end of the move; b and c have not
    mg.net.partition({mg.addr[b]}, set(mg.addr.values()) - {mg.addr[b]})
    assert mg.request(a, wire.PUT, key=k, value=b"late", epoch=new.epoch, w=2).code == wire.OK
    mg.net.run_for(2.0)
    mg.net.heal()
    mg.nodes[a].moving = mv
    assert [o for o in (a, b, c, "n5") if b"late" in mg.nodes[o].replica.get(k).values] == [a, "n5"]
    mg.nodes[a].suspects.clear()
    mg.nodes[b].suspects.clear()
    mg.nodes[c].suspects.clear()
    old_only = mg.net.run(mg.nodes[b].read(k, [b, c], 2, 1.0))  # the control: R=2 of the old b, c
    assert b"late" not in old_only.values
    assert _get(mg, b, k, r=2) == [b"late"]  # b, still in the move: R old and R new
    mg.net.run_for(2.0)  # the reads' repairs finish before the network closes
