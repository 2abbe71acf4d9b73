"""``shmkv torture --simulate --seed S``: the cluster's protocol code in a deterministic simulation.

What runs is the shipped code, not a model of it. Each node (:class:`SimCluster`) is the daemon's
wiring in one process: :class:`~shmkv.cluster.coordinator.Node` (the coordinator's quorum logic,
versions.py's version algebra, the PN-counter, read repair, the suspect/probe loop) over a real
shmkv Store, gossip.py's owner loop with the phi-accrual detector, handoff.py's hint delivery
(hints.py, in memory), antientropy.py's owner (Merkle trees, exchanges, tombstone collection);
each node's transport a :class:`~shmkv.torture.simnet.SimTransport`, every clock those loops take
-- monotonic, wall, tombstone times, generations -- the network's virtual one (injected through
their constructors; nothing is forked). Then the Raft core (:class:`~shmkv.cluster.raft.core.RaftNode`,
raftsim.py). One seeded scheduler decides everything: the network (simnet.py: virtual time,
per-message delay, drops, reordering -- ``fifo=False``, messages overtake each other), the
clients' choices, gossip's peer choices, and the nemesis' faults:

- ``kill``: the node crashes: its handlers are cancelled (peers see resets), every loop and
  background task of the process stops where it is, and what it kept only in memory is lost --
  hints (a node without --path), gossip's view and detector history, the Merkle trees and
  tombstone times. It restarts from its Store (a memory-only node's segment survives SIGKILL,
  as on a real host: local.py) with a new gossip generation. Raft nodes crash between a step
  and its Ready and lose what they had not persisted (raftsim.py);
- ``crash`` (by name only, not in the default set): a host crash -- as ``kill``, and the Store
  also loses every write since the node's last periodic sync (:class:`_DurableStore`); the node
  restarts under a fresh actor, as a node must whose store lost what it minted;
- ``partition``: halves (one node against the rest), a bridge (the others cannot reach each
  other, all reach the node), one-way (the node's messages out are lost, or those in);
- ``loss``: 20 % of messages dropped; ``delay``: 50-400 ms per message (timeouts, overtaking).

Clients are tasks on the same virtual loop that speak wire.py as shmkv.connect does (ring-aware,
one coordinator per request, a write whose request went out unanswered is *unknown*), but pick a
random replica of the key as coordinator 30 % of the time (any replica may coordinate; the real
client's failover does this under faults). After the load the faults heal and the cluster runs
on its own for the grace plus a few anti-entropy rounds (``converge="hints"``: no exchanges,
hints alone); then the replicas' states are taken (every replica of a key: one holding nothing
disagrees) and every key read once more. The history, those final states and the Raft
observations go through report.check_history -- the same checkers as a real run -- and the
:class:`Monitor` adds the invariants only a simulation can watch (a replica's copy never
regresses, no tombstone collected before its grace, no hint deleted before its owner holds it).

Determinism: the same seed gives the same history, bit for bit (:func:`history_hash`), in any
process with the same PYTHONHASHSEED; the CLI pins ``PYTHONHASHSEED=0`` (re-executing itself if
needed) so a printed seed replays anywhere. Nothing here reads the wall clock; the tasks a crash
kills are cancelled in creation order (:func:`_cancel`), a collected tombstone is gone at once
(:class:`_VirtualStore`).

``bug``: one of coordinator.TEST_BUGS (the test-only switch, coordinator.TEST_BUG_ENV:
``ack-before-w``, ``repair-overwrites``, ``hint-early-delete``, ``tombstone-early-gc``) or
``raft-no-majority`` (a Raft leader that commits on its own vote, raftsim.py): runs that the
checkers must fail.
"""


from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import itertools
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

from ..cluster import wire
from ..cluster.antientropy import Service as AntiEntropyService
from ..cluster.antientropy import Settings as AESettings
from ..cluster.coordinator import TEST_BUGS, Config, Node
from ..cluster.crdt import PNCounter
from ..cluster.errors import MaybeApplied
from ..cluster.failure_detector import PhiAccrual
from ..cluster.gossip import Gossip
from ..cluster.handoff import Handoff
from ..cluster.hints import HintStore
from ..cluster.replica import ACTOR_KEY, COUNTER, VERSIONS, Replica
from ..cluster.ring import Member, Ring
from ..cluster.transport import RequestTimeout, Unreachable
from ..cluster.versions import Context, VersionSet
from ..cluster.wire import Message, Overloaded
from ..errors import InvalidArgument
from .checkers import check_convergence
from .history import DELETE, FAIL, INCR, OK, READ, UNKNOWN, WRITE, History, Op, versions_to_final
from .nemesis import Fault, schedule
from .report import check_history, passed, render_text
from .simconfig import SIM_NEMESES, SimConfig, replay_command
from .simnet import SimNetwork
from .verdict import Problem, Verdict, combine
from .workload import classify

if TYPE_CHECKING:
    from ..store import Store

