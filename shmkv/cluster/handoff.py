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

Re-targeted when the ring moved on (:meth:`Handoff._retarget`). A hint whose owner no longer
holds its key -- the owner was removed, or a re-weight or an add moved the key's range away --
would be refused by the owner for ever, and a hint may be the only copy a fallback holds of an
acknowledged write. So it goes to the key's *current* primaries that are up (this node
included, over its own port, when it became one), as the same replica merge, and is deleted
once every one of them answered OK; a primary that was down catches up by anti-entropy, as
after any write it missed. Riak hands a fallback vnode's data to the partition's current owner
the same way. (Rejected: dropping such hints, as this file did first -- safe only while a
primary's own copy of every hinted write is sure to survive, which two failures can break.)

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
a BadRequest and a log line; hints found on disk for owners no longer in the ring are
re-targeted (above), with a log line.
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
        self.retargeted = 0  # hints handed to their key's current primaries (module docstring)
        members = self.ring().members
        for owner, count in self.hints.owners().items():
            if owner not in members:
                log.warning("%s: %d hints for %s, no longer a member of the ring: they go to their "
                            "keys' current primaries", self.name, count, owner)

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

    async def deliver_once(self, budget: float | None = None) -> int:
        """Hand back every hint of every up owner (within ``budget`` seconds when given);
        returns how many were delivered and deleted."""
        start = self.clock()
        delivered = 0
        ring = self.ring()
        for owner in self.hints.owners():
            todo = self.hints.keys(owner)  # once per round: a batch need not rescan every hint
            if owner in ring.members:
                moved = [k for k in todo if owner not in ring.preference_list(k, self.n)]
            else:
                moved = todo
            if moved:
                gone = set(moved)
                todo = [k for k in todo if k not in gone]
                delivered += await self._retarget(owner, moved, ring, start, budget)
            if not todo or not self.up(owner):
                continue
            addr = ring.members[owner].addr
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

    async def _retarget(self, owner: str, keys: list[bytes], ring: Ring, start: float,
                        budget: float | None) -> int:
        """Hand the hints of ``owner`` for ``keys`` -- keys it no longer holds under ``ring`` -- to
        each key's current primaries that are up; returns how many were deleted (module
        docstring, "Re-targeted")."""
        done = 0
        for i in range(0, len(keys), self.batch):
            if budget is not None and self.clock() - start >= budget:
                break
            batch = [(k, vs) for k in keys[i : i + self.batch] if (vs := self.hints.get(owner, k)) is not None]
            targets_of: dict[bytes, list[str]] = {}
            items_for: dict[str, list[list[Any]]] = {}
            for k, vs in batch:
                targets = [p for p in ring.preference_list(k, self.n) if p == self.name or self.up(p)]
                if not targets:
                    continue  # none of its primaries is up: next round
                targets_of[k] = targets
                wired = vs.to_wire()
                for p in targets:
                    items_for.setdefault(p, []).append([k, wired])
            answered: set[str] = set()
            for p, items in items_for.items():
                msg = Message(wire.REPLICA_PUT_MANY, 0, {"items": items, "epoch": ring.epoch})
                try:
                    await self.transport.request(ring.members[p].addr, msg, self.timeout)
                except (Error, OSError) as e:
                    log.debug("%s: re-targeted hints of %s to %s failed (%s); kept", self.name, owner, p, e)
                    continue
                answered.add(p)
            acked = [(k, vs) for k, vs in batch if k in targets_of and all(p in answered for p in targets_of[k])]
            n = self.hints.ack_many(owner, acked)  # a hint that grew stays for the next round
            self.retargeted += n
            done += n
        if done:
            log.info("%s: handed %d hints of %s to their keys' current primaries", self.name, done, owner)
        return done

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
            "retargeted": self.retargeted, "max_hints": self.hints.max_hints,
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
                           "refused": 0, "dropped": 0, "retargeted": 0}
    for p in parts:
        if not isinstance(p, dict):
            continue
        for k in ("pending", "bytes", "added", "delivered", "refused", "dropped", "retargeted"):
            v = p.get(k)
            if isinstance(v, int):
                out[k] += v
        for owner, c in (p.get("by_owner") or {}).items():
            if isinstance(c, int):
                out["by_owner"][owner] = out["by_owner"].get(owner, 0) + c
    out["by_owner"] = dict(sorted(out["by_owner"].items()))
    return out


__all__ = ["Handoff", "hints_dir", "node_counts", "MAX_HINTS", "MAX_BYTES"]
