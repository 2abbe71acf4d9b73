"""The configuration group: a thin asyncio driver of raft/core.py's RaftNode inside the daemon.

What it replicates is cluster_config.py's :class:`ClusterConfig` (the ring with every member's
weight, data centre and address, the cluster defaults N/W/R, the epoch). Changes -- ``cluster
add``, ``remove``, ``weight``, a node started with ``--join`` -- are commands in the Raft log;
the epoch rises by one with each, and a node serves by a ring only once it is committed.

Who is in the group. ``--config-voters NAME,NAME,...``; by default the first 3 members of the
epoch-1 ring by name (all of them when there are fewer), which every node computes alike from
the same ``--seeds``. Voters keep their Raft log in ``--raft-dir`` (log.py: fsynced before any
acknowledgement). Every other member is a *learner* of committed configurations only: the leader
pushes each one to every member on commit (CONFIG_PUSH), every non-leader pulls it from the
voters every :data:`PULL_INTERVAL` seconds and at once when a request arrives routed with a
newer epoch than its own (Node.on_newer_epoch). A pushed or pulled configuration is only
adopted when its epoch is larger than the node's, so a node's ring never goes back.

Start. The group begins empty; the first leader proposes the *bootstrap* command: the epoch-1
ring every voter built from ``--seeds`` (membership.py), and the defaults. So a cluster run with
the group serves the very ring the static path builds; the log is what changes it later. A
voter that restarts replays its log and serves the latest committed ring without asking the
seeds.

Why one Raft member per node with ``--workers K``: a Raft member is one durable log and one
vote; K workers voting separately would be K members of one failure domain (and would need K
logs). Worker 0 runs the member; a RAFT or CONFIG_* request that the kernel hands to another
worker is relayed to worker 0 over a private listener whose address worker 0 publishes in the
shared Store (:data:`RELAY_KEY`). Every committed configuration worker 0 adopts is also written
to the Store (:data:`CONFIG_KEY`), and the other workers poll that key (:class:`StoreFollower`):
the Store is the one thing all workers of a node already share, atomically.

Changes are one at a time: the leader refuses a proposal while its previous one is not applied
("a configuration change is in progress"), and checks each against the current state first
(cluster_config.check), so adding a node twice or removing below N is a clear error and nothing
is proposed. The voter set changes one voter at a time (``{"op": "voter", "action": "add" |
"remove", "name"}``, ``shmkv cluster voter``): raft/core.py's configuration entries; a member
being added hosts an empty Raft member when the leader's first message reaches it and learns
the log (or a snapshot) from the leader. A voter must leave the voters before the ring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import Error
from . import wire
from .cluster_config import (
    ClusterConfig,
    apply,
    bootstrap_command,
    check,
    decode_command,
    encode_command,
)
from .errors import ClusterError, ConfigError, ProtocolError
from .raft import codec
from .raft.core import Config as RaftConfig
from .raft.core import RaftNode, Role
from .raft.log import DurableLog
from .raft.types import ConfChange, EntryKind, NotLeader, ProposalRefused, Snapshot
from .raft.types import Message as RaftMessage
from .replica import META
from .ring import Ring
from .transport import Transport, Unreachable
from .wire import Message, Overloaded

if TYPE_CHECKING:
    from ..store import Store
    from .coordinator import Node

log = logging.getLogger("shmkv.cluster.config")

#: seconds per Raft tick. A follower campaigns after 20..40 ticks (1-2 s) without a leader,
#: heartbeats go every 2 ticks (0.1 s). Ticks of 0.05 s rather than 0.1 s with 10..20: the same
#: window in 20 timeout slots rather than 10, so two survivors of a killed leader time out
#: within a message latency of each other (a split vote) half as often, and a node already
#: campaigning retries after 5..10 ticks (core.Config.retry_ticks: election_ticks // 4), 0.25-0.5
#: s. Over 200 seeded leader kills (python -m shmkv.torture.election) a new leader came within
#: 2.2 s of the kill at most, 1% of messages lost included; with the old settings, 3.3 s.
TICK = 0.05
ELECTION_TICKS = 20
HEARTBEAT_TICKS = 2
DEFAULT_VOTERS = 3
PULL_INTERVAL = 1.0
SEND_TIMEOUT = 1.0
CHANGE_TIMEOUT = 10.0
MAX_HOPS = 3
#: Raft messages in flight to one peer before more are dropped (Raft retries what is lost).
MAX_IN_FLIGHT = 8
#: applied entries kept in the log before it is compacted into a snapshot.
COMPACT_EVERY = 256
CONFIG_KEY = META + b"config"
RELAY_KEY = META + b"config-relay"
SERVICE_CODES = (wire.RAFT, wire.CONFIG, wire.CONFIG_PUSH, wire.CONFIG_CHANGE)


def default_voters(ring: Ring, count: int = DEFAULT_VOTERS) -> tuple[str, ...]:
    """The first ``count`` members by name: every node computes the same from the same ring."""
    return tuple(sorted(ring.members)[:count])


OnChange = Callable[[Ring | None, Ring], None]


class ConfigService:
    """One node's part in the configuration group (a voter, or a learner); see the module
    docstring. ``start()`` after the node knows its epoch-1 ring; ``close()`` at stop."""

    def __init__(
        self,
        node: Node,
        transport: Transport,
        voters: Sequence[str] | None,
        raft_dir: str | None,
        *,
        tick: float = TICK,
        seed: int = 0,
        on_change: OnChange | None = None,
        store: Store | None = None,
    ) -> None:
        self.node = node
        self.transport = transport
        self.name = node.config.name
        # None: a voter restarting from its log (raft_dir), which knows the voters
        self.voters = tuple(sorted(voters or ()))
        self.tick = tick
        self.pull_interval = PULL_INTERVAL
        self.on_change = on_change
        self.store = store
        self.state: ClusterConfig | None = None
        self.raft: RaftNode | None = None
        self.log: DurableLog | None = None
        self.raft_dir = raft_dir
        self.seed = seed
        if voters is None or self.name in self.voters:
            if raft_dir is None:
                raise ConfigError(f"{self.name} is a configuration voter and needs --raft-dir")
            self.log = DurableLog(raft_dir)
            restored = self.log.restore()
            fresh = (restored["snapshot"].index == 0 and not restored["snapshot"].voters
                     and not restored["entries"] and restored["hard_state"].term == 0)
            if fresh:  # a founding voter: the initial configuration is its empty snapshot
                if voters is None:
                    raise ConfigError(f"{raft_dir} holds no Raft log to restart from")
                self.log.save_snapshot(Snapshot(voters=self.voters))
                restored = self.log.restore()
            cfg = RaftConfig(election_ticks=ELECTION_TICKS, heartbeat_ticks=HEARTBEAT_TICKS, seed=seed)
            self.raft = RaftNode(self.name, cfg, **restored)
            self.voters = self.raft.voters
            self.state = ClusterConfig.decode(restored["snapshot"].data)
        self._waiters: dict[int, tuple[int, asyncio.Future[ClusterConfig]]] = {}
        self._pending: int | None = None  # index of this leader's uncommitted change
        self._bootstrap_term = -1  # the term in which this node proposed the bootstrap
        self._in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._pull_now = asyncio.Event()
        self._closed = False
        self.leader_hint = ""  # a learner's idea of the leader, from its last pull
        #: more facts for ``status()`` (the daemon adds the rebalancer's progress)
        self.extra_status: Callable[[], dict[str, Any]] | None = None

    # -- life --------------------------------------------------------------------------------

    def restored(self) -> ClusterConfig | None:
        """A voter's configuration from its own log (replayed now), before the node starts
        serving: with one, the node needs no seeds to learn its ring."""
        if self.raft is not None:
            self._process()
        return self.state

    def register(self) -> None:
        """Serve the group's wire codes through the node's handler."""
        self.node.services.update({
            wire.RAFT: self._on_raft,
            wire.CONFIG: self._on_config,
            wire.CONFIG_PUSH: self._on_push,
            wire.CONFIG_CHANGE: self._on_change,
        })
        self.node.on_newer_epoch = lambda _epoch: self._pull_now.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.register()
        if self.state is not None:
            self._adopt(self.state)
        if self.raft is not None:
            self._loops.append(loop.create_task(self._ticker()))
        self._loops.append(loop.create_task(self._puller()))

    async def close(self) -> None:
        self._closed = True
        for t in self._loops + list(self._tasks):
            t.cancel()
        for t in self._loops + list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for _, fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(Overloaded("node is shutting down"))
        self._waiters.clear()
        if self.log is not None:
            self.log.close()
            self.log = None

    # -- the Raft loop ---------------------------------------------------------------------------

    async def _ticker(self) -> None:
        # Ticks keep to a fixed schedule (sleeping ``tick`` after each one would stretch every
        # tick by the time _process takes: a slower election on a loaded machine). A tick late
        # by more than one period is not made up: bursts of ticks after a stall could fire an
        # election before the heartbeats waiting in the socket are read.
        assert self.raft is not None
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self._closed:
            due += self.tick
            now = loop.time()
            if due < now - self.tick:
                due = now
            await asyncio.sleep(max(0.0, due - now))
            if self._closed or self.raft is None:
                return
            self.raft.tick()
            self._process()

    def _process(self) -> None:
        """Drain the node's Ready: persist (fsync), then send, then apply (types.Ready's order)."""
        raft = self.raft
        if raft is None or self._closed:
            return
        while raft.has_ready():
            rd = raft.ready()
            assert self.log is not None
            self.log.persist(rd)
            self._send(rd.messages)
            if rd.snapshot is not None:
                snap_state = ClusterConfig.decode(rd.snapshot.data)
                if snap_state is not None:
                    self.state = snap_state
            for e in rd.committed:
                self._apply(e.index, e.term, e.kind, e.data)
            raft.advance(rd)
        if (raft.applied - raft.snapshot.index >= COMPACT_EVERY and self.state is not None
                and self.log is not None):
            self.log.save_snapshot(raft.compact(raft.applied, self.state.encode()))
        if raft.role == Role.LEADER:
            self._maybe_bootstrap()
        else:
            self._bootstrap_term = -1

    def _maybe_bootstrap(self) -> None:
        raft = self.raft
        assert raft is not None
        if self.state is not None or self._bootstrap_term == raft.term or self.node.ring is None:
            return
        cfg = self.node.config
        self._bootstrap_term = raft.term
        # counts: daemon.check_options refuses level names (--w local_quorum) with the group
        # moves=True: ring changes keep the old owners serving until the copies are pushed
        raft.propose(encode_command(bootstrap_command(self.node.ring, cfg.n, cfg.w, cfg.r,
                                                      moves=True)))
        log.info("%s leads term %d: proposing the bootstrap configuration (epoch %d)",
                 self.name, raft.term, self.node.ring.epoch)
        self._process()

    def _apply(self, index: int, term: int, kind: EntryKind, data: bytes) -> None:
        waiter = self._waiters.pop(index, None)
        if self._pending is not None and index >= self._pending:
            self._pending = None
        if kind == EntryKind.CONF and self.raft is not None:
            self.voters = tuple(sorted(self.raft.voters))
            log.info("%s: configuration voters now %s", self.name, ", ".join(self.voters))
            if waiter is not None and not waiter[1].done():
                if waiter[0] != term or self.state is None:
                    waiter[1].set_exception(ClusterError("the change was superseded by another leader; retry"))
                else:
                    waiter[1].set_result(self.state)
            return
        if kind != EntryKind.NORMAL or not data:
            if waiter is not None and not waiter[1].done():
                waiter[1].set_exception(ClusterError("the change was superseded by another leader; retry"))
            return
        try:
            cmd = decode_command(data)
        except ProtocolError as e:
            log.error("%s: skipping entry %d: %s", self.name, index, e)
            return
        old = self.state
        new, why = apply(old, cmd)
        self.state = new
        if waiter is not None and not waiter[1].done():
            if waiter[0] != term:
                waiter[1].set_exception(ClusterError("the change was superseded by another leader; retry"))
            elif why is not None or new is None:
                waiter[1].set_exception(ConfigError(why or "refused"))
            else:
                waiter[1].set_result(new)
        if why is None and new is not None:
            log.info("%s: configuration epoch %d committed (%s)", self.name, new.epoch, _describe(cmd))
            self._adopt(new)
            if self.raft is not None and self.raft.role == Role.LEADER:
                self._push(new, old.ring if old is not None else None)

    def _send(self, msgs: Sequence[RaftMessage]) -> None:
        by_dst: dict[str, list[Any]] = {}
        for m in msgs:
            by_dst.setdefault(m.dst, []).append(codec.encode(m))
        for dst, batch in by_dst.items():
            addr = self._addr(dst)
            if addr is None or self._in_flight.get(dst, 0) >= MAX_IN_FLIGHT:
                continue  # lost, as a network may lose it: Raft sends again
            self._in_flight[dst] = self._in_flight.get(dst, 0) + 1
            self._spawn(self._send_one(dst, addr, Message(wire.RAFT, 0, {"from": self.name, "msgs": batch})))

    async def _send_one(self, dst: str, addr: str, msg: Message) -> None:
        try:
            await self.transport.request(addr, msg, SEND_TIMEOUT)
        except (Error, OSError) as e:
            log.debug("%s: raft message to %s lost: %s", self.name, dst, e)
        finally:
            self._in_flight[dst] -= 1

    def _addr(self, name: str) -> str | None:
        for ring in (self.state.ring if self.state is not None else None, self.node.ring):
            if ring is not None and name in ring.members:
                return ring.members[name].addr
        return None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- learning configurations ---------------------------------------------------------------

    def _offer(self, raw: Any) -> bool:
        """Adopt the configuration ``raw`` (its wire form) if it is newer. The epoch is looked at
        before the ring is built: building one costs milliseconds (its vnodes), and pulls and
        pushes mostly bring what the node has already."""
        try:
            epoch = raw["ring"]["epoch"]
        except (KeyError, TypeError):
            raise ProtocolError("cluster configuration must be a map with a ring") from None
        known = self.node.ring.epoch if self.node.ring is not None else -1
        if self.raft is None:  # a learner also keeps the configuration it serves by
            known = min(known, self.state.epoch) if self.state is not None else -1
        if isinstance(epoch, int) and epoch <= known:
            return False
        return self._adopt(ClusterConfig.from_wire(raw))

    def _adopt(self, cfg: ClusterConfig) -> bool:
        """Serve by ``cfg`` if it is newer than the node's ring (never go back)."""
        if cfg.n != self.node.config.n:
            log.error("%s: committed configuration has N=%d, this node runs N=%d: not adopted",
                      self.name, cfg.n, self.node.config.n)
            return False
        if self.raft is None and (self.state is None or cfg.epoch > self.state.epoch):
            self.state = cfg  # a learner's state is what it learnt (a voter's: its log's)
        old = self.node.ring
        if old is not None and cfg.epoch <= old.epoch:
            return False
        self.node.moving = cfg.moving  # before the ring: never a new ring without its move
        self.node.ring = cfg.ring
        self.node.config.w, self.node.config.r = cfg.w, cfg.r
        if self.store is not None:
            with contextlib.suppress(Error, OSError):
                self.store.put(CONFIG_KEY, cfg.encode())
        if old is not None:
            log.info("%s: now at ring epoch %d (%d members)", self.name, cfg.epoch, len(cfg.ring.members))
        if self.on_change is not None:
            self.on_change(old, cfg.ring)
        return True

    def _push(self, cfg: ClusterConfig, old: Ring | None) -> None:
        names = set(cfg.ring.members) | (set(old.members) if old is not None else set())
        for name in sorted(names - {self.name}):
            member = cfg.ring.members.get(name) or (old.members[name] if old is not None else None)
            if member is not None:
                msg = Message(wire.CONFIG_PUSH, 0, {"config": cfg.to_wire(), "from": self.name})
                self._spawn(self._quiet(self.transport.request(member.addr, msg, SEND_TIMEOUT)))

    @staticmethod
    async def _quiet(aw: Any) -> None:
        with contextlib.suppress(Error, OSError):
            await aw

    async def _puller(self) -> None:
        """Every PULL_INTERVAL (or at once when told of a newer epoch): a node that is not the
        leader asks a voter for the committed configuration."""
        while not self._closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._pull_now.wait(), self.pull_interval)
            self._pull_now.clear()
            if self.raft is not None and self.raft.role == Role.LEADER:
                continue
            await self.pull()

    async def pull(self, addrs: Sequence[str] = ()) -> bool:
        """Ask the voters (the leader first when known; or ``addrs``, for a node that knows no
        ring yet) for their configuration; adopt a newer one. Whether one was adopted."""
        order = [v for v in self.voters if v != self.name]
        lead = self.raft.lead if self.raft is not None else self.leader_hint
        if lead in order:
            order.remove(lead)
            order.insert(0, lead)
        targets = [a for a in (self._addr(v) for v in order) if a is not None] + list(addrs)
        for addr in targets:
            try:
                reply = await self.transport.request(addr, Message(wire.CONFIG, 0, {}), SEND_TIMEOUT)
                raw = reply.fields.get("config")
                raft = reply.fields.get("raft") or {}
                if isinstance(raft, dict) and isinstance(raft.get("leader"), str):
                    self.leader_hint = raft["leader"]
                if (self.raft is None and isinstance(raft, dict) and isinstance(raft.get("voters"), list)
                        and raft.get("voter") and raft["voters"]):
                    self.voters = tuple(sorted(str(v) for v in raft["voters"]))  # a voter's word
                if raw is None:
                    continue
                return self._offer(raw)
            except (Error, OSError) as e:
                log.debug("%s: pull from %s failed: %s", self.name, addr, e)
        return False

    # -- handlers ------------------------------------------------------------------------------

    def _host_member(self) -> None:
        """Become a Raft member with an empty log: the leader is adding this node as a voter
        (``voter add``) and sends it the log (or a snapshot); it learns the voter set from the
        configuration entry that adds it (raft/types.ConfChange), not from any seed."""
        if self.raft_dir is None:
            raise ConfigError(f"{self.name} cannot become a configuration voter: it runs without --raft-dir")
        self.log = DurableLog(self.raft_dir)
        restored = self.log.restore()
        if restored["entries"] or restored["snapshot"].index or restored["hard_state"].term:
            self.log.close()
            self.log = None
            raise ConfigError(f"{self.raft_dir} holds an old Raft log: {self.name} cannot join the voters "
                              "with it (start it with a fresh --raft-dir)")
        cfg = RaftConfig(election_ticks=ELECTION_TICKS, heartbeat_ticks=HEARTBEAT_TICKS, seed=self.seed)
        self.raft = RaftNode(self.name, cfg, **restored)
        self._loops.append(asyncio.get_running_loop().create_task(self._ticker()))
        log.info("%s: hosting a configuration group member (being added as a voter)", self.name)

    async def _on_raft(self, msg: Message) -> Message:
        if self.raft is None and any(codec.decode(raw).dst == self.name for raw in msg.fields["msgs"]):
            self._host_member()  # the leader added this node as a voter (or is about to)
        if self.raft is None:
            raise ConfigError(f"{self.name} is not a configuration voter")
        for raw in msg.fields["msgs"]:
            m = codec.decode(raw)
            if m.dst == self.name:
                self.raft.step(m)
        self._process()
        return Message(wire.OK, 0, {})

    async def _on_config(self, _msg: Message) -> Message:
        return Message(wire.OK, 0, {"config": self.state.to_wire() if self.state else None,
                                    "raft": self.status()})

    async def _on_push(self, msg: Message) -> Message:
        self._offer(msg.fields["config"])
        return Message(wire.OK, 0, {"epoch": self.node.ring.epoch if self.node.ring else 0})

    async def _on_change(self, msg: Message) -> Message:
        cmd = msg.fields["cmd"]
        if not isinstance(cmd, dict):
            raise ConfigError("a configuration change must be a map")
        cfg = await self.change(cmd, hops=int(msg.fields.get("hops") or 0))
        return Message(wire.OK, 0, {"config": cfg.to_wire()})

    def status(self) -> dict[str, Any]:
        """This node's view of the group, for ``cluster status``."""
        raft = self.raft
        lead = raft.lead if raft is not None else self.leader_hint
        out: dict[str, Any] = {
            "name": self.name,
            "voter": raft is not None and self.name in raft.voters,
            "voters": list(self.voters),
            "leader": lead,
            "leader_addr": self._addr(lead) if lead else None,
            "epoch": self.node.ring.epoch if self.node.ring is not None else 0,
            "config_epoch": self.state.epoch if self.state is not None else 0,
        }
        mv = self.state.moving if self.state is not None else None
        if mv is not None:  # a ring change whose copies are not all pushed yet (cluster_config.Move)
            out["moving"] = mv.view()
        if self.extra_status is not None:
            out.update(self.extra_status())
        if raft is not None:
            out.update(role=raft.role.value, term=raft.term, commit=raft.commit, applied=raft.applied,
                       last_index=raft.last_index())
        return out

    # -- proposals -----------------------------------------------------------------------------

    async def change(self, cmd: dict[str, Any], *, hops: int = 0,
                     timeout: float = CHANGE_TIMEOUT) -> ClusterConfig:
        """Commit ``cmd`` through the leader (forwarded there from any node); the committed
        configuration. :raises ConfigError: refused (named). :raises Overloaded: no leader now."""
        raft = self.raft
        if raft is not None and raft.role == Role.LEADER:
            return await self._propose(cmd, timeout)
        lead = raft.lead if raft is not None else self.leader_hint
        targets = [lead] if lead and lead != self.name else []
        targets += [v for v in self.voters if v not in targets and v != self.name]
        if hops >= MAX_HOPS or (raft is not None and not lead):
            raise Overloaded(f"no configuration leader known to {self.name} yet; retry")
        last: BaseException | None = None
        for name in targets:
            addr = self._addr(name)
            if addr is None:
                continue
            fwd = Message(wire.CONFIG_CHANGE, 0, {"cmd": cmd, "hops": hops + 1})
            try:
                reply = await self.transport.request(addr, fwd, timeout + SEND_TIMEOUT)
            except (Overloaded, Unreachable) as e:  # not there, or no leader: try another voter
                last = e
                continue
            cfg = ClusterConfig.from_wire(reply.fields["config"])
            self._adopt(cfg)
            return cfg
        raise Overloaded(f"no configuration voter took the change: {last}")

    async def _propose(self, cmd: dict[str, Any], timeout: float) -> ClusterConfig:
        raft = self.raft
        assert raft is not None
        if self._pending is not None:
            raise ConfigError(
                f"a configuration change is in progress (log index {self._pending}); retry once it commits"
            )
        if cmd.get("op") == "voter":
            index = self._propose_voter(cmd)
        else:
            why = check(self.state, cmd)
            if why is not None:
                raise ConfigError(why)
            if cmd.get("op") == "remove" and cmd.get("name") in raft.voters:
                raise ConfigError(
                    f"cannot remove {cmd['name']}: it is a configuration voter; first `shmkv cluster voter "
                    f"remove {cmd['name']}` (and `voter add` another member to keep 3)"
                )
            index = self._propose_ring(cmd)
        fut: asyncio.Future[ClusterConfig] = asyncio.get_running_loop().create_future()
        self._waiters[index] = (raft.term, fut)
        self._pending = index
        self._process()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise ClusterError(
                f"the change at log index {index} was not committed within {timeout:g} s; it may "
                "still commit: check `shmkv cluster status`"
            ) from None

    def _propose_voter(self, cmd: dict[str, Any]) -> int:
        """``{"op": "voter", "action": "add"|"remove", "name"}``: one voter in or out of the
        group (raft/core.py's one-at-a-time change). Not a ring change: the epoch stays."""
        raft = self.raft
        assert raft is not None
        action, name = cmd.get("action"), cmd.get("name")
        if action not in ("add", "remove") or not isinstance(name, str) or not name:
            raise ConfigError(f"a voter change needs action add or remove and a name, got {cmd!r}")
        members = self.state.ring.members if self.state is not None else {}
        if action == "add" and name not in members:
            raise ConfigError(f"cannot make {name} a voter: it is not a member of the ring "
                              f"(members: {', '.join(sorted(members))})")
        if action == "add" and name in raft.voters:
            raise ConfigError(f"{name} is already a configuration voter (voters: {', '.join(raft.voters)})")
        if action == "remove" and name not in raft.voters:
            raise ConfigError(f"{name} is not a configuration voter (voters: {', '.join(raft.voters)})")
        if action == "remove" and len(raft.voters) <= 2:
            raise ConfigError(f"cannot remove {name}: {len(raft.voters) - 1} voter would be left; add "
                              "another voter first (a group of one has no fault tolerance)")
        try:
            return raft.propose_conf_change(ConfChange(action, name))
        except (NotLeader, ProposalRefused) as e:
            raise Overloaded(f"{self.name}: {e}; retry") from None

    def _propose_ring(self, cmd: dict[str, Any]) -> int:
        raft = self.raft
        assert raft is not None
        try:
            return raft.propose(encode_command(cmd))
        except (NotLeader, ProposalRefused) as e:
            raise Overloaded(f"{self.name}: {e}; retry") from None