BUGS = (*TEST_BUGS, "raft-no-majority")
#: nemeses the simulation has beyond the default set (SIM_NEMESES): asked for by name only, so
#: the default schedules -- and every pinned seed -- stay as they were
SIM_EXTRA = ("crash",)
DELAY = (0.0005, 0.005)  # the healthy network's one-way latency, virtual seconds
SUSPECT_FOR = 1.0  # a client avoids a coordinator that failed it for this long (client.py's)
_stores = itertools.count()


@dataclass
class SimResult:
    history: History
    verdicts: list[Verdict]
    skipped: list[str]
    text: str
    hash: str
    #: what the protocol code did in the run (gossip down verdicts sampled every 0.1 s, hints,
    #: read repairs, anti-entropy exchanges and repairs, tombstones collected)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return passed(self.verdicts)


#: the simulated wall clock's origin (ms since the epoch): gossip generations are start times,
#: tombstone times and expiries wall-clock readings, as in the daemon -- here virtual
WALL0_MS = 1_700_000_000_000
#: the failure-handling loops' periods in the simulation (virtual seconds): shorter than the
#: daemon's defaults (gossip 1 s, hints 1 s, anti-entropy 10 s) so that runs of a few seconds
#: see nodes marked down and up, hints handed back and trees compared several times
GOSSIP_INTERVAL = 0.2
HANDOFF_INTERVAL = 0.25


def _detector(interval: float) -> PhiAccrual:
    """failure_detector.py's defaults scaled to the simulation's gossip interval (they are
    absolute seconds tuned for 1 s gossip: a fault of ~1 s would otherwise never convict)."""
    return PhiAccrual(first_interval=interval, min_std=interval / 4, acceptable_pause=interval / 2,
                      max_sample=5 * interval, max_local_pause=3.0)


class Monitor:
    """Invariants the simulation checks *as the replicas change* -- what no history of client
    operations can show, because read repair and anti-entropy heal the damage before any read
    sees it (a real run cannot look inside its nodes at every write; the simulation can):

    - ``replica-regressed``: a replica's stored copy of a key is only ever replaced by one that
      descends it (every write is a merge or a put over it, versions.py) -- a version it held is
      never simply lost. Only a tombstone collection removes a copy (next item).
    - ``tombstone-early``: a tombstone is collected no sooner than ``grace`` after the first
      tombstone of that key was stored on any replica (antientropy.py: the time travels with the
      tombstone and replicas keep the earliest, so none collects before this).
    - ``hint-unacknowledged``: a hint is deleted only when its owner's copy covers it (the owner
      merged it and said so: hints.py's deletion rule); dropping the hints of a node no longer in
      the ring is not a deletion of this kind.

    ``problems`` gets one :class:`Problem` per violation, with the virtual time and the node."""

    def __init__(self, net: SimNetwork, grace: float) -> None:
        self.net = net
        self.grace = grace
        self.problems: list[Problem] = []
        self.checked = 0
        # per store key: node -> the start of its current deleted stretch (its copy all
        # tombstones since then), and the (start, end) of the stretches that ended
        self._dead_since: dict[bytes, dict[str, float]] = {}
        self._dead_ended: dict[bytes, list[tuple[float, float]]] = {}
        self.stores: dict[str, Any] = {}

    def _flag(self, kind: str, text: str, key: bytes, **extra: Any) -> None:
        if len(self.problems) < 50:
            self.problems.append(Problem(f"{kind} at t={self.net.now:.6f}: {text}", key=key.decode("latin-1"),
                                         extra={"kind": kind, **extra}))

    def stored(self, node: str, skey: bytes, old: bytes | None, new: bytes) -> None:
        if skey[:1] != VERSIONS:
            return
        self.checked += 1
        nv = VersionSet.decode(new)
        if nv.is_deleted:
            self._dead_since.setdefault(skey, {}).setdefault(node, self.net.now)
        else:
            self._end_stretch(node, skey)
        if old is not None:
            ov = VersionSet.decode(old)
            if nv.merge(ov) != nv:
                self._flag("replica-regressed", f"{node}'s copy of {skey[1:]!r} went from {ov!r} to {nv!r}, "
                           "losing versions it held", skey[1:], node=node)

    def _end_stretch(self, node: str, skey: bytes) -> None:
        start = self._dead_since.get(skey, {}).pop(node, None)
        if start is not None:
            self._dead_ended.setdefault(skey, []).append((start, self.net.now))

    def collected(self, node: str, skey: bytes) -> None:
        """A tombstone's time in antientropy.py is the earliest start of a deleted stretch of
        the key that this node heard of during its own (peers send theirs with AE_SYNC): so the
        earliest start of any replica's stretch overlapping this node's is the lower bound a
        correct collection respects."""
        if skey[:1] != VERSIONS:
            return
        now = self.net.now
        mine = self._dead_since.get(skey, {}).get(node, now)
        starts = list(self._dead_since.get(skey, {}).values())
        starts += [a for a, b in self._dead_ended.get(skey, []) if b >= mine]
        first = min(starts, default=now)
        self._end_stretch(node, skey)
        if now - first < self.grace - 1e-9:
            self._flag("tombstone-early", f"{node} collected the tombstone of {skey[1:]!r} "
                       f"{now - first:.3f} s after the key was first deleted on a replica "
                       f"(grace {self.grace:g} s)", skey[1:], node=node)

    def hint_deleted(self, holder: str, owner: str, key: bytes, raw: bytes) -> None:
        store = self.stores.get(owner)
        have = store.get(VERSIONS + key) if store is not None else None
        hint = VersionSet.decode(raw)
        held = VersionSet() if have is None else VersionSet.decode(have)
        if held.merge(hint) != held:
            self._flag("hint-unacknowledged", f"{holder} deleted its hint of {key!r} for {owner} while "
                       f"{owner} holds {held!r}, not the hinted {hint!r}", key, node=holder, owner=owner)

    def verdict(self) -> Verdict:
        return combine("invariants", self.problems, [], writes_checked=self.checked)


