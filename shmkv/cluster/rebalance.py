"""Moving copies to their new owners after a ring change: old owners push, rate-limited.

When a node adopts a new ring (config_service.py), every key it holds whose preference list
*gained* members -- members in the new list that were not in the old -- is sent to those
members (REPLICA_PUT_MANY for version sets, REPLICA_COUNTER for counters), routed with the new
epoch. Every old owner pushes, including a node that was just removed (it still holds its
copies; ``cluster remove`` leaves it running until its push is done, see ``status``), so a key
reaches its new owners as long as any one copy does. Merges are idempotent (versions.py,
crdt.py), so duplicate pushes from several old owners cost bandwidth only.

Rate: at most ``rate`` keys per second, in batches of ``batch``. A pass that fails anywhere (a
new owner down, or still at the old epoch and refusing with WrongEpoch) is repeated after
``retry`` seconds, up to ``attempts`` times, then reported (log and status) -- never dropped
silently. A change that arrives during a pass restarts the scan from the oldest ring not yet
streamed, so successive changes are covered by one pass against the newest ring.

What this does not give yet (issue 13, second half): reads of a moving range are not routed to
the old owners until the new ones have caught up -- until a pass ends, a read with R answers
that all come from new owners can miss a key (read repair then fixes it from the rest) -- and
a pass is not resumed from where it was after a restart (it is redone from the start only if
the node adopts a newer ring again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from ..errors import Error
from . import wire
from .replica import COUNTER, VERSIONS
from .ring import Ring
from .wire import Message

if TYPE_CHECKING:
    from .coordinator import Node

log = logging.getLogger("shmkv.cluster.rebalance")


class Rebalancer:
    def __init__(self, node: Node, *, rate: float = 20000.0, batch: int = 256, retry: float = 1.0,
                 attempts: int = 30, timeout: float = 2.0) -> None:
        self.node = node
        self.rate, self.batch, self.retry, self.attempts, self.timeout = rate, batch, retry, attempts, timeout
        self._from: Ring | None = None  # the oldest ring whose moves are not all streamed yet
        self._restart = False
        self._task: asyncio.Task[None] | None = None
        self.progress: dict[str, Any] = {"state": "idle", "passes": 0, "keys_sent": 0, "failed_passes": 0}

    def on_change(self, old: Ring | None, new: Ring) -> None:
        if old is None or old == new:
            return
        if self._from is None:
            self._from = old
        self._restart = True
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        attempt = 0
        while self._from is not None:
            self._restart = False
            old, new = self._from, self.node.ring
            assert new is not None
            self.progress.update(state="streaming", from_epoch=old.epoch, to_epoch=new.epoch, scanned=0, sent=0)
            try:
                ok = await self._pass(old, new)
            except Error as e:  # the store went away (shutdown): stop
                log.warning("%s: rebalance stopped: %s", self.node.config.name, e)
                return
            self.progress["passes"] += 1
            if self._restart:
                continue  # a newer ring arrived: rescan against it (from the same old ring)
            if ok:
                log.info("%s: streamed %d copies to their new owners (epoch %d -> %d)",
                         self.node.config.name, self.progress["sent"], old.epoch, new.epoch)
                self._from = None
                attempt = 0
                self.progress["state"] = "idle"
                break
            attempt += 1
            self.progress["failed_passes"] += 1
            if attempt >= self.attempts:
                log.error("%s: gave up streaming moves epoch %d -> %d after %d passes",
                          self.node.config.name, old.epoch, new.epoch, attempt)
                self.progress["state"] = "failed"
                self._from = None
                return
            self.progress["state"] = "retrying"
            await asyncio.sleep(self.retry)

    async def _pass(self, old: Ring, new: Ring) -> bool:
        n = self.node.config.n
        me = self.node.config.name
        store = self.node.replica.store
        ok = True
        pending: dict[str, list[Any]] = {}
        counters: list[tuple[bytes, str]] = []
        for skey in store.keys():
            if self._restart:
                return False
            kind, key = skey[:1], skey[1:]
            if kind not in (VERSIONS, COUNTER) or not key:
                continue
            self.progress["scanned"] += 1
            gained = [m for m in new.preference_list(key, n) if m != me and m not in old.preference_list(key, n)]
            if not gained:
                continue
            if kind == COUNTER:
                counters.extend((key, m) for m in gained)
                continue
            vs = self.node.replica.get(key)
            for m in gained:
                items = pending.setdefault(m, [])
                items.append([key, vs.to_wire()])
                if len(items) >= self.batch:
                    ok &= await self._send_versions(new, m, pending.pop(m))
                    await asyncio.sleep(self.batch / self.rate)
        for m, items in pending.items():
            ok &= await self._send_versions(new, m, items)
        for key, m in counters:
            c = self.node.replica.counter(key)
            ok &= await self._send(new, m, Message(wire.REPLICA_COUNTER, 0,
                                                   {"key": key, "counter": c.to_wire(), "epoch": new.epoch}))
        return ok and not self._restart

    async def _send_versions(self, ring: Ring, member: str, items: list[Any]) -> bool:
        ok = await self._send(ring, member, Message(wire.REPLICA_PUT_MANY, 0, {"items": items, "epoch": ring.epoch}))
        if ok:
            self.progress["sent"] += len(items)
            self.progress["keys_sent"] += len(items)
        return ok

    async def _send(self, ring: Ring, member: str, msg: Message) -> bool:
        addr = ring.members[member].addr
        try:
            await self.node.transport.request(addr, msg, self.timeout)
        except (Error, OSError) as e:
            log.info("%s: moving copies to %s failed (will retry): %s", self.node.config.name, member, e)
            return False
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


__all__ = ["Rebalancer"]
