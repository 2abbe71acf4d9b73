"""A simulated cluster with failure handling: coordinator.Node + gossip.Gossip + handoff.Handoff per
node, over tests/cluster/sim.py's network in virtual time (same seed, same run).

The daemon's wiring (daemon._start_failures) in miniature: one process per node (the owner of
gossip, a LocalBoard), hints in memory unless a directory is given. ``crash`` is SIGKILL (the
node's loops stop, its transport goes away, its store stays for a restart), ``pause`` is SIGSTOP
(nobody reaches it and its loops do not run, but it keeps every bit of state, including the
detector's history, and resumes with it).
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable
from typing import Any

import shmkv
from shmkv.cluster.coordinator import Config, Node
from shmkv.cluster.gossip import Gossip
from shmkv.cluster.handoff import Handoff
from shmkv.cluster.hints import HintStore
from shmkv.cluster.replica import Replica
from shmkv.cluster.ring import Member, Ring
from shmkv.cluster.wire import Message

from .sim import SimNetwork

_seq = itertools.count()
CLIENT = "client:1"
#: the simulated wall clock's origin (ms): generations are "start times" as in the daemon
WALL0 = 1_700_000_000_000


class FailCluster:
    def __init__(self, seed: int, nodes: int = 3, n: int = 3, w: int = 2, r: int = 2,
                 hint_dirs: dict[str, str] | None = None, max_hints: int = 1_000_000,
                 strict: bool = False, dcs: list[str] | None = None,
                 n_per_dc: dict[str, int] | None = None, **knobs: Any) -> None:
        knobs.setdefault("delay", (0.001, 0.010))
        self.net = SimNetwork(seed, **knobs)
        self.seed = seed
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.addr = {name: f"{name}:1" for name in self.names}
        # dcs: each node's data centre (node i in dcs[i]); n_per_dc: the replication map
        self.dc = {name: (dcs[i] if dcs else None) for i, name in enumerate(self.names)}
        self.ring = Ring([Member(name, self.addr[name], dc=self.dc[name]) for name in self.names], 1)
        self.cfg = {name: Config(name, self.addr[name], n=n, w=w, r=r, timeout=0.5, strict=strict,
                                 dc=self.dc[name], n_per_dc=n_per_dc)
                    for name in self.names}
        self.ring = self.ring.with_replication(n_per_dc)
        self.hint_dirs = hint_dirs or {}
        self.max_hints = max_hints
        self.stores: dict[str, shmkv.Store] = {}
        self.nodes: dict[str, Node] = {}
        self.paused: set[str] = set()
        self._starts = itertools.count()
        try:
            for name in self.names:
                self.stores[name] = shmkv.attach(f"failsim.{os.getpid()}.{next(_seq)}", size="16MiB")
                self.start(name)
        except BaseException:
            self.close()
            raise
        self.client = self.net.transport(CLIENT)

    # -- life and death ----------------------------------------------------------------------

    def start(self, name: str) -> Node:
        t = self.net.transport(self.addr[name])
        node = Node(self.cfg[name], t, Replica(self.stores[name], name))
        node.ring = self.ring
        k = next(self._starts)
        node.gossip = Gossip(
            name, self.addr, t, rng=random.Random(self.seed * 1000 + k),
            clock=self.net.loop.time, wall_ms=lambda: WALL0 + int(self.net.loop.time() * 1000),
        )
        hints = HintStore(self.hint_dirs.get(name), max_hints=self.max_hints, fsync=False)
        node.handoff = Handoff(name, hints, t, node._ring, node._alive, n=self.cfg[name].n,
                               timeout=0.5, clock=self.net.loop.time)
        self.net.run(t.serve(self.addr[name], node.handle))
        self.nodes[name] = node
        self.net.run(self._start_loops(node))
        return node

    async def _start_loops(self, node: Node) -> None:
        node.gossip.start()
        node.handoff.start()

    def crash(self, name: str) -> None:
        node = self.nodes[name]
        self.net.run(node.gossip.stop())
        self.net.run(node.handoff.stop())
        node.handoff.hints.close()
        self.net.crash(self.addr[name])

    def pause(self, name: str) -> None:
        """SIGSTOP: cut off both ways, loops stopped, state kept."""
        others = [self.addr[x] for x in self.names if x != name] + [CLIENT]
        self.net.partition([self.addr[name]], others)
        node = self.nodes[name]
        self.net.run(node.gossip.stop())
        self.net.run(node.handoff.stop())
        self.paused.add(name)

    def resume(self, name: str) -> None:
        """SIGCONT: reachable again and its loops run, with the state it had."""
        self.paused.discard(name)
        self.net.heal()
        self.net.run(self._start_loops(self.nodes[name]))

    def close(self) -> None:
        for node in self.nodes.values():
            if node.handoff is not None:
                node.handoff.hints.close()
        self.net.close()
        for kv in self.stores.values():
            nm = kv.name
            kv.close()
            shmkv.unlink(nm)

    # -- looking -----------------------------------------------------------------------------

    def live(self) -> list[str]:
        return [n for n in self.names if n in self.nodes and self.addr[n] in self.net._servers and n not in self.paused]

    def down_views(self) -> dict[str, set[str]]:
        """Per running node: the peers its gossip holds down."""
        return {n: {p for p in self.names if p != n and self.nodes[n].gossip.is_down(p)} for n in self.live()}

    def until(self, cond: Callable[[], bool], limit: float, step: float = 0.1) -> float | None:
        """Run until ``cond()`` (checked every ``step`` virtual s); the virtual time it took, or
        None when ``limit`` passed first."""
        t0 = self.net.now
        while self.net.now - t0 <= limit:
            if cond():
                return self.net.now - t0
            self.net.run_for(step)
        return None

    # -- client requests ---------------------------------------------------------------------

    def request(self, via: str, code: int, timeout: float = 2.0, **fields: Any) -> Message:
        fields.setdefault("epoch", 1)
        return self.net.run(self.client.request(self.addr[via], Message(code, 0, fields), timeout))

    def held(self, name: str, key: bytes) -> list[bytes | None]:
        return self.nodes[name].replica.get(key).values

    def hints(self, name: str) -> dict[str, int]:
        return self.nodes[name].handoff.hints.owners()