class _VirtualStore:
    """The node's Store, watched by the :class:`Monitor`, with a collected tombstone gone *now*
    in virtual time.

    antientropy.py collects a tombstone with ``cas(key, raw, raw, ttl=1e-6)`` (the Store has no
    compare-and-delete); the Store rounds that up to the next wall-clock millisecond, so the entry
    would stay readable for up to 1 ms of *real* time -- thousands of simulated events, a
    different number on every run. Here a cas with a TTL under 1 ms deletes at once, atomically
    (the simulation is one thread). Everything else goes straight to the Store."""

    def __init__(self, store: Any, node: str, monitor: Monitor) -> None:
        self._store = store
        self._node = node
        self._monitor = monitor

    def cas(self, key: bytes, expected: Any, new: Any, ttl: float | None = None) -> bool:
        if ttl is not None and ttl < 0.001:
            if self._store.get(key) != expected:
                return False
            self._store.delete(key)
            self._monitor.collected(self._node, key)
            return True
        done = bool(self._store.cas(key, expected, new, ttl=ttl))
        if done:
            self._monitor.stored(self._node, key, expected, new)
        return done

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: object) -> bool:
        return key in self._store


#: a host-crash node's page cache is written back every SYNC_INTERVAL virtual seconds (each node
#: at its own seeded phase); a host crash loses every store write since its node's last sync.
#: Shorter than the nemesis' quiet gap plus the shortest fault (0.1 + 0.2 s): a replica that
#: acknowledged a write has synced it before the next host can crash.
SYNC_INTERVAL = 0.1


class _DurableStore(_VirtualStore):
    """A :class:`_VirtualStore` on a host that can crash (the ``crash`` nemesis): it keeps an
    undo log of its writes since the node's last (virtual, periodic) sync, and
    :meth:`lose_unsynced` reverts them -- what a host crash does to a store whose pages were
    not yet written back. Nothing here adds an event to the simulation (the sync times are a
    function of the virtual clock), so runs without ``crash`` are unchanged.

    Invariant: ``_undo`` holds, oldest first, ``(t, key, value before)`` for every write this
    store took after ``last_sync(t)``'s predecessor was passed -- entries before the current
    sync boundary are trimmed at each write, as the sync made them durable."""

    def __init__(self, store: Any, node: str, monitor: Monitor, phase: float) -> None:
        super().__init__(store, node, monitor)
        self._phase = phase
        self._undo: list[tuple[float, bytes, Any]] = []

    def last_sync(self) -> float:
        now = self._monitor.net.now
        k = (now - self._phase) // SYNC_INTERVAL
        return self._phase + k * SYNC_INTERVAL

    def _log(self, key: bytes, before: Any) -> None:
        synced = self.last_sync()
        if self._undo and self._undo[0][0] <= synced:
            self._undo = [e for e in self._undo if e[0] > synced]
        self._undo.append((self._monitor.net.now, key, before))

    def cas(self, key: bytes, expected: Any, new: Any, ttl: float | None = None) -> bool:
        done = super().cas(key, expected, new, ttl)
        if done:
            self._log(key, expected)
        return done

    def put(self, key: bytes, value: Any, ttl: float | None = None) -> None:
        self._log(key, self._store.get(key))
        self._store.put(key, value, ttl=ttl)

    def delete(self, key: bytes) -> Any:
        self._log(key, self._store.get(key))
        return self._store.delete(key)

    def lose_unsynced(self) -> int:
        """Revert every write since the last sync, newest first; how many keys' replicas
        (VersionSets and counters -- not the node's metadata) went back (a key written twice
        counts once)."""
        synced = self.last_sync()
        lost = [e for e in self._undo if e[0] > synced]
        self._undo = []
        for _, key, before in reversed(lost):
            if before is None:
                self._store.delete(key)
            else:
                self._store.put(key, before)
        return len({k for _, k, _ in lost if k[:1] in (VERSIONS, COUNTER)})


