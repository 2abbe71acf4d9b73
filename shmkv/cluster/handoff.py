"""Sloppy quorum and hinted handoff: hints taken, kept (hints.py) and handed back to their owner.

Taking hints (the coordinator, coordinator.py's ``write``). With a primary of the key down (gossip
says so, or a request to it just failed), a sloppy write goes to the next healthy node of the
ring (placement.apl: a *fallback*) as a HINT_PUT naming the owner; the fallback keeps it here and
its ack counts toward W. ``--strict`` (per cluster) or ``strict=True`` (per request) keeps
fallbacks out of the count, for the R + W > N guarantee: reads ask primaries only, so a write
acknowledged by a fallback is not seen by a quorum read until it is handed back. Whenever a
primary misses a write and no fallback holds it for that primary (every node of a small ring is
already a primary, strict mode, or the primary failed during the write) the coordinator keeps the
hint itself -- it does not count toward W, it only brings the owner up to date later.

Handing back (:meth:`Handoff.deliver_once`, looped every ``interval``): for each owner with hints
that is up (gossip's verdict), batches of ``batch`` hints go to it as REPLICA_PUT_MANY -- the
ordinary replica merge, which the owner accepts because it is a primary of every key. A hint is
deleted only once the owner answered OK for a batch that carried it, and only if the hint did
not grow meanwhile (:meth:`HintStore.ack` checks that the acknowledged set covers it). A failed
batch leaves everything in place for the next round.

Per process. Every worker of a node (``--workers``) coordinates writes, so each keeps its own
hint file (``<path>/hints/w<index>/hints.log``; in memory without ``--path``) and its own
delivery loop; the counts are published on the node's gossip board so STATUS shows the node's
total. Known gap: hints of a worker index that no longer exists (a restart with fewer
``--workers``) stay on disk undelivered until the node runs with that many workers again.

Bounded. At most ``max_hints`` hints (``--max-hints``) and ``max_bytes``; past the bound a hint
is refused, counted (``shmkv_hints_refused_total``) and logged: a fallback answers "overloaded"
(its ack does not count), a coordinator's own hint is simply not kept (the owner catches up by
read repair or anti-entropy instead).

Bad input: a HINT_PUT for a node that is not in the ring, for this node itself, for a key whose
preference list does not hold the owner, or sent to one of the key's primaries, is refused with
a BadRequest and a log line; hints found on disk for owners no longer in the ring are dropped at
start with a log line (HintStore.drop_owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import Error
from . import wire
from .hints import MAX_BYTES, MAX_HINTS, HintStore
from .ring import Ring
from .transport import Transport
from .versions import VersionSet
from .wire import BadRequest, Message, Overloaded

if TYPE_CHECKING:
    from .gossip import Board

log = logging.getLogger("shmkv.cluster.handoff")

INTERVAL = 1.0
BATCH = 256
LOG_EVERY = 10.0


def hints_dir(path: str, index: int) -> str:
    """Where worker ``index`` of a node with ``--path path`` keeps its hints."""
    return os.path.join(path, "hints", f"w{index}")


class Handoff:
    """One process's hints and their delivery.

    :param up: whether a node is believed up (gossip's verdict): hints go only to those.
    :param ring: the node's current ring (a callable: it may change).
    """

    def __init__(
        self,
        name: str,
        hints: HintStore,
        transport: Transport,
        ring: Callable[[], Ring],
        up: Callable[[str], bool],
        *,
        n: int,
        timeout: float = 1.0,
        interval: float = INTERVAL,
        batch: int = BATCH,
        board: Board | None = None,
        index: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.hints = hints
        self.transport = transport
        self.ring = ring
        self.up = up
        self.n = n
        self.timeout = timeout
        self.interval = interval
        self.batch = batch
        self.board = board
        self.index = index
        self.clock = clock
        self.rejected = 0
        #: coordinator.TEST_BUG_ENV's value, handed over by whoever builds the node (None: always,
        #: outside the torture tests); only ``hint-early-delete`` acts here
        self.test_bug: str | None = None
        self._last_log: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.prune()

    # -- taking hints ------------------------------------------------------------------------

    def keep(self, owner: str, key: bytes, versions: VersionSet) -> bool:
        """Keep ``versions`` of ``key`` for ``owner``. False: refused, the bound is hit (logged)."""
        if self.hints.add(owner, key, versions):
            return True
        self._warn("full", "%s: hint store full (%d hints, %d bytes; bounds %d, %d): hint for %s refused "
                   "(shmkv_hints_refused_total counts them)", self.name, len(self.hints), self.hints.bytes,
                   self.hints.max_hints, self.hints.max_bytes, owner)
        return False

    def accept(self, fields: Any) -> Message:
        """Serve a HINT_PUT (this node as a fallback; module docstring for what is refused).

        :raises BadRequest: a hint this node must not keep. :raises Overloaded: the bound is hit.
        """
        owner, key = fields["owner"], fields["key"]
        if not isinstance(key, bytes) or not key:
            raise BadRequest("key must be non-empty bytes")
        ring = self.ring()
        why = None
        if owner not in ring.members:
            why = f"hint for {owner!r:.80}, not a member of the ring"
        elif owner == self.name:
            why = f"hint for {owner} sent to {owner} itself"
        else:
            prefs = ring.preference_list(key, self.n)
            if owner not in prefs:
                why = f"hint for {owner}, which holds no copy of {key[:64]!r}"
            elif self.name in prefs:
                why = f"hint for {owner} sent to {self.name}, a primary of {key[:64]!r} (it takes REPLICA_PUT)"
        if why is not None:
            self.rejected += 1
            self._warn("bad:" + why[:20], "%s: refused HINT_PUT: %s", self.name, why)
            raise BadRequest(f"refused HINT_PUT: {why}")
        if not self.keep(owner, key, VersionSet.from_wire(fields["versions"])):
            raise Overloaded(f"{self.name}: hint store full ({len(self.hints)} hints)")
        return Message(wire.OK, 0, {})

    # -- handing back ------------------------------------------------------------------------

    def prune(self) -> int:
        """Drop the hints of owners no longer in the ring (logged). Returns how many."""
        members = self.ring().members
        gone = 0
        for owner, count in self.hints.owners().items():
            if owner not in members:
                gone += self.hints.drop_owner(owner)
                log.warning("%s: dropped %d hints for %s: no longer a member of the ring", self.name, count, owner)
        return gone

    async def deliver_once(self, budget: float | None = None) -> int:
        """Hand back every hint of every up owner (within ``budget`` seconds when given);
        returns how many were delivered and deleted."""
        start = self.clock()
        delivered = 0
        self.prune()
        ring = self.ring()
        for owner in self.hints.owners():
            if not self.up(owner):
                continue
            addr = ring.members[owner].addr
            todo = self.hints.keys(owner)  # once per round: a batch need not rescan every hint
            for i in range(0, len(todo), self.batch):
                if budget is not None and self.clock() - start >= budget:
                    break
                batch = [(k, vs) for k in todo[i : i + self.batch] if (vs := self.hints.get(owner, k)) is not None]
                if not batch:
                    continue
                items = [[k, vs.to_wire()] for k, vs in batch]
                msg = Message(wire.REPLICA_PUT_MANY, 0, {"items": items, "epoch": ring.epoch})
                if self.test_bug == "hint-early-delete":  # DELIBERATE BUG (coordinator.TEST_BUG_ENV):
                    delivered += self.hints.ack_many(owner, batch)  # deleted before the owner said OK
                try:
                    await self.transport.request(addr, msg, self.timeout)
                except (Error, OSError) as e:
                    log.debug("%s: handoff to %s failed (%s); kept for the next round", self.name, owner, e)
                    break
                delivered += self.hints.ack_many(owner, batch)  # a hint that grew stays for the next round
        if delivered:
            log.info("%s: handed %d hints back (%d pending)", self.name, delivered, len(self.hints))
        self.publish()
        return delivered

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.deliver_once()
            except Error as e:  # a bad ring moment, a full disk: log, keep the loop
                log.warning("%s: handoff round failed: %s", self.name, e)

    # -- what STATUS and the metrics show ----------------------------------------------------

    def counts(self) -> dict[str, Any]:
        s = self.hints.stats
        return {
            "pending": len(self.hints), "by_owner": self.hints.owners(), "bytes": self.hints.bytes,
            "added": s.added, "delivered": s.delivered, "refused": s.refused, "dropped": s.dropped,
            "max_hints": self.hints.max_hints,
        }

    def publish(self) -> None:
        if self.board is not None:
            with contextlib.suppress(Error):
                self.board.put_hints(self.index, self.counts())

    def _warn(self, reason: str, text: str, *args: Any) -> None:
        now = self.clock()
        if now - self._last_log.get(reason, -1e18) >= LOG_EVERY:
            self._last_log[reason] = now
            log.warning(text, *args)


def node_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The node's hint counts: the sum of its workers' (``Board.hints``)."""
    out: dict[str, Any] = {"pending": 0, "by_owner": {}, "bytes": 0, "added": 0, "delivered": 0,
                           "refused": 0, "dropped": 0}
    for p in parts:
        if not isinstance(p, dict):
            continue
        for k in ("pending", "bytes", "added", "delivered", "refused", "dropped"):
            v = p.get(k)
            if isinstance(v, int):
                out[k] += v
        for owner, c in (p.get("by_owner") or {}).items():
            if isinstance(c, int):
                out["by_owner"][owner] = out["by_owner"].get(owner, 0) + c
    out["by_owner"] = dict(sorted(out["by_owner"].items()))
    return out


__all__ = ["Handoff", "hints_dir", "node_counts", "MAX_HINTS", "MAX_BYTES"]
