"""The Raft core (cluster/raft/core.py) in the simulation: seeded network, crashes that lose
unpersisted state, partitions; observations for raft.py's checker.

A small event heap in virtual time (the same shape as tests/cluster/raft/harness.py, which also
checks invariants after every step; this one only records what a debug endpoint would show):
every live node ticks once per unit, a message takes 0.1-1.5 units and 5 % are lost, the
storage of each node is what its Ready loop persisted (a crash between a step and its Ready
loses the step's entries, votes and term: the loss of unsynced state). Proposals go to the
current leader; the schedule of partitions, crashes and restarts is drawn from the seed.

Each node's (term, role, commit, log) is observed whenever it changes, as
``[node, term, role, commit, [[term, data], ...]]`` (raft.py's format), and after the faults
heal. ``bug=True`` makes every node a leader that commits its last entry on its own say-so --
"a leader that commits without a majority" -- which the checker must catch.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

from ..cluster.raft.core import Config, RaftNode, Role
from ..cluster.raft.types import Entry, HardState, Message, NotLeader, Ready, Snapshot


@dataclass
class _Storage:
    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot = field(default_factory=Snapshot)
    entries: list[Entry] = field(default_factory=list)

    def persist(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.snapshot, self.entries = rd.snapshot, []
        if rd.entries:
            first = rd.entries[0].index
            self.entries = [e for e in self.entries if e.index < first] + list(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state


class _NoMajority(RaftNode):
    """DELIBERATE BUG: a leader commits whatever it appended, without waiting for a majority."""

    def _maybe_commit(self) -> bool:
        index = self.last_index()
        if self.role == Role.LEADER and index > self.commit and self.term_at(index) == self.term:
            self.commit = index
            self._on_commit()
            return True
        return super()._maybe_commit()


def raft_run(seed: int, *, nodes: int = 3, units: float = 400.0, bug: bool = False) -> list[Any]:
    rng = random.Random(f"raft/{seed}")
    ids = [f"r{i}" for i in range(1, nodes + 1)]
    cfg = Config(seed=seed)
    cls = _NoMajority if bug else RaftNode
    storage = {i: _Storage(snapshot=Snapshot(voters=tuple(ids))) for i in ids}
    live: dict[str, RaftNode] = {}
    events: list[tuple[float, int, str, Any]] = []
    seq = itertools.count()
    blocked: set[tuple[str, str]] = set()
    obs: list[Any] = []
    last_seen: dict[str, tuple[Any, ...]] = {}
    now = 0.0

    def push(at: float, kind: str, payload: Any) -> None:
        heapq.heappush(events, (at, next(seq), kind, payload))

    def observe(n: RaftNode) -> None:
        log = [[e.term, e.data.decode("latin-1")] for e in n.log()]
        role = {Role.LEADER: "leader", Role.CANDIDATE: "candidate"}.get(n.role, "follower")
        key = (n.term, role, n.commit, len(log))
        if last_seen.get(n.id) != key:
            last_seen[n.id] = key
            obs.append([n.id, n.term, role, n.commit, log])

    def start(i: str) -> None:
        st = storage[i]
        live[i] = cls(i, cfg, hard_state=st.hard_state, snapshot=st.snapshot, entries=list(st.entries))
        push(now + rng.random(), "tick", (i, live[i]))

    def ready(i: str) -> None:
        n = live[i]
        while n.has_ready():
            rd = n.ready()
            storage[i].persist(rd)  # durable first, then the messages that acknowledge it
            for m in rd.messages:
                lost = rng.random() < 0.05
                d = rng.uniform(0.1, 1.5)
                if not lost:
                    push(now + d, "msg", m)
            n.advance(rd)
        observe(n)

    for i in ids:
        start(i)
    proposals = 0
    while events and now < units:
        at, _, kind, payload = heapq.heappop(events)
        now = at
        if kind == "tick":
            i, node = payload[0], payload[1]
            assert isinstance(node, RaftNode)
            if live.get(i) is not node:
                continue  # a tick of a crashed incarnation
            node.tick()
            push(at + 1.0, "tick", (i, node))
        else:
            m: Message = payload
            i = m.dst
            if i not in live or (m.src, i) in blocked:
                continue
            live[i].step(m)
        if rng.random() < 0.003 and len(live) == nodes:  # crash between a step and its Ready
            del live[i]
            continue
        ready(i)
        r = rng.random()
        leader = next((n for n in live.values() if n.role == Role.LEADER), None)
        if r < 0.05 and leader is not None and proposals < 60 and now < units * 0.9:
            try:
                leader.propose(b"e%d" % proposals)
                proposals += 1
                ready(leader.id)
            except NotLeader:
                pass
        elif r < 0.052 and now < units * 0.8:
            a = set(rng.sample(ids, 1))
            blocked = {(x, y) for x in ids for y in ids if (x in a) != (y in a)}
        elif r < 0.056:
            blocked = set()
        elif r < 0.058 and len(live) == nodes and now < units * 0.8:
            del live[rng.choice(sorted(live))]
        elif r < 0.064 and len(live) < nodes:
            start(rng.choice(sorted(set(ids) - set(live))))
    # Heal: every node back, the network whole, a little more time, then one look at each.
    blocked = set()
    for i in sorted(set(ids) - set(live)):
        start(i)
    end = now + 60.0
    while events and now < end:
        at, _, kind, payload = heapq.heappop(events)
        now = at
        if kind == "tick":
            i, node = payload[0], payload[1]
            assert isinstance(node, RaftNode)
            if live.get(i) is not node:
                continue
            node.tick()
            push(at + 1.0, "tick", (i, node))
        else:
            i = payload.dst
            if i not in live:
                continue
            live[i].step(payload)
        ready(i)
    for i in ids:
        last_seen.pop(i, None)
        observe(live[i])
    return obs


__all__ = ["raft_run"]