class StoreFollower:
    """Workers 1..K-1 of a node: adopt what worker 0 wrote to the Store's CONFIG_KEY, and relay
    the group's wire codes to worker 0 (module docstring)."""

    def __init__(self, node: Node, store: Store, transport: Transport, on_change: OnChange | None = None,
                 interval: float = 0.2) -> None:
        self.node, self.store, self.transport = node, store, transport
        self.on_change = on_change
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        for code in SERVICE_CODES:
            self.node.services[code] = self._relay
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _relay(self, msg: Message) -> Message:
        addr = self.store.get(RELAY_KEY)
        if not isinstance(addr, bytes):
            raise Overloaded("the node's configuration worker is not up yet")
        return wire.raise_for_error(
            await self.transport.request(addr.decode(), Message(msg.code, 0, msg.fields), CHANGE_TIMEOUT + 2)
        )

    async def _poll(self) -> None:
        while True:
            self.check()
            await asyncio.sleep(self.interval)

    def check(self) -> None:
        raw = self.store.get(CONFIG_KEY)
        if not isinstance(raw, bytes):
            return
        try:
            cfg = ClusterConfig.decode(raw)
        except ProtocolError:
            return
        old = self.node.ring
        if cfg is not None and (old is None or cfg.epoch > old.epoch):
            self.node.moving = cfg.moving
            self.node.ring = cfg.ring
            self.node.config.w, self.node.config.r = cfg.w, cfg.r

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _describe(cmd: dict[str, Any]) -> str:
    op = cmd.get("op")
    if op == "bootstrap":
        return "bootstrap"
    if op == "add":
        return f"add {cmd.get('name')} at {cmd.get('addr')} weight {cmd.get('weight', 1.0):g}"
    if op == "streamed":
        return (f"move of epoch {cmd.get('move')} ended by the operator" if cmd.get("force")
                else f"{cmd.get('name')} streamed its copies of the move of epoch {cmd.get('move')}")
    if op == "weight":
        auto = " (auto-balance)" if cmd.get("auto") else ""
        return f"weight {cmd.get('name')} {cmd.get('weight'):g}{auto}"
    return f"{op} {cmd.get('name')}"


__all__ = ["ConfigService", "StoreFollower", "default_voters", "TICK", "CONFIG_KEY", "RELAY_KEY"]
