"""The configuration group's driver over the simulated network (seeded, virtual time).

Scenarios as specs: the founding voters elect a leader and commit the bootstrap ring (the static
epoch-1 ring); a killed leader is replaced; an add committed through a follower is applied on
every node, voters and learners, and raises the epoch; a request routed with the old epoch is
redirected (ERR_WRONG_EPOCH carrying the new ring), never served; refused changes change nothing.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.config_service import ConfigService, default_voters
from shmkv.cluster.coordinator import Config, Node
from shmkv.cluster.errors import ConfigError
from shmkv.cluster.raft.core import Role
from shmkv.cluster.rebalance import Rebalancer
from shmkv.cluster.replica import Replica
from shmkv.cluster.ring import Member, Ring
from shmkv.cluster.wire import Message

from .sim import SimNetwork

_seq = itertools.count()
CLIENT = "client:1"


class Group:
    """Nodes n1..nK on a SimNetwork, each a coordinator plus a ConfigService; the first 3 by name
    vote. ``start`` (re)starts one as the daemon does: epoch-1 ring, then the service."""

    def __init__(self, seed: int, tmp: Path, nodes: int = 4, **knobs: Any) -> None:
        self.net = SimNetwork(seed, **knobs)
        self.tmp = tmp
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.addr = {name: f"{name}:1" for name in self.names}
        self.ring = Ring([Member(name, self.addr[name]) for name in self.names], 1)
        self.voters = default_voters(self.ring)
        self.stores: dict[str, shmkv.Store] = {}
        self.nodes: dict[str, Node] = {}
        self.services: dict[str, ConfigService] = {}
        self.changes: dict[str, list[int]] = {name: [] for name in self.names}
        try:
            for name in self.names:
                self.stores[name] = shmkv.attach(f"cfgtest.{os.getpid()}.{next(_seq)}", size="16MiB")
                self.start(name)
        except BaseException:
            self.close()
            raise
        self.client = self.net.transport(CLIENT)

    def start(self, name: str, ring: Ring | None = None, raft_dir: str | None = None) -> Node:
        cfg = Config(name, self.addr[name], n=3, w=2, r=2, timeout=0.5)
        node = Node(cfg, self.net.transport(self.addr[name]), Replica(self.stores[name], name))
        rebalancer = Rebalancer(node, retry=0.5)

        def on_change(old: Ring | None, new: Ring, name: str = name) -> None:
            self.changes[name].append(new.epoch)
            rebalancer.on_change(old, new)

        svc = ConfigService(node, node.transport, self.voters, raft_dir or str(self.tmp / name),
                            seed=self.net.seed, on_change=on_change)
        self.nodes[name], self.services[name] = node, svc

        async def boot() -> None:  # as the daemon does: the log's ring, else the static one
            if svc.restored() is None:
                node.ring = ring or self.ring
            await node.transport.serve(self.addr[name], node.handle)
            svc.start()

        self.net.run(boot())
        return node

    def crash(self, name: str) -> None:
        self.net.crash(self.addr[name])
        self.net.run(self.services[name].close())

    def close(self) -> None:
        for svc in self.services.values():
            self.net.run(svc.close())
        self.net.close()
        for kv in self.stores.values():
            n = kv.name
            kv.close()
            shmkv.unlink(n)

    def leaders(self, alive: set[str] | None = None) -> list[str]:
        alive = alive or set(self.names)
        return [n for n in self.voters if n in alive and self.services[n].raft is not None
                and self.services[n].raft.role == Role.LEADER]

    def wait_leader(self, alive: set[str] | None = None, within: float = 10.0) -> str:
        end = self.net.now + within
        while self.net.now < end:
            self.net.run_for(0.1)
            found = self.leaders(alive)
            if len(found) == 1 and self.services[found[0]].state is not None:
                return found[0]
        raise AssertionError(f"no leader with a committed configuration within {within} s")

    def request(self, via: str, code: int, timeout: float = 12.0, **fields: Any) -> Message:
        return self.net.run(self.client.request(self.addr[via], Message(code, 0, fields), timeout))

    def epochs(self, names: list[str] | None = None) -> dict[str, int]:
        return {n: self.nodes[n].ring.epoch for n in names or self.names if self.nodes[n].ring is not None}


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    g = Group(seed=3, tmp=tmp_path)
    yield g
    g.close()


def test_voters_elect_one_leader_and_commit_the_static_ring_as_the_bootstrap(group: Group) -> None:
    leader = group.wait_leader()
    assert leader in group.voters
    group.net.run_for(2.0)
    for name in group.voters:
        st = group.services[name].state
        assert st is not None and st.ring == group.ring and st.epoch == 1, name
    assert group.epochs() == dict.fromkeys(group.names, 1)  # the bootstrap changes no node's ring
    st = group.request("n4", wire.CONFIG).fields  # a learner answers too (a --join may ask it)
    assert st["raft"]["voter"] is False and st["raft"]["leader"] == leader
    assert Ring.from_wire(st["config"]["ring"]) == group.ring


def test_a_killed_leader_is_replaced_and_the_configuration_survives(group: Group) -> None:
    first = group.wait_leader()
    term = group.services[first].raft.term
    group.crash(first)
    alive = set(group.names) - {first}
    second = group.wait_leader(alive)
    assert second != first and group.services[second].raft.term > term
    assert group.services[second].state is not None and group.services[second].state.epoch == 1


def test_an_add_sent_to_a_learner_commits_and_every_node_applies_it(group: Group) -> None:
    group.wait_leader()
    new = Member("n5", "n5:1", 2.0, "dc2")
    group.stores["n5"] = shmkv.attach(f"cfgtest.{os.getpid()}.{next(_seq)}", size="16MiB")
    group.addr["n5"] = "n5:1"
    group.changes["n5"] = []
    cmd = {"op": "add", "name": new.name, "addr": new.addr, "weight": 2.0, "dc": "dc2"}
    reply = group.request("n4", wire.CONFIG_CHANGE, cmd=cmd)  # n4 is no voter: forwarded
    assert reply.code == wire.OK, reply
    committed = Ring.from_wire(reply.fields["config"]["ring"])
    assert committed.epoch == 2 and committed.members["n5"] == new
    group.net.run_for(3.0)  # pushed on commit; pulled every second at the latest
    assert group.epochs() == dict.fromkeys(group.names, 2)
    for name in group.names:
        assert group.nodes[name].ring == committed
        assert group.changes[name] == [2], name
    # the new node, started as `--join` does, learns the ring from the group
    group.names.append("n5")
    node = group.start("n5", ring=None)
    node.ring = None
    group.net.run(group.services["n5"].pull(["n4:1"]))
    assert node.ring == committed


def test_a_request_routed_with_the_old_epoch_is_redirected_not_served(group: Group) -> None:
    group.wait_leader()
    old = group.ring
    cmd = {"op": "weight", "name": "n2", "weight": 3.0}
    assert group.request("n1", wire.CONFIG_CHANGE, cmd=cmd).code == wire.OK
    group.net.run_for(3.0)
    key = next(k for k in (f"k{i}".encode() for i in range(1000))
               if old.preference_list(k, 3)[0] in group.names)
    via = old.preference_list(key, 3)[0]
    with pytest.raises(shmkv.cluster.errors.WrongEpoch) as e:
        wire.raise_for_error(group.request(via, wire.PUT, key=key, value=b"v", epoch=old.epoch))
    assert e.value.expected == 2 and e.value.got == 1
    reply = group.net.run(group.nodes[via].handle(
        Message(wire.PUT, 0, {"key": key, "value": b"v", "epoch": old.epoch})))
    assert reply.code == wire.ERR_WRONG_EPOCH
    assert Ring.from_wire(reply.fields["ring"]).epoch == 2  # the redirect carries the new ring
    assert group.nodes[via].replica.get(key).values == []  # nothing was written


def test_a_node_behind_pulls_when_a_request_carries_a_newer_epoch(group: Group) -> None:
    group.wait_leader()
    group.services["n4"].pull_interval = 1000.0  # only the trigger can make it pull now
    group.net.partition({group.addr["n4"]}, set(group.addr.values()) - {group.addr["n4"]})
    assert group.request("n1", wire.CONFIG_CHANGE, cmd={"op": "weight", "name": "n1", "weight": 2.0}).code == wire.OK
    group.net.run_for(3.0)
    group.net.heal()
    group.net.run_for(3.0)  # any pull that was under way has ended
    assert group.epochs()["n4"] == 1
    with pytest.raises(shmkv.cluster.errors.WrongEpoch):  # n4 is behind: redirect, then learn
        group.request("n4", wire.GET, key=b"x", epoch=2)
    group.net.run_for(0.5)  # well within PULL_INTERVAL: the newer epoch triggered the pull
    assert group.epochs()["n4"] == 2


def test_bad_changes_are_refused_by_name_and_nothing_moves(group: Group) -> None:
    group.wait_leader()
    cases = [
        ({"op": "add", "name": "n2", "addr": "elsewhere:1"}, "already a member"),
        ({"op": "add", "name": "n9", "addr": "n3:1"}, "n3 is already there"),
        ({"op": "remove", "name": "nobody"}, "not a member"),
        ({"op": "weight", "name": "n1", "weight": -1}, "weight must be > 0"),
        ({"op": "remove", "name": "n1"}, "configuration voter"),
    ]
    for cmd, why in cases:
        with pytest.raises(ConfigError, match=why):
            wire.raise_for_error(group.request("n2", wire.CONFIG_CHANGE, cmd=cmd))
    assert group.request("n1", wire.CONFIG_CHANGE, cmd={"op": "remove", "name": "n4"}).code == wire.OK
    with pytest.raises(ConfigError, match="fewer than N=3"):  # 3 members left: N=3 needs them all
        wire.raise_for_error(group.request("n1", wire.CONFIG_CHANGE, cmd={"op": "remove", "name": "n3"}))
    group.net.run_for(2.0)
    assert set(group.epochs(group.voters).values()) == {2}


def test_a_voter_restarts_from_its_log_at_the_latest_epoch(group: Group) -> None:
    group.wait_leader()
    assert group.request("n1", wire.CONFIG_CHANGE, cmd={"op": "weight", "name": "n3", "weight": 2.0}).code == wire.OK
    group.net.run_for(2.0)
    victim = next(v for v in group.voters if group.services[v].raft.role != Role.LEADER)
    group.crash(victim)
    node = group.start(victim, ring=None)  # no seeds: the log alone gives the ring
    assert node.ring is not None and node.ring.epoch == 2
    assert node.ring.members["n3"].weight == 2.0


def test_same_seed_same_leader(tmp_path: Path) -> None:
    got = []
    for run in range(2):
        g = Group(seed=11, tmp=tmp_path / str(run))
        try:
            got.append((g.wait_leader(), g.net.now))
        finally:
            g.close()
    assert got[0] == got[1]


def test_a_removed_node_s_copies_reach_the_new_owners(group: Group) -> None:
    group.wait_leader()
    keys = [f"key{i}".encode() for i in range(60)]
    for k in keys:
        via = group.ring.preference_list(k, 3)[0]
        assert group.request(via, wire.PUT, key=k, value=b"v-" + k, epoch=1, w=3).code == wire.OK
    held_by_n4 = [k for k in keys if "n4" in group.ring.preference_list(k, 3)]
    assert held_by_n4
    assert group.request("n2", wire.CONFIG_CHANGE, cmd={"op": "remove", "name": "n4"}).code == wire.OK
    group.net.run_for(5.0)
    new = group.nodes["n1"].ring
    assert new.epoch == 2 and "n4" not in new.members
    for k in held_by_n4:
        for owner in new.preference_list(k, 3):
            assert group.nodes[owner].replica.get(k).values == [b"v-" + k], (k, owner)


@pytest.mark.parametrize("seed", [5, 6])
def test_a_change_commits_everywhere_over_a_lossy_network(tmp_path: Path, seed: int) -> None:
    g = Group(seed=seed, tmp=tmp_path, drop=0.1, delay=(0.001, 0.05))
    try:
        g.wait_leader(within=30.0)
        cmd = {"op": "weight", "name": "n4", "weight": 3.0}
        for _ in range(20):  # a lost request or reply is retried, as the CLI does
            try:
                reply = g.request("n2", wire.CONFIG_CHANGE, timeout=5.0, cmd=cmd)
            except Exception as e:  # noqa: BLE001 -- timeouts and "no leader": retry
                if "already has weight" in str(e):
                    break
                continue
            if reply.code == wire.OK:
                break
        end = g.net.now + 30.0
        while g.net.now < end and set(g.epochs().values()) != {2}:
            g.net.run_for(0.5)
        assert g.epochs() == dict.fromkeys(g.names, 2)
        assert all(g.nodes[n].ring.members["n4"].weight == 3.0 for n in g.names)
    finally:
        g.close()
