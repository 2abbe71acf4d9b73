"""One node's request handling: coordinate client requests, serve replica requests.

A client request goes: placement (the key's preference list on this node's ring) -> transport
(one replica request to every other replica, in parallel) -> quorum (quorum.py's tallies decide)
-> an answer after W acks or R answers -> read repair in the background. Everything here talks to
the network only through the :class:`~shmkv.cluster.transport.Transport` interface and keeps no
clock of its own (every replica request carries its timeout; the transport keeps it), so the
simulated network of tests/cluster/sim.py drives this same code deterministically.

Who coordinates. A node coordinates only keys whose preference list holds it: its own copy is the
one whose dots it mints (versions.py's REQUIRES), so a write is first applied locally and then sent
to the N-1 others. A ring-aware request (it carries an ``epoch``) for a key this node does not
hold, or routed with another epoch, is answered ``ERR_WRONG_EPOCH`` and the client refreshes its
ring. A request without an epoch (a tool that does not know the ring) is forwarded to the key's
first reachable primary instead.

Failing loudly, and honestly. A replica is skipped when gossip (gossip.py, ``node.gossip``)
holds it down, and also while it is *suspected* by this node's own small detector: a replica
whose request failed as unreachable or timed out is suspected until a probe (:meth:`Node.probe`,
looped by the daemon) or any later reply shows it back. With a primary skipped, a write is
sloppy (handoff.py, ``node.handoff``): the next healthy node of the ring takes it as a hint for
that primary and its ack counts toward W, unless the cluster (``Config.strict``) or the request
(``strict``) is strict. Without ``node.gossip`` and ``node.handoff`` (the simulator's plain nodes)
nothing of that happens, and with every node up it changes nothing either. A write whose up replicas are fewer than W is refused before anything is written
(:class:`QuorumError`, "write not applied"); a write that was started -- it is applied locally
first -- and then missed W is :class:`MaybeApplied`: it *was* applied somewhere, and a later read
may see it. Rejected: writing first and reporting a plain failure on a shortfall -- the caller
would believe the value gone while an R=1 read returns it. A read with fewer than R answers is a
:class:`QuorumError` saying how many answered.

Invariant: every request this node answers was answered within its timeout plus one replica
round (the transport's contract bounds every replica request), and a background task (read
repair, the rest of a fan-out) never delays an answer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import Error
from . import wire
from .cluster_config import Move
from .crdt import PNCounter
from .errors import (
    ClusterError,
    ConfigError,
    Conflict,
    MaybeApplied,
    ProtocolError,
    QuorumError,
    WrongEpoch,
)
from .levels import Level, Need, check_level, need
from .membership import check_peer
from .nodeconfig import DEFAULT_TIMEOUT, Config
from .placement import apl
from .quorum import FAILED, OK, PENDING, ReadTally, WriteTally, check_quorum
from .replica import VERSIONS, Replica
from .ring import Ring
from .transport import RequestTimeout, Transport, Unreachable
from .versions import MAX_TTL_MS, Context, VersionSet
from .wire import BadRequest, Message, Overloaded

log = logging.getLogger("shmkv.cluster.coordinator")

#: A node that is starting (ring unknown yet) or stopping answers this, as ERR_OVERLOADED.
NOT_READY = "node is starting: the ring is not known yet"
DRAINING = "node is shutting down"

#: TEST ONLY -- never set it in production. A deliberately broken coordinator, so the torture
#: harness can show its checkers catch a real daemon that breaks its promise
#: (tests/torture/test_local_bugs.py, simulate.py's ``--bug``). Values:
#:
#: - ``ack-before-w``: a write (put/delete) is acknowledged once the *local* copy holds it, and
#:   sent to the other replicas only ``TEST_BUG_DELAY`` s later (write-behind) -- an ack before W
#:   replicas hold the write. A read through another coordinator meanwhile misses an
#:   acknowledged write, and a coordinator paused or killed in that window never sends it.
#: - ``repair-overwrites``: read repair *replaces* a stale replica's copy with the merge the read
#:   saw instead of merging into it (this module's ``_repair``/``_repair_many_after`` and the
#:   REPLICA_PUT handler): a newer version that landed on the replica after the read is lost.
#: - ``hint-early-delete``: hinted handoff deletes a batch of hints when it sends them, before
#:   the owner acknowledged them (handoff.py, ``Handoff.deliver_once``): a lost delivery loses
#:   the hinted writes on the owner.
#: - ``tombstone-early-gc``: anti-entropy collects tombstones without waiting for their grace
#:   period (antientropy.py, ``AntiEntropy.collect``): a replica that missed the delete brings
#:   the deleted value back.
#:
#: This is the one place the switch is read (``Node.test_bug``); the daemon hands the node's value
#: to its Handoff (``Handoff.test_bug``), anti-entropy reads ``node.test_bug``. Unset -- always,
#: outside the torture tests -- every branch above is dead code.
TEST_BUG_ENV = "SHMKV_TEST_ONLY_BUG"
TEST_BUGS = ("ack-before-w", "repair-overwrites", "hint-early-delete", "tombstone-early-gc")
TEST_BUG_DELAY = 0.5


@dataclass
class Stats:
    requests: dict[str, int] = field(default_factory=dict)
    quorum_failures: int = 0
    maybe_applied: int = 0
    read_repairs: int = 0
    forwarded: int = 0


_Outcome = tuple[str, Message | None, BaseException | None]
#: Need of a plain count W/R (levels.need's answer for an int), one object per count
_COUNTS: dict[int, Need] = {}


#: The configuration group's codes (config_service.py): refused by a node that runs none.
_CONFIG_CODES = frozenset((wire.RAFT, wire.CONFIG, wire.CONFIG_PUSH, wire.CONFIG_CHANGE))


class Node:
    """The request handler of one daemon: ``await node.handle(msg) -> reply``.

    ``ring`` is None until the node has learnt it (membership.join_static); until then every
    request but PING, STATUS and RING is answered "overloaded: starting".
    """

    def __init__(self, config: Config, transport: Transport, replica: Replica) -> None:
        self.config = config
        self.transport = transport
        self.replica = replica
        self._ring_now: Ring | None = None
        self._same_since = 0  # the first epoch whose ring places keys as the current one does
        self._moving: Move | None = None
        self.suspects: set[str] = set()
        self.draining = False
        self.in_flight = 0
        self.stats = Stats()
        # Failure handling (issue 12), set by the daemon once the ring is known: gossip's
        # verdicts (is_down, peers) and this process's hints. None: neither is used.
        self.gossip: Any = None
        self.handoff: Any = None
        # What a process on this host needs to read this node's copies from shared memory
        # (client.py's zero-hop reads): name, store, host; with --workers, this worker's index.
        # Set by the daemon; empty in the simulator.
        self.local: dict[str, Any] = {}
        self.test_bug = os.environ.get(TEST_BUG_ENV) or None  # see TEST_BUG_ENV: tests only
        if self.test_bug is not None and self.test_bug not in TEST_BUGS:
            raise ConfigError(f"{TEST_BUG_ENV}={self.test_bug!r}: expected one of {', '.join(TEST_BUGS)}")
        #: more STATUS sections, by name (antientropy.py adds its counters)
        self.status_extra: dict[str, Callable[[], Any]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._fanouts: set[_FanOut] = set()  # with replica requests still out (drain waits)
        self._idle = asyncio.Event()
        self._idle.set()
        # Handlers of codes served by other components (the configuration group's RAFT,
        # CONFIG...: config_service.py), answered before the ring checks below.
        self.services: dict[int, Callable[[Message], Coroutine[Any, Any, Message]]] = {}
        # Called with the epoch of a request routed with a *newer* ring than this node's: the
        # configuration service pulls the committed configuration at once instead of waiting.
        self.on_newer_epoch: Callable[[int], None] | None = None
        #: the daemon turns it on (the simulator's scenarios keep one replica request per key):
        #: the replica requests of the GETs and PUTs coordinated within one loop iteration go
        #: to each replica as one REPLICA_GET_MANY / REPLICA_PUT_MANY (_Batches)
        self.batch_replica_requests = False
        self._batches = _Batches(self)

    @property
    def ring(self) -> Ring | None:
        """The ring this node routes by (None: not known yet). Setting it applies the
        cluster's replication map (``Config.n_per_dc``), whoever sets it (the static join, the
        configuration service, a test): every placement here is by the one map."""
        return self._ring_now

    @ring.setter
    def ring(self, ring: Ring | None) -> None:
        if ring is not None and self.config.n_per_dc is not None:
            ring = ring.with_replication(self.config.n_per_dc)
        old = self._ring_now
        if ring is None or old is None or not _same_placement(old, ring) or ring.epoch < old.epoch:
            self._same_since = ring.epoch if ring is not None else 0
            if ring is not None and old is not None and self.gossip is not None:
                self._follow_members(ring)
        self._ring_now = ring

    def _follow_members(self, ring: Ring) -> None:
        """Gossip with the new ring's members -- and, while a move is on, the old ring's: an old
        owner removed by the change still serves its copies and must not be judged down for
        silence (it would be skipped)."""
        members = {m.name: m.addr for m in ring.members.values()}
        if self._moving is not None:
            members = {**{m.name: m.addr for m in self._moving.ring.members.values()}, **members}
        try:
            self.gossip.set_members(members)
        except Exception:  # noqa: BLE001 -- liveness follows best effort; never fail a ring change
            log.exception("%s: gossip could not follow the ring change", self.config.name)

    def _epoch_near(self, epoch: int, ring: Ring) -> bool:
        """``epoch`` routes exactly as ``ring`` does, though it is not ``ring``'s: an older epoch
        since the members last changed, or -- while a move is on -- one of the next epochs, which
        can only be the awaited owners' ``streamed`` reports (cluster_config.py: no ring change
        commits before the move ends). Those epochs differ only by the reports, so a request
        routed by one is served as if routed by this node's (no refusal for a report's bump)."""
        if type(epoch) is not int:
            return False
        mv = self._moving
        ahead = len(mv.waiting) if mv is not None else 0
        return self._same_since <= epoch <= ring.epoch + ahead

    @property
    def moving(self) -> Move | None:
        """The ring change whose copies are still being pushed (cluster_config.Move), or None:
        then every key is served by ``ring`` alone (the fast path). While it is set, a key whose
        preference list differs in ``moving.ring`` (the old ring) is *moving*: it is read from
        R old and R new owners and written to W of the old and W of the new (module docstring of
        cluster_config.py, "Moves"), and this node also serves replica requests for the keys the
        old ring gave it."""
        return self._moving

    @moving.setter
    def moving(self, mv: Move | None) -> None:
        if mv is not None and self.config.n_per_dc is not None:
            mv = Move(mv.epoch, mv.ring.with_replication(self.config.n_per_dc), mv.waiting)
        self._moving = mv

    def _addr_of(self, ring: Ring, node: str) -> str:
        """``node``'s address: in ``ring``, else in the moving ring (an old owner the change
        removed still serves its copies until the move ends)."""
        m = ring.members.get(node)
        if m is None and self._moving is not None:
            m = self._moving.ring.members.get(node)
        if m is None:
            raise Unreachable(f"{node} is not a member at ring epoch {ring.epoch}", sent=False)
        return m.addr

    def _old_prefs(self, key: bytes, prefs: Sequence[str]) -> list[str] | None:
        """``key``'s old owners while it moves (None: it does not move, or nothing moves)."""
        mv = self._moving
        if mv is None:
            return None
        old = mv.ring.preference_list(key, self.config.n)
        return None if set(old) == set(prefs) else old

    # -- the entry point -------------------------------------------------------------------

    async def handle(self, msg: Message) -> Message:
        code = msg.code
        name = wire.NAMES.get(code) or str(code)
        requests = self.stats.requests
        requests[name] = requests.get(name, 0) + 1
        if code == wire.PING:
            return Message(wire.OK, 0, {})
        service = self.services.get(code)
        if service is not None:
            return await service(msg)
        if code in _CONFIG_CODES:
            raise BadRequest(f"{name}: {self.config.name} runs no configuration group (see --raft-dir)")
        if code == wire.STATUS:
            check_peer(self.config, self.ring, msg.fields)
            return Message(wire.OK, 0, {"status": self.status()})
        if code == wire.RING:
            if self.ring is None:
                raise Overloaded(NOT_READY)
            return Message(wire.OK, 0, {"ring": self.ring.to_wire(), **self._defaults(), "local": self.local})
        if code == wire.GOSSIP:
            if self.gossip is None:
                raise Overloaded(NOT_READY)
            result: Message = await self.gossip.handle(msg)
            return result
        if self.ring is None:
            raise Overloaded(NOT_READY)
        if self.draining:
            raise Overloaded(DRAINING)
        self.in_flight += 1
        self._idle.clear()
        try:
            return await self._dispatch(code, msg.fields)
        except WrongEpoch as e:
            if self.on_newer_epoch is not None and e.got > e.expected:
                self.on_newer_epoch(e.got)
            # The answer carries this node's ring, so a requester can catch up without asking.
            return Message(
                wire.ERR_WRONG_EPOCH,
                0,
                {"message": str(e), "expected": e.expected, "got": e.got, "ring": self._ring().to_wire()},
            )
        except QuorumError as e:
            self.stats.quorum_failures += 1
            if isinstance(e, MaybeApplied):
                self.stats.maybe_applied += 1
            raise
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def _dispatch(self, code: int, f: Any) -> Message:
        # -- replica requests: this node's copies; refused for a key it holds no copy of
        if code == wire.REPLICA_GET:
            self._check_replica(f["epoch"], [f["key"]])
            vs = self.replica.get(f["key"])
            return Message(wire.OK, 0, {"versions": vs.to_wire()})
        if code == wire.REPLICA_PUT:
            self._check_replica(f["epoch"], [f["key"]])
            # an expiry travels inside the versions (versions.py, "Expiry"); no ttl_ms here
            vs = VersionSet.from_wire(f["versions"])
            if self.test_bug == "repair-overwrites" and f.get("repair"):  # DELIBERATE BUG (TEST_BUG_ENV)
                vs = self._overwrite(f["key"], vs)
            else:
                vs = self.replica.merge(f["key"], vs)
            if f.get("ack"):  # the sender reads only that it is done (a write's fan-out)
                return Message(wire.OK, 0, {})
            return Message(wire.OK, 0, {"versions": vs.to_wire()})
        if code == wire.REPLICA_GET_MANY:
            keys = _keys(f["keys"])
            self._check_replica(f["epoch"], keys)
            return Message(wire.OK, 0, {"versions": [self.replica.get(k).to_wire() for k in keys]})
        if code == wire.REPLICA_PUT_MANY:
            # Every item is decoded and checked before any is merged: a bad batch changes nothing.
            items = [(k, VersionSet.from_wire(v)) for k, v in _pairs(f["items"])]
            self._check_replica(f["epoch"], [k for k, _ in items])
            for k, vs in items:
                if self.test_bug == "repair-overwrites" and f.get("repair"):  # DELIBERATE BUG
                    self._overwrite(k, vs)
                else:
                    self.replica.merge(k, vs)
            return Message(wire.OK, 0, {})
        if code == wire.HINT_PUT:
            if self.handoff is None:
                raise BadRequest(f"{self.config.name} keeps no hints")
            self._check_epoch(f["epoch"])
            reply: Message = self.handoff.accept(f)
            return reply
        if code == wire.REPLICA_COUNTER:
            self._check_replica(f["epoch"], [f["key"]])
            c = self.replica.merge_counter(f["key"], PNCounter.from_wire(f["counter"]))
            return Message(wire.OK, 0, {"counter": c.to_wire()})
        # -- client requests: coordinated here, or forwarded / refused
        if code in (wire.GET_MANY, wire.PUT_MANY):
            return await self._batch(code, f)
        key = f["key"]
        if not isinstance(key, bytes) or not key:
            raise BadRequest("key must be non-empty bytes")
        n = self.config.n
        ring = self._ring()
        prefs = ring.preference_list(key, n)
        epoch = f.get("epoch")
        # (_epoch_ok's first test inline: the request routed by this node's ring, the common case)
        if self.config.name not in prefs or not (epoch == ring.epoch or self._epoch_ok(epoch)):
            if f.get("epoch") is not None:
                raise WrongEpoch(
                    f"{self.config.name} (epoch {ring.epoch}) does not coordinate this key "
                    f"under the request's epoch {f.get('epoch')}; refresh the ring",
                    expected=ring.epoch,
                    got=f.get("epoch") or 0,
                )
            return await self._forward(code, f, prefs)
        timeout = self._timeout(f)
        old = self._old_prefs(key, prefs) if self._moving is not None else None
        if code in (wire.GET, wire.GET_VERSIONS):
            r = f.get("r") or self.config.r
            if old is None and r == 1 and type(r) is int and len(prefs) == 1:
                vs = self.replica.get(key)  # N=1: what read() answers, without its coroutine
            elif old is None:
                strict = None if f.get("strict") is None else bool(f["strict"])
                vs = await self.read(key, prefs, r, timeout, strict=strict)
            else:
                vs = await self.read_moving(key, prefs, old, r, timeout)
            if code == wire.GET_VERSIONS:
                vs = vs.visible(self.replica.now_ms())
                return Message(wire.OK, 0, {"values": vs.values, "context": vs.context.encode()})
            return Message(wire.OK, 0, self.get_answer(key, vs))
        if code in (wire.PUT, wire.DELETE):
            w = f.get("w") or self.config.w
            raw_ctx = f.get("context")
            ctx = Context.decode(raw_ctx) if raw_ctx is not None else None
            value = f["value"] if code == wire.PUT else None
            strict = self.config.strict if f.get("strict") is None else bool(f["strict"])
            ttl = _ttl(f.get("ttl_ms")) if code == wire.PUT else None  # a tombstone never expires
            if old is None and w == 1 and type(w) is int and len(prefs) == 1:
                # N=1: what write() does then (its N=1 branch), without its coroutine
                vs = self.replica.coordinate(key, value, ctx, self._expires(ttl))
            elif old is None:
                vs = await self.write(key, value, ctx, prefs, w, timeout, ttl, strict=strict)
            else:
                vs = await self.write_moving(key, value, ctx, prefs, old, w, timeout, ttl)
            if f.get("ack"):  # the requester does not read the new context (RESP SET)
                return Message(wire.OK, 0, {})
            return Message(wire.OK, 0, {"context": vs.context.encode()})
        if code == wire.INCR:
            w = f.get("w") or self.config.w
            if old is None:
                value = await self.incr(key, f["delta"], prefs, w, timeout)
            else:
                value = await self.incr_moving(key, f["delta"], prefs, old, w, timeout)
            return Message(wire.OK, 0, {"value": value})
        raise BadRequest(f"{wire.NAMES.get(code, code)} is not served here")

    def get_answer(self, key: bytes, vs: VersionSet) -> dict[str, Any]:
        """A GET's answer from what its read merged: the value (None: none, or deleted), the
        context, and the expiry when every live version has one.

        :raises Conflict: concurrent versions (siblings), carrying their values and context.
        """
        vs = vs.visible(self.replica.now_ms())
        seen = vs.context.encode()
        values = vs.distinct_values
        if len(values) > 1 and not vs.is_deleted:
            raise Conflict(
                f"{len(values)} concurrent versions of {key!r}: resolve them with "
                "GET_VERSIONS and a PUT with the context",
                values=values,
                context=seen,
            )
        got: dict[str, Any] = {"value": None if vs.is_deleted else values[0], "context": seen}
        live = [s.expires for s in vs.siblings if s.value is not None]
        if live and None not in live:  # served until the last of its versions expires
            got["expires"] = max(x for x in live if x is not None)  # (RESP TTL/PTTL)
        return got

    # -- coordination ----------------------------------------------------------------------

    async def read(
        self, key: bytes, prefs: Sequence[str], r: Level, timeout: float, *, strict: bool | None = None,
    ) -> VersionSet:
        """Read ``key`` from its replicas ``prefs`` (this node among them); the merge of the first
        R answers (R a count or a level: levels.py). The rest are awaited in the background and
        every stale answer repaired. Strict (the cluster's or the request's): answers that
        disagreed are written back before the read answers (:meth:`_write_back`)."""
        op = self.begin_read(key, prefs, r, timeout)
        if op.waiter is not None:
            await op.waiter
        result = op.result()
        tally = op.tally
        if tally is not None and (self.config.strict if strict is None else strict) and tally.stale():
            await self._write_back([(key, tally, result)], timeout)
        return result

    def begin_read(self, key: bytes, prefs: Sequence[str], r: Level, timeout: float) -> _Read:
        """:meth:`read` up to its wait, without a coroutine (as :meth:`begin_write`): the local
        copy is read and the other replicas asked when this returns; decided once ``waiter``
        (None: at once) is done, :meth:`_Read.result` is then the merge of the first R answers.
        A strict read's write-back is :meth:`read`'s, after it.

        :raises QuorumError: fewer than R replicas up.
        """
        n = len(prefs)
        nd = self._need(r, prefs, "R")
        if n == 1 and nd.total == 1 and not nd.per_dc:
            # N=1: the local copy (this node coordinates: prefs == [it]) is the read -- what the
            # tally below would answer, with nothing to wait for or repair
            return _Read(self, key, self.replica.get(key), None, timeout)
        up = self._up(prefs)
        tally: ReadTally[VersionSet] = ReadTally(n, nd.total, up, nd.per_dc, self._dc_of)
        if tally.state == FAILED:
            raise _unreachable(tally, prefs, up, "read", key)
        me = self.config.name
        local = self.replica.get(key)
        tally.answer(me, local)
        op = _Read(self, key, local, tally, timeout)
        others = [p for p in up if p != me]
        if others:  # (alone, the local answer is the read: nothing to wait for or repair)
            op.epoch = self._ring().epoch
            fan = _FanOut(self, op.answer, tally.fail, op.decided, op.after)
            # a large copy is asked alone: a batch's answer must stay far below a frame
            batched = self.batch_replica_requests and local.size() <= BATCH_VALUE_MAX
            fan.start(others, op.message, timeout, op.send if batched else None)
            if tally.state == PENDING:
                op.waiter = fan.waiter
        return op

    async def _write_back(self, items: Sequence[tuple[bytes, ReadTally[VersionSet], VersionSet]],
                          timeout: float) -> None:
        """Strict reads whose answers disagreed, as ``(key, tally, result)``: ``result`` may be
        on fewer replicas than a later read meets -- a write that timed out after reaching one
        replica (MaybeApplied) is seen by this read through that replica, and a later read of
        two others would not see it: the key would go back in time (the simulator's
        linearizability checker found exactly that, seed 439 beyond CI's sweep). So before
        answering, each result is written back until N - R + 1 replicas hold it, which every
        later R-quorum meets: first to the replicas that answered stale (they are up: they just
        answered), then to the other targets -- one REPLICA_PUT_MANY per replica per round.
        Cassandra's blocking read repair does the same for its quorum reads. Answers that
        agreed cost nothing: this runs only on a disagreement.

        :raises QuorumError: some result reached fewer than N - R + 1 replicas (the read is not
          answered; what reached a replica is only a merge of copies that were there already)."""
        me = self.config.name
        # per item: key, result, the replicas known to hold it, how many must, (stale, rest)
        todo: list[tuple[bytes, VersionSet, set[str], int, tuple[list[str], list[str]]]] = []
        for key, t, result in items:
            holders = {node for node in t.answered if t.answer_of(node) == result}
            stale = [node for node in t.answered if node not in holders]
            rest = [node for node in t.targets if node not in holders and node not in stale]
            todo.append((key, result, holders, t.n - t.r + 1, (stale, rest)))
        epoch = self._ring().epoch
        for rnd in (0, 1):
            per_node: dict[str, list[int]] = {}
            for i, (key, result, holders, wanted, groups) in enumerate(todo):
                for node in groups[rnd] if len(holders) < wanted else ():
                    self.stats.read_repairs += 1
                    if node == me:
                        self._repair_local(key, result)
                        holders.add(node)
                        items[i][1].answer(node, result)
                    else:
                        per_node.setdefault(node, []).append(i)

            async def one(node: str, idx: list[int]) -> None:
                fields: dict[str, Any] = {"items": [[todo[i][0], todo[i][1].to_wire()] for i in idx], "epoch": epoch}
                if self.test_bug == "repair-overwrites":  # DELIBERATE BUG, tests only (TEST_BUG_ENV)
                    fields["repair"] = 1
                _, reply, err = await self._send(node, Message(wire.REPLICA_PUT_MANY, 0, fields), timeout)
                if reply is not None and err is None and reply.code == wire.OK:
                    for i in idx:
                        todo[i][2].add(node)
                        t = items[i][1]
                        if node in t.answered:  # it holds the result now: the background repair skips it
                            t.answer(node, todo[i][1])

            if per_node:
                await asyncio.gather(*(one(node, idx) for node, idx in per_node.items()))
        for (key, _result, holders, wanted, _groups), (_key, t, _res) in zip(todo, items, strict=True):
            if len(holders) < wanted:
                raise QuorumError(
                    f"strict read of {key!r}: its replicas disagreed and the newer copy could be written "
                    f"back to only {len(holders)} of the {wanted} replicas a later read must meet (N={t.n}, "
                    f"R={t.r}); the read is not answered",
                    needed=wanted, answered=len(holders), n=t.n,
                )

    async def write(
        self,
        key: bytes,
        value: bytes | None,
        context: Context | None,
        prefs: Sequence[str],
        w: Level,
        timeout: float,
        ttl: float | None = None,
        *,
        strict: bool | None = None,
    ) -> VersionSet:
        """Mint the new version on the local copy, send it to the other replicas, W acks.
        With a primary down and the write not ``strict``, fallbacks take hints for it and
        count (module docstring)."""
        op = self.begin_write(key, value, context, prefs, w, timeout, ttl, strict=strict)
        if op.waiter is not None:
            await op.waiter
        return op.result()

    def begin_write(
        self,
        key: bytes,
        value: bytes | None,
        context: Context | None,
        prefs: Sequence[str],
        w: Level,
        timeout: float,
        ttl: float | None = None,
        *,
        strict: bool | None = None,
    ) -> _Write:
        """:meth:`write` up to its wait, without a coroutine: the local copy is written and the
        fan-out started when this returns. The write is decided once ``waiter`` (None: at once)
        is done; :meth:`_Write.result` is then write()'s answer (the new versions, or its
        QuorumError).

        :raises QuorumError: fewer than W replicas up -- refused before anything is written.
        """
        n = len(prefs)
        nd = self._need(w, prefs, "W")
        if n == 1 and nd.total == 1 and not nd.per_dc:
            # N=1: this node (it coordinates, so prefs == [it]) is the one replica and its own
            # ack is W -- what the tally below would decide, without building one
            return _Write(self, key, self.replica.coordinate(key, value, context, self._expires(ttl)), None)
        up = self._up(prefs)
        down = [p for p in prefs if p not in up] if len(up) < n else _NONE
        hint_for: dict[str, str] = _NO_HINTS  # fallback -> the primary it stands in for
        if down and self.handoff is not None and not (self.config.strict if strict is None else strict):
            hint_for = {}
            ring = self._ring()
            # the primaries as decided above (one verdict per node per request), the rest now
            live = [m for m in ring.members if m in up or (m not in prefs and self._alive(m))]
            for t in apl(key, n, ring, live):
                if not t.is_primary and t.hint_for is not None:
                    hint_for[t.node] = t.hint_for
        tally = WriteTally(n, nd.total, up + list(hint_for) if hint_for else up, nd.per_dc, self._dc_of)
        if tally.state == FAILED:  # fewer than W up: refused before anything is written
            raise _unreachable(tally, prefs, up, "write", key)
        # ttl: seconds; the version carries the absolute expiry, judged by each reader's clock
        expires = None if ttl is None else self.replica.now_ms() + max(1, int(ttl * 1000))
        new = self.replica.coordinate(key, value, context, expires)
        tally.ack(self.config.name)
        op = _Write(self, key, new, tally, hint_for)
        if down:
            self._keep_hints([p for p in down if p not in hint_for.values()], key, new)
        me = self.config.name
        others = [p for p in up if p != me]
        if hint_for:
            others += hint_for
        if not others:  # N=1 (or every other replica down and no fallback): the local copy is it
            return op
        op.epoch = self._ring().epoch
        op.wire = new.to_wire()
        op.timeout = timeout
        if self.test_bug == "ack-before-w":  # DELIBERATE BUG, tests only (TEST_BUG_ENV)
            self._spawn(self._replicate_late([p for p in up if p != me], op.message(""), timeout))
            op.tally = None
            return op
        fan = _FanOut(self, op.ack, op.fail, op.decided)
        batched = self.batch_replica_requests and value is not None and len(value) <= BATCH_VALUE_MAX
        fan.start(others, op.message, timeout, op.send if batched else None)
        if tally.state == PENDING:  # W=1: answered now, the rest of the fan-out goes on
            op.waiter = fan.waiter
        return op

    # -- the RESP front's GET and SET without a coroutine -----------------------------------
    #
    # What handle() does for a GET or a PUT (no context, no epoch, the cluster's R/W and
    # timeout) when this node coordinates the key under its current ring and no ring change is
    # under way: the same counters, begin_read / begin_write, and the request counted in
    # flight until it is decided (drain waits for it). None: any other case, which goes
    # through handle() (forwarding, a move, a strict read's write-back, not ready, draining).

    def put_now(self, key: bytes, value: bytes, ttl_ms: int | None) -> _Write | None:
        """A SET begun here (see above); None: take :meth:`handle`.

        :raises QuorumError: (counted as handle counts it) fewer than W replicas up.
        """
        prefs = self._prefs_now(key)
        if prefs is None:
            return None
        self._begun("PUT")
        try:
            op = self.begin_write(key, value, None, prefs, self.config.w, self.config.timeout, _ttl(ttl_ms))
        except BaseException as e:
            self._ended(e)
            raise
        return op.track()

    def get_now(self, key: bytes) -> _Read | None:
        """A GET begun here (see above); None: take :meth:`handle`. Its answer:
        :meth:`get_answer` of the op's result.

        :raises QuorumError: (counted as handle counts it) fewer than R replicas up.
        """
        prefs = self._prefs_now(key)
        if prefs is None or self.config.strict:
            return None
        self._begun("GET")
        try:
            op = self.begin_read(key, prefs, self.config.r, self.config.timeout)
        except BaseException as e:
            self._ended(e)
            raise
        return op.track()

    def _prefs_now(self, key: bytes) -> list[str] | None:
        ring = self.ring
        if ring is None or self.draining or self._moving is not None or not key or type(key) is not bytes:
            return None
        prefs = ring.preference_list(key, self.config.n)
        return prefs if self.config.name in prefs else None

    def _begun(self, name: str) -> None:
        requests = self.stats.requests
        requests[name] = requests.get(name, 0) + 1
        self.in_flight += 1
        self._idle.clear()

    def _ended(self, exc: BaseException | None) -> None:
        """A request begun by :meth:`put_now` or :meth:`get_now` is decided (``exc``: its
        error): handle's accounting of its end."""
        if isinstance(exc, QuorumError):
            self.stats.quorum_failures += 1
            if isinstance(exc, MaybeApplied):
                self.stats.maybe_applied += 1
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    # -- moving keys (a ring change whose copies are not all pushed yet: Node.moving) -------

    async def read_moving(self, key: bytes, prefs: Sequence[str], old: Sequence[str], r: Level,
                          timeout: float) -> VersionSet:
        """Read a moving key from R of its *old* owners ``old`` AND R of its new ones ``prefs``
        (the union, each quorum counted on its own), answering the merge of every answer. Why
        both: every write acknowledged before the change is on W old owners and every one during
        the move on W old and W new (:meth:`write_moving`) -- the old quorum sees those, whatever
        the new owners hold yet; and a write coordinated by a node that has already learnt the
        move's end is on W *new* owners only -- the new quorum sees that one, so a node that has
        not learnt the end yet reads it too."""
        me = self.config.name
        targets = list(dict.fromkeys([*prefs, *old]))
        up = self._up(targets)
        tallies: list[ReadTally[VersionSet]] = []
        for owners in (old, prefs):
            nd = self._need(r, owners, "R")
            mine = [p for p in up if p in owners]
            t: ReadTally[VersionSet] = ReadTally(len(owners), nd.total, mine, nd.per_dc, self._dc_of)
            if t.state == FAILED:
                raise _unreachable(t, owners, mine, "read", key)
            tallies.append(t)
        local = self.replica.get(key)
        for t in tallies:
            if me in t.targets:
                t.answer(me, local)
        others = [p for p in up if p != me]

        def on_reply(node: str, reply: Message) -> None:
            vs = VersionSet.from_wire(reply.fields["versions"])
            for t in tallies:
                if node in t.targets:
                    t.answer(node, vs)

        def on_fail(node: str, reason: str, *, maybe_reached: bool = False) -> None:
            for t in tallies:
                if node in t.targets:
                    t.fail(node, reason, maybe_reached=maybe_reached)

        def decided() -> bool:
            return all(t.state != PENDING for t in tallies)

        def after() -> None:  # every answer is in: repair the stale copies of each quorum
            for t in tallies:
                if t.state == OK and t.stale():
                    self._spawn(self._repair(key, t, timeout))

        if others:
            msg = Message(wire.REPLICA_GET, 0, {"key": key, "epoch": self._ring().epoch})
            fan = _FanOut(self, on_reply, on_fail, decided, after)
            fan.start(others, lambda _node: msg, timeout)
            if not decided():
                await fan.waiter
        result: VersionSet | None = None
        for t in tallies:
            if t.state != OK:
                raise _err(t)
            got = t.result()
            assert got is not None
            result = got if result is None else result.merge(got)
        assert result is not None
        return result

    def _dual(self, key: bytes, prefs: Sequence[str], old: Sequence[str], w: Level,
              what: str) -> tuple[WriteTally, WriteTally, list[str]]:
        """The two tallies of a moving key's write -- W of the new owners AND W of the old --
        and every up target but this node. :raises QuorumError: either cannot be reached."""
        targets = list(dict.fromkeys([*prefs, *old]))
        up = self._up(targets)
        tallies = []
        for owners in (prefs, old):
            nd = self._need(w, owners, "W")
            t = WriteTally(len(owners), nd.total, [p for p in up if p in owners], nd.per_dc, self._dc_of)
            if t.state == FAILED:
                raise _unreachable(t, owners, [p for p in up if p in owners], what, key)
            tallies.append(t)
        return tallies[0], tallies[1], [p for p in up if p != self.config.name]

    async def _fan_dual(self, t_new: WriteTally, t_old: WriteTally, others: Sequence[str], msg: Message,
                        timeout: float, on_reply: Callable[[str, Message], None] | None = None) -> None:
        me = self.config.name
        for t in (t_new, t_old):
            if me in t.targets:
                t.ack(me)

        def reply(node: str, r: Message) -> None:
            if on_reply is not None:
                on_reply(node, r)
            for t in (t_new, t_old):
                if node in t.targets:
                    t.ack(node)

        def fail(node: str, reason: str, *, maybe_reached: bool = False) -> None:
            for t in (t_new, t_old):
                if node in t.targets:
                    t.fail(node, reason, maybe_reached=maybe_reached)

        def decided() -> bool:
            return t_new.state != PENDING and t_old.state != PENDING

        if others:
            fan = _FanOut(self, reply, fail, decided)
            fan.start(others, lambda _node: msg, timeout)
            if not decided():
                await fan.waiter
        for t in (t_new, t_old):
            if t.state != OK:
                raise _err(t)

    async def write_moving(self, key: bytes, value: bytes | None, context: Context | None,
                           prefs: Sequence[str], old: Sequence[str], w: Level, timeout: float,
                           ttl: float | None = None) -> VersionSet:
        """A moving key's write: minted here (a new owner), acknowledged by W of the new owners
        ``prefs`` and W of the old ``old`` (strict: no fallbacks; a down owner gets a hint)."""
        t_new, t_old, others = self._dual(key, prefs, old, w, "write")
        expires = None if ttl is None else self.replica.now_ms() + max(1, int(ttl * 1000))
        new = self.replica.coordinate(key, value, context, expires)
        down = [p for p in dict.fromkeys([*prefs, *old]) if p != self.config.name and p not in others]
        if down:
            self._keep_hints(down, key, new)
        msg = Message(wire.REPLICA_PUT, 0, {"key": key, "versions": new.to_wire(), "epoch": self._ring().epoch})
        await self._fan_dual(t_new, t_old, others, msg, timeout)
        return new

    async def incr_moving(self, key: bytes, delta: int, prefs: Sequence[str], old: Sequence[str],
                          w: Level, timeout: float) -> int:
        """INCR of a moving key: as :meth:`incr`, acknowledged by W new and W old owners."""
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise BadRequest("delta must be an int")
        t_new, t_old, others = self._dual(key, prefs, old, w, "increment")
        merged = self.replica.increment(key, delta)
        msg = Message(wire.REPLICA_COUNTER, 0, {"key": key, "counter": merged.to_wire(), "epoch": self._ring().epoch})

        def on_reply(_node: str, reply: Message) -> None:
            nonlocal merged
            merged = merged.merge(PNCounter.from_wire(reply.fields["counter"]))

        await self._fan_dual(t_new, t_old, others, msg, timeout, on_reply)
        self.replica.merge_counter(key, merged)
        return merged.value

    async def _batch_moving(self, code: int, keys: Sequence[bytes], values: Sequence[bytes | None],
                            prefs_of: Sequence[Sequence[str]], need: Level, timeout: float) -> Message:
        """GET_MANY / PUT_MANY with a moving key among them: key by key (rare: only while a
        move is on, and never on the fast path)."""
        async def one(i: int) -> Any:
            key, prefs = keys[i], prefs_of[i]
            old = self._old_prefs(key, prefs)
            if code == wire.GET_MANY:
                vs = await (self.read(key, prefs, need, timeout) if old is None
                            else self.read_moving(key, prefs, old, need, timeout))
                vs = vs.visible(self.replica.now_ms())
                return [vs.values, vs.context.encode()]
            if old is None:
                await self.write(key, values[i], None, prefs, need, timeout)
            else:
                await self.write_moving(key, values[i], None, prefs, old, need, timeout)
            return None

        results = await asyncio.gather(*(one(i) for i in range(len(keys))))
        return Message(wire.OK, 0, {"results": list(results)} if code == wire.GET_MANY else {})

    async def _replicate_late(self, nodes: list[str], msg: Message, timeout: float) -> None:
        """The ``ack-before-w`` test bug's write-behind: the replica requests, late."""
        await asyncio.sleep(TEST_BUG_DELAY)
        await asyncio.gather(*(self._send(n, msg, timeout) for n in nodes), return_exceptions=True)

    def _keep_hints(self, owners: Sequence[str], key: bytes, new: VersionSet) -> None:
        """This coordinator keeps ``new`` as a hint for each of ``owners`` (primaries that miss
        the write and that no fallback stands in for). Counts toward nothing (handoff.py)."""
        if self.handoff is None:
            return
        for owner in owners:
            if owner != self.config.name:
                self.handoff.keep(owner, key, new)

    async def incr(self, key: bytes, delta: int, prefs: Sequence[str], w: Level, timeout: float) -> int:
        """Add ``delta`` to this node's entry of the PN-counter, send the state to the replicas;
        the answer is the value of the merge of the W states that acknowledged."""
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise BadRequest("delta must be an int")
        n = len(prefs)
        nd = self._need(w, prefs, "W")
        up = self._up(prefs)
        tally = WriteTally(n, nd.total, up, nd.per_dc, self._dc_of)
        if tally.state == FAILED:
            raise _unreachable(tally, prefs, up, "increment", key)
        merged = self.replica.increment(key, delta)
        tally.ack(self.config.name)
        msg = Message(
            wire.REPLICA_COUNTER, 0, {"key": key, "counter": merged.to_wire(), "epoch": self._ring().epoch}
        )

        def on_reply(node: str, reply: Message) -> None:
            nonlocal merged
            merged = merged.merge(PNCounter.from_wire(reply.fields["counter"]))
            tally.ack(node)

        others = [p for p in up if p != self.config.name]
        if others:
            # late replies are not merged: the answer (and the local merge) is of the W states
            fan = _FanOut(self, on_reply, tally.fail, lambda: tally.state != PENDING, late=False)
            fan.start(others, lambda _node: msg, timeout)
            if tally.state == PENDING:
                await fan.waiter
        on_reply = None  # type: ignore[assignment]  # no cycle through this scope (see write)
        if tally.state != OK:
            raise _err(tally)
        self.replica.merge_counter(key, merged)
        return merged.value

    async def _batch(self, code: int, f: Any) -> Message:
        """GET_MANY / PUT_MANY: one replica request per replica node for all its keys (the
        client sends each coordinator only the keys it coordinates; any other key is refused as
        a wrong epoch, or forwarded one by one without an epoch)."""
        ring = self._ring()
        epoch = f.get("epoch")
        n = self.config.n
        timeout = self._timeout(f)
        if code == wire.GET_MANY:
            keys = _keys(f["keys"])
            values: list[bytes | None] = []
            need = f.get("r") or self.config.r
        else:
            items = _pairs(f["items"])
            keys = [k for k, _ in items]
            values = [v for _, v in items]
            need = f.get("w") or self.config.w
            for v in values:
                if not isinstance(v, bytes):
                    raise BadRequest("put_many values must be bytes")
        check_level(need, "R" if code == wire.GET_MANY else "W")
        if isinstance(need, int):
            check_quorum(n, need, "R" if code == wire.GET_MANY else "W")
        prefs_of = [ring.preference_list(k, n) for k in keys]
        mine = all(self.config.name in p for p in prefs_of) and self._epoch_ok(epoch)
        if not mine:
            if epoch is not None:
                raise WrongEpoch(
                    f"{self.config.name} (epoch {ring.epoch}) does not coordinate every key of "
                    f"this batch under the request's epoch {epoch}; refresh the ring",
                    expected=ring.epoch,
                    got=epoch,
                )
            return await self._forward_batch(code, f, keys, values)
        if self._moving is not None and any(
            self._old_prefs(k, p) is not None for k, p in zip(keys, prefs_of, strict=True)
        ):
            return await self._batch_moving(code, keys, values, prefs_of, need, timeout)
        if code == wire.GET_MANY:
            now = self.replica.now_ms()
            vss = [vs.visible(now) for vs in await self.read_many(keys, prefs_of, need, timeout)]
            return Message(
                wire.OK, 0, {"results": [[vs.values, vs.context.encode()] for vs in vss]}
            )
        await self.write_many(keys, values, prefs_of, need, timeout)
        return Message(wire.OK, 0, {})

    async def read_many(
        self, keys: Sequence[bytes], prefs_of: Sequence[Sequence[str]], r: Level, timeout: float
    ) -> list[VersionSet]:
        tallies: list[ReadTally[VersionSet]] = []
        per_node: dict[str, list[int]] = {}
        for i, (key, prefs) in enumerate(zip(keys, prefs_of, strict=False)):
            up = self._up(prefs)
            nd = self._need(r, prefs, "R")
            t: ReadTally[VersionSet] = ReadTally(len(prefs), nd.total, up, nd.per_dc, self._dc_of)
            if t.state == FAILED:
                raise _unreachable(t, prefs, up, "read", key)
            t.answer(self.config.name, self.replica.get(key))
            tallies.append(t)
            for p in up:
                if p != self.config.name:
                    per_node.setdefault(p, []).append(i)
        epoch = self._ring().epoch

        def on_reply(node: str, reply: Message) -> None:
            answers = reply.fields.get("versions")
            idx = per_node[node]
            if not isinstance(answers, list) or len(answers) != len(idx):
                raise ProtocolError(f"{node}: REPLICA_GET_MANY answered {len(answers or [])} of {len(idx)}")
            for i, w_ in zip(idx, answers, strict=False):
                tallies[i].answer(node, VersionSet.from_wire(w_))

        def on_fail(node: str, reason: str, *, maybe_reached: bool = False) -> None:
            for i in per_node[node]:
                tallies[i].fail(node, reason, maybe_reached=maybe_reached)

        answered = False  # the answer went out: every tally is ok (else no repair)

        def after() -> None:  # every batch answer is in
            if answered:
                self._repair_many(keys, tallies, timeout)

        try:  # no cycle through this scope once the request ends (see write)
            if per_node:
                fan = _FanOut(
                    self, on_reply, on_fail, lambda: all(t.state != PENDING for t in tallies), after
                )
                fan.start(
                    list(per_node),
                    lambda node: Message(
                        wire.REPLICA_GET_MANY, 0, {"keys": [keys[i] for i in per_node[node]], "epoch": epoch}
                    ),
                    timeout,
                )
                if not fan.decided():
                    await fan.waiter
            out = []
            for key, t in zip(keys, tallies, strict=False):
                if t.state != OK:
                    raise _err(t, key)
                res = t.result()
                assert res is not None
                out.append(res)
            if self.config.strict:  # as read(): the keys whose answers disagreed are written back first
                disagreed = [(k, t, res) for k, t, res in zip(keys, tallies, out, strict=True) if t.stale()]
                if disagreed:
                    await self._write_back(disagreed, timeout)
            answered = True
            if per_node and fan.left == 0:
                after()
            return out
        finally:
            on_reply = on_fail = after = None  # type: ignore[assignment]

    async def write_many(
        self,
        keys: Sequence[bytes],
        values: Sequence[bytes | None],
        prefs_of: Sequence[Sequence[str]],
        w: Level,
        timeout: float,
    ) -> None:
        tallies: list[WriteTally] = []
        for key, prefs in zip(keys, prefs_of, strict=False):
            up = self._up(prefs)
            nd = self._need(w, prefs, "W")
            t = WriteTally(len(prefs), nd.total, up, nd.per_dc, self._dc_of)
            if t.state == FAILED:  # checked for every key before any is written
                raise _unreachable(t, prefs, up, "write", key)
            tallies.append(t)
        per_node: dict[str, list[list[Any]]] = {}
        owners: dict[str, list[int]] = {}
        for i, (key, value, t) in enumerate(zip(keys, values, tallies, strict=False)):
            new = self.replica.coordinate(key, value, None)
            t.ack(self.config.name)
            self._keep_hints([p for p in prefs_of[i] if p not in t.targets], key, new)
            for p in t.targets:
                if p != self.config.name:
                    per_node.setdefault(p, []).append([key, new.to_wire()])
                    owners.setdefault(p, []).append(i)
        epoch = self._ring().epoch

        def on_reply(node: str, _reply: Message) -> None:
            for i in owners[node]:
                tallies[i].ack(node)

        def on_fail(node: str, reason: str, *, maybe_reached: bool = False) -> None:
            for i in owners[node]:
                tallies[i].fail(node, reason, maybe_reached=maybe_reached)

        try:  # no cycle through this scope once the request ends (see write)
            if per_node:
                fan = _FanOut(self, on_reply, on_fail, lambda: all(t.state != PENDING for t in tallies))
                fan.start(
                    list(per_node),
                    lambda node: Message(wire.REPLICA_PUT_MANY, 0, {"items": per_node[node], "epoch": epoch}),
                    timeout,
                )
                if not fan.decided():
                    await fan.waiter
            short = [(k, t) for k, t in zip(keys, tallies, strict=False) if t.state != OK]
            if short:
                key, t = short[0]
                err = _err(t, key)
                raise type(err)(
                    f"{len(short)} of {len(keys)} keys missed the write quorum; first: {err}",
                    needed=err.needed,
                    answered=err.answered,
                    n=err.n,
                )
        finally:
            on_reply = on_fail = None  # type: ignore[assignment]

    # -- read repair -----------------------------------------------------------------------

    def _repair_many(
        self, keys: Sequence[bytes], tallies: Sequence[ReadTally[VersionSet]], timeout: float
    ) -> None:
        """Every batch answer is in: send each stale replica one REPLICA_PUT_MANY with the
        merges of all its stale keys (one round per replica, as the read was), in the
        background."""
        fixes: dict[str, list[list[Any]]] = {}
        for key, t in zip(keys, tallies, strict=True):
            merged = t.merged()
            if merged is None:
                continue
            for node in t.stale():
                self.stats.read_repairs += 1
                if node == self.config.name:
                    self._repair_local(key, merged)
                else:
                    fixes.setdefault(node, []).append([key, merged.to_wire()])
        if fixes:
            epoch = self._ring().epoch
            extra = {"repair": 1} if self.test_bug == "repair-overwrites" else {}  # DELIBERATE BUG
            self._spawn(_gather(*(
                self._send(node, Message(wire.REPLICA_PUT_MANY, 0, {"items": items, "epoch": epoch, **extra}),
                           timeout)
                for node, items in sorted(fixes.items())
            )))

    async def _repair(self, key: bytes, tally: ReadTally[VersionSet], timeout: float) -> None:
        """Send the merge of every answer to each replica whose answer lacked part of it.
        Best effort: a repair that fails is retried by the next read (anti-entropy, a later
        issue, will catch the keys nobody reads)."""
        stale = tally.stale()
        merged = tally.merged()
        if not stale or merged is None:
            return
        epoch = self._ring().epoch
        sends = []
        for node in stale:
            self.stats.read_repairs += 1
            if node == self.config.name:
                self._repair_local(key, merged)
                continue
            fields: dict[str, Any] = {"key": key, "versions": merged.to_wire(), "epoch": epoch}
            if self.test_bug == "repair-overwrites":  # DELIBERATE BUG, tests only (TEST_BUG_ENV)
                fields["repair"] = 1
            sends.append(self._send(node, Message(wire.REPLICA_PUT, 0, fields), timeout))
        if sends:
            await asyncio.gather(*sends)

    def _repair_local(self, key: bytes, merged: VersionSet) -> None:
        if self.test_bug == "repair-overwrites":  # DELIBERATE BUG, tests only (TEST_BUG_ENV)
            self._overwrite(key, merged)
        else:
            self.replica.merge(key, merged)

    def _overwrite(self, key: bytes, vs: VersionSet) -> VersionSet:
        """The ``repair-overwrites`` test bug: store ``vs`` over whatever the replica holds (a
        newer version that landed since the read is lost). Never called unless TEST_BUG_ENV is set."""
        return self.replica._update(VERSIONS + key, lambda raw: (vs.encode(), vs))

    # -- forwarding (requests without an epoch for keys this node does not hold) -----------

    async def _forward(self, code: int, f: Any, prefs: Sequence[str]) -> Message:
        self.stats.forwarded += 1
        ring = self._ring()
        fields = dict(f)
        fields["epoch"] = ring.epoch
        timeout = self._timeout(f)
        last: BaseException | None = None
        for node in self._up(prefs) or list(prefs):
            try:
                return await self.transport.request(
                    ring.members[node].addr, Message(code, 0, fields), timeout * 2
                )
            except Unreachable as e:
                self._suspect(node)
                last = e
                if e.sent and code not in (wire.GET, wire.GET_VERSIONS, wire.GET_MANY):
                    raise _maybe(code, e) from None
            except RequestTimeout as e:
                self._suspect(node)
                if code not in (wire.GET, wire.GET_VERSIONS):
                    raise _maybe(code, e) from None
                last = e
        raise QuorumError(
            f"no replica of the key could coordinate the forwarded request: {last}",
            needed=1, answered=0, n=len(prefs),
        )

    async def _forward_batch(
        self, code: int, f: Any, keys: Sequence[bytes], values: Sequence[bytes | None]
    ) -> Message:
        results = []
        for i, key in enumerate(keys):
            sub = {k: v for k, v in f.items() if k in ("r", "w", "timeout_ms")}
            prefs = self._ring().preference_list(key, self.config.n)
            if code == wire.GET_MANY:
                reply = await self._forward(wire.GET_VERSIONS, {**sub, "key": key}, prefs)
                results.append([reply.fields["values"], reply.fields["context"]])
            else:
                await self._forward(wire.PUT, {**sub, "key": key, "value": values[i]}, prefs)
        return Message(wire.OK, 0, {"results": results} if code == wire.GET_MANY else {})

    # -- the fan-out -----------------------------------------------------------------------

    async def _send(self, node: str, msg: Message, timeout: float) -> _Outcome:
        """One replica request; never raises (the outcome carries the error)."""
        ring = self._ring()
        try:
            reply = await self.transport.request(self._addr_of(ring, node), msg, timeout)
        except (Unreachable, RequestTimeout) as e:
            self._suspect(node)
            return node, None, e
        except (Error, OSError) as e:  # Overloaded, WrongEpoch, BadRequest, KeyTooLarge, RemoteError...
            return node, None, e
        self.suspects.discard(node)
        return node, reply, None

    # -- liveness (a stand-in for the failure detector of a later issue) -------------------

    def _up(self, prefs: Sequence[str]) -> list[str]:
        return [p for p in prefs if p == self.config.name or self._alive(p)]

    def _alive(self, node: str) -> bool:
        """Not suspected here, and not down by gossip's verdict."""
        return node not in self.suspects and not (self.gossip is not None and self.gossip.is_down(node))

    def _suspect(self, node: str) -> None:
        if node != self.config.name:
            self.suspects.add(node)

    async def probe(self, timeout: float = 0.5) -> None:
        """PING every suspected node once, in parallel; the ones that answer are up again."""
        if self.ring is None:
            return
        ring = self.ring

        async def ping(node: str) -> None:
            member = ring.members.get(node)
            if member is None:
                self.suspects.discard(node)
                return
            try:
                await self.transport.request(member.addr, Message(wire.PING, 0, {}), timeout)
            except (Error, OSError):
                return
            self.suspects.discard(node)

        await asyncio.gather(*(ping(node) for node in sorted(self.suspects)))

    async def probe_forever(self, interval: float) -> None:
        """:meth:`probe` every ``interval`` seconds, until cancelled (the daemon's loop, and the
        simulator's: the same code, on the loop's clock)."""
        while True:
            await asyncio.sleep(interval)
            await self.probe()

    # -- helpers ---------------------------------------------------------------------------

    def _need(self, level: Level, prefs: Sequence[str], what: str) -> Need:
        """What ``level`` (a count or a consistency level) needs for a key held by ``prefs``;
        local_quorum is this node's DC.

        :raises ConfigError: an unknown level, a count out of 1..N.
        """
        if type(level) is int and 0 < level <= len(prefs):  # the common case: a plain count
            nd = _COUNTS.get(level)
            if nd is None:
                nd = _COUNTS[level] = Need(level, {}, level)
            return nd
        check_level(level, what)
        nd = need(level, prefs, self._dc_of, self.config.dc)
        check_quorum(len(prefs), nd.total, what)
        return nd

    def _expires(self, ttl: float | None) -> int | None:
        """A new version's expiry for ``ttl`` seconds (None: none), on this node's wall clock."""
        return None if ttl is None else self.replica.now_ms() + max(1, int(ttl * 1000))

    def _dc_of(self, node: str) -> str | None:
        return self._ring().dc_of(node)

    def _ring(self) -> Ring:
        if self.ring is None:
            raise Overloaded(NOT_READY)
        return self.ring

    def _epoch_ok(self, epoch: Any) -> bool:
        ring = self._ring()
        if epoch is None or epoch == ring.epoch:
            return True
        return self._epoch_near(epoch, ring) and self._learn(epoch, ring)

    def _learn(self, epoch: int, ring: Ring) -> bool:
        if epoch > ring.epoch and self.on_newer_epoch is not None:
            self.on_newer_epoch(epoch)  # a report this node has not seen yet: fetch it
        return True

    def _check_replica(self, epoch: int, keys: Sequence[bytes]) -> None:
        """A replica request must come with this node's epoch and only for keys whose preference
        list holds this node; anything else means the sender routes by another ring.
        (Hinted handoff, a later issue, will add requests for keys held on behalf of others.)"""
        self._check_epoch(epoch)
        ring = self._ring()
        for key in keys:
            if not isinstance(key, bytes) or not key:
                raise BadRequest("key must be non-empty bytes")
            if not ring.holds(key, self.config.n, self.config.name) and not (
                self._moving is not None and self.config.name in self._moving.ring.preference_list(key, self.config.n)
            ):  # (while a move is on, an old owner of the key still holds and serves its copy)
                raise WrongEpoch(
                    f"{self.config.name} holds no copy of {key[:64]!r} at ring epoch {ring.epoch}; "
                    "the sender routes by another ring",
                    expected=ring.epoch,
                    got=epoch,
                )

    def _check_epoch(self, epoch: int) -> None:
        ring = self._ring()
        if epoch != ring.epoch and not (self._epoch_near(epoch, ring) and self._learn(epoch, ring)):
            raise WrongEpoch(
                f"{self.config.name} is at ring epoch {ring.epoch}, the request at {epoch}",
                expected=ring.epoch,
                got=epoch,
            )

    def _timeout(self, f: Any) -> float:
        ms = f.get("timeout_ms")
        if ms is None:
            return self.config.timeout
        if ms <= 0:
            raise BadRequest(f"timeout_ms must be > 0, got {ms}")
        return float(ms) / 1000.0

    def _defaults(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.config.n, "w": self.config.w, "r": self.config.r}
        if self.config.n_per_dc is not None:  # clients place keys by the same map
            out["n_per_dc"] = dict(self.config.n_per_dc)
        return out

    def status(self) -> dict[str, Any]:
        """This node's facts for `shmkv cluster status` and for joining nodes."""
        out: dict[str, Any] = {
            **self.config.to_wire(),
            "epoch": self.ring.epoch if self.ring is not None else 0,
            "ready": self.ring is not None,
            "draining": self.draining,
            "keys": self.replica.key_count(asyncio.get_running_loop().time()),
            "suspects": sorted(self.suspects),
            "in_flight": self.in_flight,
            "pid": _pid(),
            "actor": self.replica.actor,
            "quorum_failures": self.stats.quorum_failures,
            "maybe_applied": self.stats.maybe_applied,
            "read_repairs": self.stats.read_repairs,
            "cas_retries": self.replica.cas_retries,
            **self.local,
        }
        if self.ring is not None:
            out["ring"] = self.ring.to_wire()
        for section, fn in self.status_extra.items():
            out[section] = fn()
        return out

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, grace: float) -> bool:
        """Stop taking requests, wait up to ``grace`` s for those in flight and the background
        work (read repairs); returns whether everything finished."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
            if self._fanouts:  # replica requests still out after their answers (bounded)
                await asyncio.wait_for(asyncio.gather(*(f.ended() for f in list(self._fanouts))), grace)
            if self._background:
                await asyncio.wait_for(
                    asyncio.gather(*self._background, return_exceptions=True), grace
                )
        except asyncio.TimeoutError:
            for t in list(self._background):
                t.cancel()
            return False
        return True


def _same_placement(a: Ring, b: Ring) -> bool:
    """Whether ``a`` and ``b`` place every key alike (the same members and vnodes)."""
    return a.vnodes_per_weight == b.vnodes_per_weight and dict(a.members) == dict(b.members)


def _pid() -> int:
    import os

    return os.getpid()


def _ttl(ms: Any) -> float | None:
    """A PUT's ``ttl_ms`` as seconds (None: no expiry). The expiry then lives inside the new
    version (versions.py, "Expiry") -- never a per-replica Store TTL, which read repair would
    undo by writing another replica's unexpired copy back."""
    if ms is None:
        return None
    if isinstance(ms, bool) or not isinstance(ms, int) or not 1 <= ms <= MAX_TTL_MS:
        raise BadRequest(f"ttl_ms must be an int of milliseconds in 1..2**62, got {ms!r}")
    return ms / 1000


