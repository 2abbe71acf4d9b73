"""A small deterministic driver for RaftNode: a seeded network in virtual time, crashes that lose
what was not persisted, and the Raft paper's properties checked after every step.

Why not tests/cluster/sim.py's ``add_machine``: that network carries wire.Message frames and
ticks machines from asyncio timers; Raft's own Message is a dataclass, and the checker here has
to run between *every* two events and to crash a node between its step and its Ready (the only
window in which unpersisted state exists). A 150-line heap of events does both.

Time: every live node ticks once per virtual unit (at offsets drawn per node), a message takes
``delay`` units. With election_ticks=10 an election takes ~10-20 units.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from shmkv.cluster.raft.core import Config, RaftNode, Role
from shmkv.cluster.raft.log import DurableLog
from shmkv.cluster.raft.types import (
    ConfChange,
    Entry,
    HardState,
    Message,
    NotLeader,
    ProposalRefused,
    Ready,
    Snapshot,
)


class PropertyViolation(AssertionError):
    """One of Raft's safety properties failed; the message names it and the evidence."""


class Storage(Protocol):
    hard_state: HardState
    snapshot: Snapshot
    entries: list[Entry]

    def persist(self, rd: Ready) -> None: ...
    def save_snapshot(self, s: Snapshot, *, keep_matching: bool = True) -> None: ...