class _WatchedHints(HintStore):
    """hints.py's store (in memory), telling the :class:`Monitor` of every deletion."""

    def __init__(self, holder: str, monitor: Monitor) -> None:
        super().__init__(None)
        self._holder = holder
        self._monitor = monitor
        self._dropping = False

    def _delete(self, owner: str, key: bytes, raw: bytes) -> None:
        if not self._dropping:
            self._monitor.hint_deleted(self._holder, owner, key, raw)
        super()._delete(owner, key, raw)

    def drop_owner(self, owner: str) -> int:
        self._dropping = True
        try:
            return super().drop_owner(owner)
        finally:
            self._dropping = False


def _cancel(tasks: Any) -> None:
    """Cancel ``tasks`` in the order they were created (asyncio names them Task-<n>): a set of
    tasks iterates in address order, which would make the wake-ups differ from run to run."""

    def order(t: asyncio.Task[Any]) -> tuple[int, str]:
        name = t.get_name()
        tail = name.rsplit("-", 1)[-1]
        return (int(tail) if tail.isdigit() else -1, name)

    for t in sorted((t for t in tasks if t is not None), key=order):
        t.cancel()


@dataclass
class _Proc:
    """One running incarnation of a node: what a SIGKILL ends (the Store outlives it)."""

    node: Node
    gossip: Gossip
    handoff: Handoff
    ae: AntiEntropyService
    probe: asyncio.Task[None]


@functools.lru_cache(maxsize=8)
def _static_ring(nodes: int) -> Ring:
    """The epoch-1 ring of n1..n<nodes> (addresses "nX:1"). Shared by every run with that many
    nodes: a Ring is immutable, and keeping one keeps its walked preference lists -- every
    node's anti-entropy tables its ranges from Ring.vnode_preference_lists (~30 ms a walk),
    which was a sixth of a sweep's time when each run built its own ring."""
    return Ring([Member(f"n{i + 1}", f"n{i + 1}:1") for i in range(nodes)], 1)