def _keys(raw: Any) -> list[bytes]:
    if not all(isinstance(k, bytes) and k for k in raw):
        raise BadRequest("keys must be non-empty bytes")
    return list(raw)


def _pairs(raw: Any) -> list[tuple[bytes, Any]]:
    out = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes) and item[0]):
            raise BadRequest("items must be [key, value] pairs with non-empty bytes keys")
        out.append((item[0], item[1]))
    return out


def _why(exc: BaseException | None) -> str:
    return str(exc) or type(exc).__name__


def _maybe_reached(exc: BaseException | None) -> bool:
    if isinstance(exc, Unreachable):
        return exc.sent
    if isinstance(exc, (Overloaded, WrongEpoch, BadRequest)) or (
        isinstance(exc, Error) and isinstance(exc, (ValueError, TypeError))
    ):
        return False  # the replica refused it before applying anything (a bad request)
    return True  # a timeout, a remote error: it may have been applied


def _err(tally: WriteTally | ReadTally[Any], key: bytes | None = None) -> QuorumError:
    err = tally.error()
    if err is None:  # pending: cannot happen after a fan-out that returned undecided
        err = QuorumError(
            f"quorum not reached: {len(tally.targets) - len(tally.outstanding)} replied",
            needed=tally.need, answered=0, n=tally.n,
        )
    return err