@dataclass
class MemStorage:
    """What a node's durable log holds: the same rules as log.DurableLog.persist, in memory."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot = field(default_factory=Snapshot)
    entries: list[Entry] = field(default_factory=list)

    def persist(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.save_snapshot(rd.snapshot, keep_matching=False)
        if rd.entries:
            first = rd.entries[0].index
            self.entries = [e for e in self.entries if e.index < first] + list(rd.entries)
        if rd.hard_state is not None:
            self.hard_state = rd.hard_state

    def save_snapshot(self, s: Snapshot, *, keep_matching: bool = True) -> None:
        at = [e for e in self.entries if e.index == s.index]
        keep = keep_matching and at and at[0].term == s.term
        self.snapshot = s
        self.entries = [e for e in self.entries if e.index > s.index] if keep else []


def _digest(prev: bytes, e: Entry) -> bytes:
    return hashlib.blake2b(
        prev + b"%d/%d/%d/" % (e.index, e.term, e.kind) + e.data, digest_size=8
    ).digest()


@dataclass
class StateMachine:
    """The applied state: how far, and a running digest of every entry applied (so two nodes
    agree iff they applied the same sequence)."""

    index: int = 0
    digest: bytes = b""

    def encode(self) -> bytes:
        return b"%d:" % self.index + self.digest.hex().encode()

    @staticmethod
    def decode(data: bytes) -> StateMachine:
        if not data:
            return StateMachine()
        i, _, d = data.partition(b":")
        return StateMachine(int(i), bytes.fromhex(d.decode()))


class Checker:
    """Election safety, log matching, leader completeness, state machine safety, and reads.

    What it remembers is global history, so a property is checked against everything that ever
    happened, not only the present state:
    - ``leaders``: term -> the node that led it (election safety: at most one per term);
    - ``entries``: (index, term) -> (kind, data, term of index-1): log matching by induction --
      two logs holding an entry with the same index and term hold the same entry and agree on
      the term of the previous one, hence on the whole prefix;
    - ``committed``: index -> (entry term, term of the leader era it was first seen committed in);
      a leader of a later term must hold it (leader completeness);
    - ``applied``: index -> digest of the applied prefix (state machine safety).
    """

    def __init__(self) -> None:
        self.leaders: dict[int, str] = {}
        self.entries: dict[tuple[int, int], tuple[int, bytes, int | None]] = {}
        self.committed: dict[int, tuple[int, int]] = {}
        self.applied: dict[int, bytes] = {}
        self.max_commit = 0

    def check_node(self, n: RaftNode) -> None:
        n.check_invariants()
        if n.role == Role.LEADER:
            prev = self.leaders.setdefault(n.term, n.id)
            if prev != n.id:
                raise PropertyViolation(
                    f"election safety: {prev} and {n.id} both led term {n.term}"
                )
        prev_term: int | None = n.snapshot.term
        for e in n.log():
            key = (e.index, e.term)
            val = (int(e.kind), e.data, prev_term)
            seen = self.entries.setdefault(key, val)
            if seen != val:
                raise PropertyViolation(
                    f"log matching: {n.id} holds {key} = {val}, another node held {seen}"
                )
            prev_term = e.term
        era = n.term
        for i in range(max(n.snapshot.index + 1, 1), n.commit + 1):
            t = n.term_at(i)
            assert t is not None
            seen_c = self.committed.setdefault(i, (t, era))
            if seen_c[0] != t:
                raise PropertyViolation(
                    f"state machine safety: index {i} committed with term {seen_c[0]} elsewhere, "
                    f"{n.id} committed term {t}"
                )
        self.max_commit = max(self.max_commit, n.commit)
        if n.role == Role.LEADER:
            for i, (t, era_c) in self.committed.items():
                if era_c < n.term and i > n.snapshot.index and n.term_at(i) != t:
                    raise PropertyViolation(
                        f"leader completeness: leader {n.id} of term {n.term} lacks committed "
                        f"entry {i} (term {t}); it has {n.term_at(i)}"
                    )

    def check_apply(self, node: str, sm: StateMachine) -> None:
        seen = self.applied.setdefault(sm.index, sm.digest)
        if seen != sm.digest:
            raise PropertyViolation(
                f"state machine safety: {node} applied a different entry sequence up to {sm.index}"
            )


@dataclass
class Read:
    node: str
    context: bytes
    floor: int  # every index committed anywhere when the read was asked
    index: int | None = None


class Cluster:
    """Nodes, their storages and state machines, a network, and the checker."""

    def __init__(
        self,
        seed: int,
        voters: list[str],
        *,
        spares: list[str] = (),  # type: ignore[assignment]
        drop: float = 0.0,
        delay: tuple[float, float] = (0.1, 1.5),
        config: Config | None = None,
        disk: Path | None = None,
    ) -> None:
        """:param disk: keep each node's state in a real DurableLog under this directory
        (fsync and all), and restart crashed nodes from what is on disk."""
        self.rng = random.Random(seed)
        self.seed = seed
        self.drop = drop
        self.delay = delay
        self.cfg = config or Config(seed=seed)
        self.now = 0.0
        self._seq = itertools.count()
        self._events: list[tuple[float, int, str, object]] = []
        self.storage: dict[str, Storage] = {}
        self.disk = disk
        self.sm: dict[str, StateMachine] = {}
        self.nodes: dict[str, RaftNode] = {}
        self.down: set[str] = set()
        self.blocked: set[tuple[str, str]] = set()
        self.checker = Checker()
        self.reads: dict[bytes, Read] = {}
        self.trace: list[str] = []
        # A broken caller, for the checker's own test: sends a Ready's messages and crashes
        # before persisting it (the durability contract says: persist first).
        self.send_before_persist = False
        for i in [*voters, *spares]:
            founding = Snapshot(voters=tuple(sorted(voters))) if i in voters else Snapshot()
            if disk is None:
                self.storage[i] = MemStorage(snapshot=founding)
            else:
                d = DurableLog(disk / i)
                d.save_snapshot(founding)
                d.close()
        for i in [*voters, *spares]:
            self._start(i)

    def close(self) -> None:
        for st in self.storage.values():
            if isinstance(st, DurableLog):
                st.close()

    # -- nodes ------------------------------------------------------------------------------

    def _start(self, i: str) -> None:
        if self.disk is not None:  # a restart reads the directory afresh, as a new process would
            old = self.storage.get(i)
            if isinstance(old, DurableLog):
                old.close()
            self.storage[i] = DurableLog(self.disk / i)
        st = self.storage[i]
        self.nodes[i] = RaftNode(
            i, self.cfg, hard_state=st.hard_state, snapshot=st.snapshot, entries=list(st.entries)
        )
        self.sm[i] = StateMachine.decode(st.snapshot.data)
        self.down.discard(i)
        self._push(self.now + self.rng.random(), "tick", i)

    def crash(self, i: str) -> None:
        """Lose everything not persisted: the node object goes, its storage stays."""
        self.down.add(i)
        self.trace.append(f"{self.now:.2f} crash {i}")

    def restart(self, i: str) -> None:
        self.trace.append(f"{self.now:.2f} restart {i}")
        self._start(i)

    def partition(self, *groups: set[str]) -> None:
        for a in groups:
            for b in groups:
                if a is not b:
                    self.blocked |= {(x, y) for x in a for y in b}

    def heal(self) -> None:
        self.blocked.clear()

    def leader(self) -> RaftNode | None:
        live = [n for i, n in self.nodes.items() if i not in self.down and n.role == Role.LEADER]
        return max(live, key=lambda n: n.term) if live else None

    # -- events -----------------------------------------------------------------------------

    def _push(self, at: float, kind: str, payload: object) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, payload))

    def _send(self, m: Message) -> None:
        lost = self.rng.random() < self.drop
        d = self.rng.uniform(*self.delay)
        if not lost:
            self._push(self.now + d, "msg", m)

    def step_once(self, crash_before_ready: bool = False) -> None:
        """One event (a tick or a delivery), the touched node's Ready, then every check.
        ``crash_before_ready``: the node crashes after stepping, before persisting."""
        at, _, kind, payload = heapq.heappop(self._events)
        self.now = at
        if kind == "tick":
            i = payload
            assert isinstance(i, str)
            if i in self.down:
                return
            self.nodes[i].tick()
            self._push(at + 1.0, "tick", i)
        else:
            assert isinstance(payload, Message)
            i = payload.dst
            if i in self.down or (payload.src, i) in self.blocked or i not in self.nodes:
                return
            self.nodes[i].step(payload)
        if crash_before_ready:
            n = self.nodes[i]
            if self.send_before_persist and n.has_ready():
                for m in n.ready().messages:
                    self._send(m)
            self.crash(i)
            return
        self.process_ready(i)

    def process_ready(self, i: str) -> None:
        n = self.nodes[i]
        while n.has_ready():
            rd = n.ready()
            self.storage[i].persist(rd)  # 1. durable first ...
            for m in rd.messages:  # 2. ... then the messages that acknowledge it
                self._send(m)
            sm = self.sm[i]
            if rd.snapshot is not None:
                self.sm[i] = sm = StateMachine.decode(rd.snapshot.data)
                self.checker.check_apply(i, sm)
            for e in rd.committed:
                assert e.index == sm.index + 1, (i, e.index, sm.index)
                sm.index, sm.digest = e.index, _digest(sm.digest, e)
                self.checker.check_apply(i, sm)
            for rs in rd.read_states:
                r = self.reads.get(rs.context)
                if r is not None and r.node == i and r.index is None:
                    r.index = rs.index
                    if rs.index < r.floor:
                        raise PropertyViolation(
                            f"stale read: {i} read at {rs.index}, but {r.floor} was committed "
                            "before the read was asked"
                        )
            n.advance(rd)
            self.checker.check_node(n)

    def run_until(self, t: float) -> None:
        while self._events and self._events[0][0] <= t:
            self.step_once()

    # -- clients ----------------------------------------------------------------------------

    def propose(self, i: str, data: bytes) -> int | None:
        try:
            idx = self.nodes[i].propose(data)
        except NotLeader:
            return None
        self.process_ready(i)
        return idx

    def conf_change(self, i: str, cc: ConfChange) -> int | None:
        try:
            idx = self.nodes[i].propose_conf_change(cc)
        except (NotLeader, ProposalRefused):
            return None
        self.process_ready(i)
        return idx

    def read(self, i: str, ctx: bytes) -> bool:
        # The floor: what any node has committed by now -- a write acknowledged to a client.
        self.reads[ctx] = Read(i, ctx, self.checker.max_commit)
        try:
            self.nodes[i].read_index(ctx)
        except NotLeader:
            return False
        self.process_ready(i)
        return True

    def compact(self, i: str) -> None:
        n, sm = self.nodes[i], self.sm[i]
        if sm.index > n.snapshot.index:
            snap = n.compact(sm.index, sm.encode())
            self.storage[i].save_snapshot(snap)


def random_run(
    seed: int,
    steps: int = 3000,
    *,
    nodes: int = 3,
    spares: int = 2,
    drop: float = 0.05,
    crash_before_ready: float = 0.002,
    send_before_persist: bool = False,
    disk: Path | None = None,
) -> Cluster:
    """A randomised run: proposals, reads, membership changes, compactions, partitions,
    crashes (some between a step and its Ready) and restarts, checked after every step."""
    ids = [f"n{k}" for k in range(1, nodes + 1)]
    spare = [f"n{k}" for k in range(nodes + 1, nodes + spares + 1)]
    c = Cluster(seed, ids, spares=spare, drop=drop, disk=disk)
    c.send_before_persist = send_before_persist
    rng = random.Random(seed * 7919 + 1)
    everyone = ids + spare
    for step in range(steps):
        r = rng.random()
        lead = c.leader()
        if r < 0.04 and lead is not None:
            c.propose(lead.id, b"v%d" % step)
        elif r < 0.05:
            c.read(rng.choice(everyone), b"r%d" % step)
        elif r < 0.053 and lead is not None:
            node = rng.choice(everyone)
            op = "remove" if node in lead.voters else "add"
            if op == "add" or len(lead.voters) > 2:
                c.conf_change(lead.id, ConfChange(op, node))
        elif r < 0.056:
            c.compact(rng.choice(everyone))
        elif r < 0.058:
            a = set(rng.sample(everyone, rng.randint(1, 2)))
            c.partition(a, set(everyone) - a)
        elif r < 0.062:
            c.heal()
        elif r < 0.064:
            up = [i for i in everyone if i not in c.down]
            if len(c.down) < 2 and up:
                c.crash(rng.choice(up))
        elif r < 0.070 + 10 * crash_before_ready and c.down:
            c.restart(rng.choice(sorted(c.down)))
        if not c._events:
            break
        cbr = rng.random() < crash_before_ready
        c.step_once(crash_before_ready=cbr and len(c.down) < 2)
    return c


def settle(c: Cluster, seconds: float = 300.0) -> RaftNode:
    """Heal everything, restart every crashed node, and wait for a leader that commits a new
    entry; the liveness half of a run (safety is checked throughout)."""
    c.heal()
    c.drop = 0.0
    for i in sorted(c.down):
        c.restart(i)
    deadline = c.now + seconds
    marker: int | None = None
    while c.now < deadline:
        c.run_until(c.now + 5.0)
        lead = c.leader()
        if lead is None:
            continue
        if marker is None or lead.term_at(marker) is None:
            marker = c.propose(lead.id, b"settle")
        elif lead.commit >= marker:
            return lead
    raise AssertionError(f"seed {c.seed}: no leader committed within {seconds} units")