class SimCluster:
    """``nodes`` shmkv nodes n1..nN on one SimNetwork, one static ring (epoch 1): each the
    daemon's wiring (daemon._start_failures, _start_antientropy) in one process -- the
    coordinator, gossip (owner, LocalBoard) with the phi-accrual detector, hinted handoff
    (hints in memory: a node without --path), anti-entropy (owner) -- every clock the
    network's virtual one."""

    def __init__(self, seed: int, nodes: int = 3, *, n: int = 3, w: int = 2, r: int = 2,
                 bug: str | None = None, timeout: float = 0.5, ae_interval: float = 0.5,
                 grace: float = 10.0) -> None:
        self.net = SimNetwork(seed, delay=DELAY, fifo=False)
        self.seed = seed
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.addr = {x: f"{x}:1" for x in self.names}
        self.ring = _static_ring(nodes)
        # strict: a hinted fallback never counts toward W (the configuration the linearizability
        # checker holds to; meta "sloppy": False)
        self.cfg = {x: Config(x, self.addr[x], n=n, w=w, r=r, timeout=timeout, strict=True)
                    for x in self.names}
        self.bug = bug if bug in TEST_BUGS else None
        self.ae_settings = AESettings(interval=ae_interval, grace=grace, rebuild=0.0,
                                      timeout=max(1.0, 2 * timeout))
        self.stores: dict[str, Any] = {}
        self.monitor = Monitor(self.net, grace)
        self.monitor.stores = self.stores
        self.procs: dict[str, _Proc] = {}
        self.down: set[str] = set()
        self.incarnations = itertools.count()
        self.stats = dict.fromkeys(("down_verdicts", "hints_added", "hints_delivered", "read_repairs",
                                    "ae_exchanges", "ae_repaired", "tombstones_collected"), 0)
        import shmkv

        try:
            for x in self.names:
                kv = self.stores[x] = shmkv.attach(
                    f"shmkv-sim.{os.getpid()}.{next(_stores)}.{x}", size="8MiB"
                )
                # The actor name's random suffix, drawn from the seed (replica.py draws it from
                # secrets when the store has none): the same seed mints the same dots.
                actor = f"{x}@{random.Random(f'{seed}/{x}').getrandbits(32):08x}"
                kv.cas(ACTOR_KEY, None, actor.encode())
                self.start(x)
        except BaseException:
            self.close()
            raise
        self.client_transport = self.net.transport("client:0")
        self.net.spawn(self._watch())

    def _tally(self, p: _Proc) -> None:
        """Add a process' counters to the run's (at its crash, and at the end)."""
        st = self.stats
        h = p.handoff.hints.stats
        st["hints_added"] += h.added
        st["hints_delivered"] += h.delivered
        st["read_repairs"] += p.node.stats.read_repairs
        if p.ae.owner is not None:
            a = p.ae.owner.stats
            st["ae_exchanges"] += a.exchanges
            st["ae_repaired"] += a.repaired
            st["tombstones_collected"] += a.collected

    async def _watch(self) -> None:
        """Every 0.1 virtual s, count the (node, peer) pairs gossip holds down: proof that the
        detector's verdicts happen (and end) in the run. Reads only; sends nothing."""
        while True:
            await asyncio.sleep(0.1)
            for x, p in sorted(self.procs.items()):
                self.stats["down_verdicts"] += sum(1 for y in self.names if y != x and p.gossip.is_down(y))

    def finish(self) -> dict[str, int]:
        for _, p in sorted(self.procs.items()):
            self._tally(p)
        return dict(self.stats)

    @property
    def nodes(self) -> dict[str, Node]:
        return {x: p.node for x, p in self.procs.items()}

    def wall(self) -> float:
        """The simulated wall clock, seconds since the epoch."""
        return WALL0_MS / 1000 + self.net.now

    def start(self, x: str) -> None:
        self.net.run(self.astart(x))

    async def astart(self, x: str) -> None:
        """(Re)start node ``x`` from its store, from inside the simulation."""
        t = self.net.transport(self.addr[x])
        node = Node(self.cfg[x], t, Replica(cast("Store", self._store_view(x)), x, clock=self.wall))
        node.test_bug = self.bug  # the env var's switch, set directly (no process here)
        node.ring = self.ring
        k = next(self.incarnations)
        gossip = Gossip(x, self.addr, t, rng=random.Random(f"{self.seed}/gossip/{x}/{k}"),
                        interval=GOSSIP_INTERVAL, clock=self.net.loop.time,
                        wall_ms=lambda: int(self.wall() * 1000), detector=_detector(GOSSIP_INTERVAL))
        handoff = Handoff(x, _WatchedHints(x, self.monitor), t, node._ring, node._alive, n=self.cfg[x].n,
                          timeout=self.cfg[x].timeout, interval=HANDOFF_INTERVAL, clock=self.net.loop.time)
        handoff.test_bug = self.bug
        node.gossip, node.handoff = gossip, handoff
        ae = AntiEntropyService(node, self.ae_settings, owner=True, workers=1)
        assert ae.owner is not None
        ae.owner.clock = self.wall
        await t.serve(self.addr[x], ae.wrap(node.handle))  # the daemon's _ae_first
        gossip.start()
        handoff.start()
        await ae.start()
        probe = self.net.spawn(node.probe_forever(0.5))  # as the daemon does
        self.procs[x] = _Proc(node, gossip, handoff, ae, probe)
        self.down.discard(x)

    def crash(self, x: str) -> None:
        """SIGKILL: the transport goes (handlers cancelled, peers see resets), every loop and
        background task of the process stops where it is, and what it kept in memory only --
        hints, gossip's view and detector, the Merkle trees and tombstone times -- is lost.
        The Store survives (a memory-only segment outlives its process, as on a real host)."""
        p = self.procs.pop(x, None)
        self.net.crash(self.addr[x])
        self.down.add(x)
        if p is None:
            return
        self._tally(p)
        owner = p.ae.owner
        _cancel([p.probe, p.gossip._loop_task, p.handoff._task, owner._task if owner else None,
                 *p.node._background])

    def _store_view(self, x: str) -> _VirtualStore:
        """What node ``x``'s Replica writes through: a fresh watcher, or -- once
        :meth:`enable_host_crashes` ran -- the host's one durable view (its undo log outlives
        the node's processes, as the page cache outlives a killed process)."""
        durable = getattr(self, "durable", None)
        if durable is not None:
            return cast(_VirtualStore, durable[x])
        return _VirtualStore(self.stores[x], x, self.monitor)

    def enable_host_crashes(self) -> None:
        """Give every node a host that syncs every SYNC_INTERVAL (seeded phase) and can crash
        (:meth:`host_crash`); the running processes' replicas switch to the durable views (no
        event added: nothing else changes in the run). Called before any client runs."""
        self.durable = {
            x: _DurableStore(self.stores[x], x, self.monitor,
                             random.Random(f"{self.seed}/sync/{x}").uniform(0, SYNC_INTERVAL))
            for x in self.names
        }
        self.host_crashes = itertools.count()
        for x, p in self.procs.items():
            p.node.replica.store = cast("Store", self.durable[x])

    def host_crash(self, x: str) -> int:
        """The host under node ``x`` crashes: the process dies as on :meth:`crash`, and the
        store loses every write since its last sync. The restarted node must not mint dots or
        counter entries its lost self may have minted already (replica.py, "The actor": their
        REQUIRES would claim writes it no longer holds), so it comes back under a fresh actor
        -- the recovery a node that knows it stopped uncleanly makes -- drawn from the seed.
        Returns how many store keys reverted."""
        self.crash(x)
        lost = self.durable[x].lose_unsynced()
        kv = self.stores[x]
        k = next(self.host_crashes)
        actor = f"{x}@{random.Random(f'{self.seed}/{x}/host/{k}').getrandbits(32):08x}"
        kv.put(ACTOR_KEY, actor.encode())
        return lost

    def hints_pending(self) -> dict[str, dict[str, int]]:
        return {x: p.handoff.hints.owners() for x, p in sorted(self.procs.items()) if len(p.handoff.hints)}

    def close(self) -> None:
        import shmkv

        try:
            self.net.close()
        finally:
            for kv in self.stores.values():
                name = kv.name
                kv.close()
                shmkv.unlink(name)