def _unreachable(
    tally: WriteTally | ReadTally[Any], prefs: Sequence[str], up: Sequence[str], what: str, key: bytes
) -> QuorumError:
    """The refusal before anything is sent: fewer replicas up than the quorum needs."""
    down = [p for p in prefs if p not in up]
    need = "W" if isinstance(tally, WriteTally) else "R"
    short = tally.dc_shortfall()
    return QuorumError(
        f"{what} of {key[:64]!r} {'failed' if what == 'read' else 'not applied'}: only {len(up)} of "
        f"N={tally.n} replicas are up ({', '.join(down) or 'none'} down), {need}={tally.need} needed"
        + (f"; {short}" if short else ""),
        needed=tally.need,
        answered=0,
        n=tally.n,
    )


def _maybe(code: int, e: BaseException) -> QuorumError:
    return MaybeApplied(
        f"{wire.NAMES.get(code, code)} may have been applied: the forwarded request was sent "
        f"and not answered ({e})",
        needed=1, answered=0, n=0,
    )


async def _gather(*aws: Coroutine[Any, Any, Any]) -> None:
    await asyncio.gather(*aws)


#: values up to this size are batched (_Batches); a larger one goes alone (a batch stays
#: far below the frame limit: BATCH_ITEMS of them at most)
BATCH_VALUE_MAX = 4096
BATCH_ITEMS = 256


class _Batches:
    """The replica requests of the reads and writes one coordinator starts within one loop
    iteration, one per (kind, replica, epoch, timeout): a REPLICA_GET_MANY (REPLICA_PUT_MANY)
    for all the keys read (written) there -- sent at the end of the iteration, or at once when
    BATCH_ITEMS are waiting. With 50 clients each waiting for its GET or SET, a coordinator
    starts several per iteration: each replica then decodes, checks and answers one frame for
    all of them, and the coordinator tracks one request per replica instead of one per key
    (the per-message work was most of a 3-node coordinator's CPU).

    Semantics are the single requests': every key's fan-out gets the batch's outcome from that
    replica -- a write its ack, a read its key's versions, or the batch's failure
    (unreachable, timed out: "may have been applied" for a write, as for one request). The
    *_MANY requests check every key before touching any, and the keys of one batch were all
    placed on this replica by the one ring of that epoch, so a refusal is a refusal of all.
    Merging is a join: the order of the writes of one key inside a batch changes nothing.
    """

    __slots__ = ("node", "batches", "scheduled")

    def __init__(self, node: Node) -> None:
        self.node = node
        #: (code, replica, epoch, timeout) -> (keys or [key, versions wire] items, their fan-outs)
        self.batches: dict[tuple[int, str, int, float], tuple[list[Any], list[_FanOut]]] = {}
        self.scheduled = False

    def add(self, code: int, replica: str, item: Any, epoch: int, timeout: float, fan: _FanOut) -> None:
        """Send ``item`` (REPLICA_GET: a key; REPLICA_PUT: ``[key, versions]``) to ``replica``
        with this iteration's others; its outcome is settled into ``fan``
        (``fan.settle(replica, ...)``), exactly once."""
        k = (code, replica, epoch, timeout)
        batch = self.batches.get(k)
        if batch is None:
            batch = self.batches[k] = ([], [])
        batch[0].append(item)
        batch[1].append(fan)
        if len(batch[0]) >= BATCH_ITEMS:
            self._send(k, self.batches.pop(k))
        elif not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        batches, self.batches = self.batches, {}
        for k, batch in batches.items():
            self._send(k, batch)

    def _send(self, k: tuple[int, str, int, float], batch: tuple[list[Any], list[_FanOut]]) -> None:
        code, replica, epoch, timeout = k
        items, fans = batch
        member = self.node.ring.members.get(replica) if self.node.ring is not None else None
        if member is None:  # left the ring meanwhile: nothing was sent
            err = Unreachable(f"{replica}: no longer a member of the ring", sent=False)
            for fan in fans:
                fan.settle(replica, None, err)
            return
        if code == wire.REPLICA_GET:
            if len(items) == 1:
                msg = Message(wire.REPLICA_GET, 0, {"key": items[0], "epoch": epoch})
            else:
                msg = Message(wire.REPLICA_GET_MANY, 0, {"keys": items, "epoch": epoch})
        elif len(items) == 1:
            key, versions = items[0]
            msg = Message(wire.REPLICA_PUT, 0, {"key": key, "versions": versions, "epoch": epoch, "ack": 1})
        else:
            msg = Message(wire.REPLICA_PUT_MANY, 0, {"items": items, "epoch": epoch})
        out = self.node.transport.send(member.addr, msg, timeout)
        out.add_done_callback(functools.partial(self._done, k, items, fans, member.addr))

    def _done(self, k: tuple[int, str, int, float], items: list[Any], fans: list[_FanOut], addr: str,
              out: asyncio.Future[Message]) -> None:
        """A batch's outcome is each of its keys' outcome from that replica: a write's ack, a
        read's own key's versions (as the answer of its own REPLICA_GET) -- or the batch's
        failure. A read batch the replica refused as a whole (not unreachable, not overloaded:
        say its answer outgrew a frame, a key far larger there than here) is asked again key by
        key, as if it had never been batched."""
        code, replica, epoch, timeout = k
        reply, exc = _result(replica, out)
        if code == wire.REPLICA_GET and len(fans) > 1:
            if exc is None:
                assert reply is not None
                answers = reply.fields.get("versions")
                if isinstance(answers, list) and len(answers) == len(fans):
                    for fan, versions in zip(fans, answers, strict=True):
                        fan.settle(replica, Message(wire.OK, 0, {"versions": versions}), None)
                    return
                exc = ProtocolError(f"{replica}: REPLICA_GET_MANY answered {len(answers or [])} of {len(fans)} keys")
            if not isinstance(exc, (Unreachable, RequestTimeout, Overloaded)):
                send = self.node.transport.send
                for key, fan in zip(items, fans, strict=True):
                    alone = send(addr, Message(wire.REPLICA_GET, 0, {"key": key, "epoch": epoch}), timeout)
                    alone.add_done_callback(functools.partial(fan._outcome, replica))
                return
        for fan in fans:
            fan.settle(replica, reply, exc)