class _Client:
    """One sequential client process on the simulated network (see the module docstring)."""

    def __init__(self, sim: SimCluster, rec: list[Op], ids: itertools.count[int], index: int,
                 processes: itertools.count[int], cfg: SimConfig) -> None:
        self.sim, self.rec, self.ids, self.cfg = sim, rec, ids, cfg
        self.net = sim.net
        self.transport = sim.net.transport(f"c{index}:1")
        self.rng = random.Random(cfg.seed * 1000 + index)
        self.processes = processes
        self.process = next(processes)
        self.keys = [f"k{i}" for i in range(cfg.keys)]
        self.ctx: dict[str, Context] = {}
        self.suspects: dict[str, float] = {}
        self.n = 0

    def _targets(self, key: bytes) -> list[str]:
        prefs = self.sim.ring.preference_list(key, self.cfg.n)
        now = self.net.now
        live = [p for p in prefs if now - self.suspects.get(p, -1e9) > SUSPECT_FOR]
        order = live + [p for p in prefs if p not in live]
        if self.rng.random() < 0.3:
            self.rng.shuffle(order)
        return order

    async def _routed(self, key: bytes, code: int, fields: dict[str, Any], write: bool) -> Message:
        fields.update(epoch=1, timeout_ms=int(self.cfg.op_timeout * 1000))
        last: BaseException | None = None
        for node in self._targets(key):
            addr = self.sim.addr[node]
            try:
                reply = await self.transport.request(addr, Message(code, 0, dict(fields)),
                                                     self.cfg.op_timeout * 2)
            except Unreachable as e:
                self.suspects[node] = self.net.now
                if write and e.sent:
                    raise MaybeApplied(f"{node}: connection broke after the request was sent",
                                       needed=1, answered=0, n=self.cfg.n) from None
                last = e
                continue
            except RequestTimeout as e:
                self.suspects[node] = self.net.now
                if write:
                    raise MaybeApplied(f"{node}: no answer ({e})", needed=1, answered=0,
                                       n=self.cfg.n) from None
                last = e
                continue
            except Overloaded as e:
                last = e
                continue
            self.suspects.pop(node, None)
            return reply
        assert last is not None
        raise last

    async def run(self, until: float) -> None:
        while self.net.now < until:
            await self.step()
            await asyncio.sleep(self.rng.uniform(0.001, 0.02))

    async def step(self) -> None:
        rng = self.rng
        key = rng.choice(self.keys)
        if self.cfg.workload == "counter":
            if rng.random() < 0.6:
                await self.invoke(INCR, key, rng.choice((1, 1, 2, 5, -1, -3)))
            else:
                await self.invoke(READ, key)
            return
        roll = rng.random()
        if key not in self.ctx:
            await self.invoke(READ, key)
        elif roll < 0.45:
            self.n += 1
            await self.invoke(WRITE, key, f"{self.process}-{self.n}")
        elif roll < 0.55:
            await self.invoke(DELETE, key)
        else:
            await self.invoke(READ, key)

    async def invoke(self, f: str, key: str, value: Any = None, *, r: int | None = None) -> None:
        k = key.encode()
        ctx = self.ctx.get(key)
        op = Op(0, self.process, key, f, round(self.net.now, 9), value=value)
        if f in (WRITE, DELETE):
            op.ctx_in = None if ctx is None else ctx.clock
        try:
            if f == READ and self.cfg.workload == "counter":
                rep = await self._routed(k, wire.INCR, {"key": k, "delta": 0}, True)
                op.result = int(rep.fields["value"])
            elif f == READ:
                fields: dict[str, Any] = {"key": k}
                if r is not None:
                    fields["r"] = r
                rep = await self._routed(k, wire.GET_VERSIONS, fields, False)
                vs = [None if v is None else v.decode("latin-1") for v in rep.fields["values"]]
                got = Context.decode(rep.fields["context"])
                op.result, op.ctx_out = vs, got.clock
                self.ctx[key] = got
            elif f in (WRITE, DELETE):
                fields = {"key": k}
                if ctx is not None:
                    fields["context"] = ctx.encode()
                if f == WRITE:
                    fields["value"] = value.encode()
                rep = await self._routed(k, wire.PUT if f == WRITE else wire.DELETE, fields, True)
                got = Context.decode(rep.fields["context"])
                op.ctx_out = got.clock
                self.ctx[key] = got
            elif f == INCR:
                rep = await self._routed(k, wire.INCR, {"key": k, "delta": value}, True)
                op.result = int(rep.fields["value"])
            op.outcome = OK
        except Exception as e:  # as workload.Worker: what the cluster answered, classified
            op.outcome = classify(e)
            if isinstance(e, (Unreachable, Overloaded)) and not isinstance(e, MaybeApplied):
                op.outcome = FAIL if not getattr(e, "sent", False) else UNKNOWN
            op.error = f"{type(e).__name__}: {e}"[:200]
        op.complete = round(self.net.now, 9)
        op.id = next(self.ids)
        self.rec.append(op.validate())
        if op.outcome == UNKNOWN:
            self.process = next(self.processes)
            self.ctx.clear()


class _SimNemesis:
    def __init__(self, sim: SimCluster, faults: list[Fault], seed: int) -> None:
        self.sim, self.faults = sim, faults
        self.rng = random.Random(seed * 7 + 3)
        self.log: list[dict[str, Any]] = []

    def _partition(self, node: str) -> str:
        net, addr = self.sim.net, self.sim.addr
        others = [addr[x] for x in self.sim.names if x != node]
        kind = self.rng.choice(("halves", "bridge", "one-way-out", "one-way-in"))
        if kind == "halves":
            net.partition({addr[node]}, others)
        elif kind == "bridge":  # node reaches everyone, the others not each other
            for i, a in enumerate(others):
                net.partition({a}, others[i + 1:])
        elif kind == "one-way-out":
            net.cut([addr[node]], others)
        else:
            net.cut(others, [addr[node]])
        return kind

    async def run(self) -> None:
        net, sim = self.sim.net, self.sim
        for f in self.faults:
            await asyncio.sleep(max(0.0, f.at - net.now))
            entry: dict[str, Any] = {"kind": f.kind, "node": f.node, "t0": round(net.now, 6)}
            if f.kind == "kill":
                sim.crash(f.node)
            elif f.kind == "crash":  # a host crash: the unsynced writes go too
                entry["lost_keys"] = sim.host_crash(f.node)
            elif f.kind == "partition":
                entry["shape"] = self._partition(f.node)
            elif f.kind == "loss":
                net.drop = 0.2
            elif f.kind == "delay":
                net.delay = (0.05, 0.4)
            self.log.append(entry)
            await asyncio.sleep(f.duration)
            await self.heal_all()
            entry["t1"] = round(net.now, 6)

    async def heal_all(self) -> None:
        net, sim = self.sim.net, self.sim
        net.heal()
        net.drop = 0.0
        net.delay = DELAY
        for x in sorted(sim.down):
            await sim.astart(x)


def _check(cfg: SimConfig) -> None:
    if cfg.bug is not None and cfg.bug not in BUGS:
        raise InvalidArgument(f"unknown bug {cfg.bug!r}: expected one of {', '.join(BUGS)}")
    if "scale" in cfg.nemesis:  # the sim does not drive cluster_config.py's add/remove or its moves
        raise InvalidArgument("the simulation has no nemesis scale: it does not run the configuration "
                              "group's ring changes (cluster_config.py); use --cluster local --nemesis scale")
    bad = [k for k in cfg.nemesis if k not in (*SIM_NEMESES, *SIM_EXTRA)]
    if bad:
        raise InvalidArgument(f"the simulation has no nemesis {', '.join(bad)}: expected some of "
                              f"{', '.join((*SIM_NEMESES, *SIM_EXTRA))}")
    if cfg.workload not in ("register", "counter"):
        raise InvalidArgument(f"the simulation runs --workload register or counter, not {cfg.workload!r}")
    if cfg.converge not in ("ae", "hints"):
        raise InvalidArgument(f"--converge is ae or hints, not {cfg.converge!r}")
    crashing = [k for k in ("kill", "crash") if k in cfg.nemesis]
    if cfg.converge == "hints" and crashing:
        raise InvalidArgument(f"--converge hints cannot run the {' and '.join(crashing)} nemesis: a coordinator "
                              "killed mid-write leaves a copy that no hint covers (anti-entropy's job)")
    if not cfg.ae_interval > 0:
        raise InvalidArgument(f"--ae-interval must be > 0, got {cfg.ae_interval}")
    if cfg.grace_s < 2 * cfg.ae_interval:  # the daemon's rule (daemon.check_options)
        raise InvalidArgument(f"--grace ({cfg.grace_s:g} s) must be at least twice the anti-entropy interval "
                              f"({cfg.ae_interval:g} s): a tombstone must outlive the rounds that spread it")