def _result(target: str, fut: asyncio.Future[Message]) -> tuple[Message | None, BaseException | None]:
    """A replica request's (answer, None) or (None, its failure)."""
    if fut.cancelled():  # the transport closed under us
        return None, Unreachable(f"{target}: request cancelled", sent=True)
    exc = fut.exception()
    return (fut.result(), None) if exc is None else (None, exc)


#: write()'s "no replica down" and "no hints" (shared, never modified)
_NONE: list[str] = []
_NO_HINTS: dict[str, str] = {}


_OpT = TypeVar("_OpT", bound="_Op")


class _Op:
    """A read or write begun without a coroutine (:meth:`Node.begin_read`, :meth:`Node.begin_write`):
    decided once ``waiter`` is None or done. Its fan-out's callbacks are its bound methods --
    no closure over a coroutine's scope, so nothing makes a cycle
    (tests/cluster/test_no_cycles.py) and it is freed by reference counting once its fan-out
    ends."""

    __slots__ = ("node", "key", "waiter", "timeout", "msg")

    def __init__(self, node: Node, key: bytes, timeout: float) -> None:
        self.node = node
        self.key = key
        self.waiter: asyncio.Future[None] | None = None
        self.timeout = timeout
        self.msg: Message | None = None

    def _check(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            exc = waiter.exception()  # an internal error of the fan-out (a bug) is the answer
            if exc is not None:
                raise exc

    def result(self) -> VersionSet:
        raise NotImplementedError

    def track(self: _OpT) -> _OpT:
        """Node.put_now / get_now: count the request's end (Node._ended) once it is decided."""
        if self.waiter is None:
            self.ended(None)
        else:
            self.waiter.add_done_callback(self.ended)
        return self

    def ended(self, _waiter: asyncio.Future[None] | None) -> None:
        try:
            self.result()
        except BaseException as e:  # noqa: BLE001 -- counted here, answered by the caller
            self.node._ended(e)
        else:
            self.node._ended(None)


class _Read(_Op):
    """One read's coordination: the local copy, the tally of the answers (None: N=1, the local
    copy is the read) and, once every answer is in, the read repair of stale copies."""

    __slots__ = ("local", "tally", "epoch")

    def __init__(self, node: Node, key: bytes, local: VersionSet, tally: ReadTally[VersionSet] | None,
                 timeout: float) -> None:
        super().__init__(node, key, timeout)
        self.local = local
        self.tally = tally
        self.epoch = 0

    def result(self) -> VersionSet:
        """The merge of the first R answers.

        :raises QuorumError: fewer than R answers.
        """
        self._check()
        t = self.tally
        if t is None:
            return self.local
        if t.state != OK:
            raise _err(t)
        res = t.result()
        assert res is not None  # the local answer is never None
        return res

    def message(self, _target: str) -> Message:
        if self.msg is None:  # one message for every replica
            self.msg = Message(wire.REPLICA_GET, 0, {"key": self.key, "epoch": self.epoch})
        return self.msg

    def send(self, target: str, fan: _FanOut) -> None:
        """A batched read's send (_Batches)."""
        self.node._batches.add(wire.REPLICA_GET, target, self.key, self.epoch, self.timeout, fan)

    def answer(self, target: str, reply: Message) -> None:
        assert self.tally is not None
        self.tally.answer(target, VersionSet.from_wire(reply.fields["versions"]))

    def decided(self) -> bool:
        return self.tally is None or self.tally.state != PENDING

    def after(self) -> None:  # every answer is in (the answer went out long ago)
        t = self.tally
        if t is not None and t.state == OK and t.stale():
            self.node._spawn(self.node._repair(self.key, t, self.timeout))


class _Write(_Op):
    """One write's coordination: the new versions minted on the local copy, their tally, and
    what goes to the other replicas.

    Invariant: ``tally`` is None only when no tally decides (N=1, or the tests' deliberate
    ack-before-W bug); ``result()`` is meaningful once ``waiter`` is None or done.
    """

    __slots__ = ("new", "tally", "hint_for", "epoch", "wire")

    def __init__(
        self, node: Node, key: bytes, new: VersionSet, tally: WriteTally | None,
        hint_for: dict[str, str] = _NO_HINTS,
    ) -> None:
        super().__init__(node, key, 0.0)
        self.new = new
        self.tally = tally
        self.hint_for = hint_for
        self.epoch = 0
        self.wire: Any = None

    def result(self) -> VersionSet:
        """The new versions, once W acked.

        :raises QuorumError: fewer than W acks (MaybeApplied when some may have applied it).
        """
        self._check()
        t = self.tally
        if t is not None and t.state != OK:
            raise _err(t)
        return self.new

    def message(self, target: str) -> Message:
        """The request to ``target``: the replica copy, or a hint for the primary it stands in for."""
        owner = self.hint_for.get(target)
        if owner is None:
            if self.msg is None:  # one message for every replica
                # ack: the replicas answer {} -- the acks are all this fan-out reads
                self.msg = Message(wire.REPLICA_PUT, 0, {"key": self.key, "versions": self.wire, "epoch": self.epoch, "ack": 1})
            return self.msg
        return Message(wire.HINT_PUT, 0, {"key": self.key, "versions": self.wire, "epoch": self.epoch, "owner": owner})

    def send(self, target: str, fan: _FanOut) -> None:
        """A batched write's send (_Batches); a hint is its own request (HINT_PUT)."""
        node = self.node
        if target in self.hint_for:
            fut = node.transport.send(node._ring().members[target].addr, self.message(target), self.timeout)
            fut.add_done_callback(functools.partial(fan._outcome, target))
        else:
            node._batches.add(wire.REPLICA_PUT, target, [self.key, self.wire], self.epoch, self.timeout, fan)

    def ack(self, target: str, _reply: Message) -> None:
        assert self.tally is not None
        self.tally.ack(target)

    def fail(self, target: str, reason: str, *, maybe_reached: bool = False) -> None:
        # before or after the answer: a primary (or fallback) that fails leaves a hint here
        assert self.tally is not None
        self.tally.fail(target, reason, maybe_reached=maybe_reached)
        self.node._keep_hints([self.hint_for.get(target, target)], self.key, self.new)

    def decided(self) -> bool:
        return self.tally is None or self.tally.state != PENDING


def _ignore(*_args: Any, **_kw: Any) -> None:
    """A finished fan-out's callbacks (_FanOut._outcome): nothing more to feed."""


def _settled() -> bool:
    return True


class _FanOut:
    """The replica requests of one client request, and their outcomes fed to its tally.

    One future per replica request (``Transport.send``: no Task on a ready connection) and a
    callback each, instead of a Task per request and an ``asyncio.wait`` loop: the coordinator
    awaits ``waiter``, resolved once ``decided()`` after an outcome (or every outcome is in).
    Outcomes after that (the rest of the fan-out: read repair's late answers, a late failure's
    hint) are still fed (unless ``late`` is False), and ``after()`` runs once every outcome is
    in -- in a callback, never delaying the answer. Every request is bounded by its timeout
    (the transport's contract), so every fan-out ends.

    Invariant: ``left`` is the number of requests not resolved yet; ``waiter`` is resolved
    exactly once; an exception in a callback (a bug) fails ``waiter`` if it is still pending,
    so the request is answered (with an internal error) rather than left hanging.
    Determinism: outcomes are handled in the order their futures resolve -- on the simulated
    networks a function of the seed only.
    """

    __slots__ = ("node", "on_reply", "on_fail", "decided", "after", "late", "waiter", "left", "_ended")

    def __init__(
        self,
        node: Node,
        on_reply: Callable[[str, Message], Any],
        on_fail: Callable[..., Any],
        decided: Callable[[], bool],
        after: Callable[[], None] | None = None,
        *,
        late: bool = True,
    ) -> None:
        self.node = node
        self.on_reply = on_reply
        self.on_fail = on_fail
        self.decided = decided
        self.after = after
        self.late = late
        self.waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.left = 0
        self._ended: asyncio.Future[None] | None = None

    def start(
        self, nodes: Sequence[str], make: Callable[[str], Message], timeout: float,
        send_to: Callable[[str, _FanOut], None] | None = None,
    ) -> None:
        """Send ``make(node)`` to each of ``nodes`` (in order); ``send_to(node, fan)``, when
        given, sends instead (a batched read or write: _Batches) and settles the outcome into this
        fan-out itself (:meth:`settle`, exactly once per node)."""
        owner = self.node
        ring = owner._ring()
        members = ring.members
        send = owner.transport.send
        self.left = len(nodes)
        owner._fanouts.add(self)
        for node in nodes:
            if send_to is None:
                m = members.get(node)
                fut = send(m.addr if m is not None else owner._addr_of(ring, node), make(node), timeout)
                fut.add_done_callback(functools.partial(self._outcome, node))
            else:
                send_to(node, self)

    def ended(self) -> asyncio.Future[None]:
        """A future resolved once every outcome is in (Node.drain waits for it)."""
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
            if self.left == 0:
                self._ended.set_result(None)
        return self._ended

    def _outcome(self, target: str, fut: asyncio.Future[Message]) -> None:
        reply, exc = _result(target, fut)
        self.settle(target, reply, exc)

    def settle(self, target: str, reply: Message | None, exc: BaseException | None) -> None:
        """The outcome of the request to ``target``: its answer, or its failure ``exc``."""
        owner = self.node
        waiter = self.waiter
        try:
            if not self.late and waiter.done():
                return
            if exc is None:
                owner.suspects.discard(target)
                try:
                    self.on_reply(target, reply)  # type: ignore[arg-type]  # a Message: exc is None
                except ClusterError as e:  # a malformed answer is that replica's failure
                    self.on_fail(target, f"bad answer: {e}", maybe_reached=True)
                return
            if isinstance(exc, (Unreachable, RequestTimeout)):
                owner._suspect(target)
            elif not isinstance(exc, (Error, OSError)):
                raise exc  # a bug: this request's internal error
            # Overloaded, WrongEpoch, BadRequest, KeyTooLarge, RemoteError...: that replica's failure
            self.on_fail(target, _why(exc), maybe_reached=_maybe_reached(exc))
        except BaseException as e:  # noqa: BLE001 -- never leave the request unanswered
            if not waiter.done():
                waiter.set_exception(e)
        finally:
            self.left -= 1
            if not waiter.done() and (self.left == 0 or self.decided()):
                waiter.set_result(None)
            if self.left == 0:
                owner._fanouts.discard(self)
                if self._ended is not None and not self._ended.done():
                    self._ended.set_result(None)
                after, self.after = self.after, None
                # the callbacks close over their request's locals, which hold this fan-out:
                # let go of them, so the request is freed by reference counting (no cycle
                # for the GC to find: tests/cluster/test_no_cycles.py)
                self.on_reply = self.on_fail = _ignore
                self.decided = _settled
                if after is not None:
                    try:
                        after()
                    except Exception:  # noqa: BLE001 -- background work: logged, never raised
                        log.exception("%s: background work after a fan-out failed", owner.config.name)


__all__ = ["Node", "Config", "DEFAULT_TIMEOUT"]