def run(cfg: SimConfig) -> SimResult:
    _check(cfg)
    sim = SimCluster(cfg.seed, cfg.nodes, n=cfg.n, w=cfg.w, r=cfg.r, bug=cfg.bug,
                     timeout=cfg.op_timeout, ae_interval=cfg.ae_interval if cfg.converge == "ae" else 0.0,
                     grace=cfg.grace_s)
    ops: list[Op] = []
    ids = itertools.count()
    processes = itertools.count()
    counters: dict[str, dict[str, Any]] = {}
    stats: dict[str, int] = {}
    pending: dict[str, dict[str, int]] = {}
    try:
        # Short runs (the CI sweep's) get shorter, denser faults, so that most seeds see one.
        short = cfg.time < 3.0
        faults = schedule(cfg.seed, cfg.time, cfg.nemesis, sim.names, gap=(0.1, 0.5) if short else (0.2, 1.0),
                          length=(0.2, 0.8) if short else (0.3, 1.2), quiet_end=0.2 if short else 0.5)
        if "crash" in cfg.nemesis:
            sim.enable_host_crashes()
        nemesis = _SimNemesis(sim, faults, cfg.seed)
        clients = [_Client(sim, ops, ids, i, processes, cfg) for i in range(cfg.clients)]

        async def load() -> None:
            nem = asyncio.ensure_future(nemesis.run())
            await asyncio.gather(*(c.run(cfg.time) for c in clients))
            await nem
            await nemesis.heal_all()

        sim.net.run(load(), timeout=cfg.time + 60)
        # The faults healed. Nothing but the cluster's own background work runs now: gossip
        # marks everyone up, hints go back to their owners, anti-entropy compares every pair of
        # replicas (every ae_interval) and -- past the grace -- collects the tombstones.
        # Then the final states are taken, before the final reads (which would repair).
        # (The tombstones a replica stored last -- a hint handed back at the heal -- are
        # collected a grace after that, by every replica on its own clock in hints mode.)
        settle = cfg.grace_s + (3.0 if cfg.converge == "hints" else 1.0 + 3 * cfg.ae_interval)
        sim.net.run_for(settle)
        keys = sorted({o.key for o in ops})
        final = None
        if cfg.workload != "counter":
            final = versions_to_final(_final_states(sim, keys, cfg.n))
        else:
            counters = {
                x: {k: c for k in keys if (c := sim.procs[x].node.replica.counter(k.encode())).entries}
                for x in sim.names
            }
        pending = sim.hints_pending()
        stats = sim.finish()
        reader = _Client(sim, ops, ids, cfg.clients, processes, cfg)
        reader.rng = random.Random(cfg.seed)

        async def final_reads() -> None:
            for k in keys:  # recorded like any other op
                reader.ctx.clear()
                await reader.invoke(READ, k)

        sim.net.run(final_reads(), timeout=120)
    finally:
        monitor = sim.monitor
        sim.close()
    raft_obs = None
    if cfg.raft:
        from .raftsim import raft_run

        raft_obs = raft_run(cfg.seed, bug=cfg.bug == "raft-no-majority")
    meta = {**asdict(cfg), "simulate": True, "sloppy": False}
    h = History(ops=sorted(ops, key=lambda o: (o.invoke, o.id)), meta=meta, final=final,
                faults=nemesis.log, raft=raft_obs)
    verdicts, skipped = check_history(h, time_limit=10.0)
    verdicts.append(monitor.verdict())
    if cfg.workload == "counter":
        verdicts.append(check_convergence(_with_absent(counters, sim, cfg.n, PNCounter())))
        skipped = [x for x in skipped if not x.startswith("convergence")]
    text = render_text(h, verdicts, skipped)
    text += "\nsimulated: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.items())
    if pending:
        text += f"\nhints still pending after the settle: {pending}"
    digest = history_hash(h)
    text += f"\nhistory hash: {digest}"
    if not passed(verdicts):
        text += f"\nFAILING SEED {cfg.seed}; replay: {replay_command(cfg)}"
    return SimResult(h, verdicts, skipped, text, digest, stats)


def _final_states(sim: SimCluster, keys: list[str], n: int) -> dict[str, dict[str, Any]]:
    """node -> key -> VersionSet after the settle. A replica of a key (its preference list) that
    holds nothing while another holds something gets an empty VersionSet, so the convergence
    checker sees "holds nothing" as a disagreement, not as an absence."""
    held = {
        x: {k: vs for k in keys if (vs := sim.procs[x].node.replica.get(k.encode())).clock or vs.siblings}
        for x in sim.names
    }
    return _with_absent(held, sim, n, VersionSet())


def _with_absent(held: dict[str, dict[str, Any]], sim: SimCluster, n: int, empty: Any) -> dict[str, dict[str, Any]]:
    out = {x: dict(v) for x, v in held.items()}
    for k in sorted({k for v in held.values() for k in v}):
        for x in sim.ring.preference_list(k.encode(), n):
            out[x].setdefault(k, empty)
    return {x: dict(sorted(v.items())) for x, v in out.items()}


def history_hash(h: History) -> str:
    """sha256 of the history's saved form (ops, faults, final states, Raft observations)."""
    buf = io.StringIO()
    h.dump(buf)
    return hashlib.sha256(buf.getvalue().encode()).hexdigest()


def run_many(seeds: Sequence[int], **kw: Any) -> list[SimResult]:
    return [run(SimConfig(seed=s, **kw)) for s in seeds]


__all__ = ["SimConfig", "SimResult", "SimCluster", "run", "history_hash", "replay_command", "BUGS"]
