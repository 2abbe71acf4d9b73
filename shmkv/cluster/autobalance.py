"""The auto-balance loop (``--auto-balance``): feeds balance.py's policy on the configuration leader.

Every node with the configuration group answers LOAD (any worker of it: the counters are the
shared Store's). The node whose group member is the Raft leader, when started with
``--auto-balance``, every ``interval`` s asks every member for its LOAD (its own without a hop),
timestamps the answers with its own clock (no clock of another host is trusted), hands them to
a :class:`~shmkv.cluster.balance.Balance` and commits the change it returns, if any, through
:meth:`ConfigService.change` -- the path ``shmkv cluster weight`` takes -- as an ``auto`` weight
command bound to the epoch it was computed at (cluster_config.py). A node that stops leading
drops its policy; on leading again it starts a fresh one (which waits a window and a cooldown).

Rejected: carrying the counters in the gossip payload. Gossip is owned by worker 0 and its
view format is shared with the liveness code (liveness.py); a LOAD poll of at most one small
request per member per interval, from one node, costs less than changing that format and needs
no second source of truth for the loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from ..errors import Error
from . import wire
from .balance import Balance, Change, Sample, Settings
from .raft.core import Role
from .wire import Message

if TYPE_CHECKING:
    from ..store import Store
    from .config_service import ConfigService
    from .coordinator import Node
    from .daemon import Options

log = logging.getLogger("shmkv.cluster.balance")

#: seconds between two rounds of LOAD requests (the policy's ``stale`` is 3 of them)
INTERVAL = 1.0


def settings_of(o: Options) -> Settings:
    """The policy's settings from ``shmkv serve``'s flags (``--balance-*``; defaults: Settings).
    :raises ConfigError: settings that cannot work (Settings.check)."""
    d = Settings()
    low, high = getattr(o, "balance_bounds", None) or (d.low, d.high)
    s = Settings(
        threshold=getattr(o, "balance_threshold", d.threshold),
        window=getattr(o, "balance_window", d.window),
        cooldown=getattr(o, "balance_cooldown", d.cooldown),
        low=low, high=high,
        step=min(d.step, getattr(o, "balance_threshold", d.threshold)),
        stale=3 * getattr(o, "balance_interval", INTERVAL),
        metric=getattr(o, "balance_metric", d.metric),
    )
    s.check()
    return s


def store_load(store: Store) -> dict[str, int]:
    """The node's load counters, from the Store's shared stats (every worker's work)."""
    st = store.stats()
    ops = int(st.get("gets", 0)) + int(st.get("puts", 0)) + int(st.get("deletes", 0))
    used = sum(int(c.get("chunk_size", 0)) * int(c.get("used", 0)) for c in st.get("classes") or ())
    return {"ops": ops, "bytes": used}


class AutoBalance:
    """One node's part: the LOAD answer always; the loop with ``enabled`` (see the module
    docstring). ``start()`` once the configuration service runs; ``close()`` at stop."""

    def __init__(self, node: Node, store: Store, service: ConfigService | None, settings: Settings,
                 *, enabled: bool, interval: float = INTERVAL) -> None:
        self.node, self.store, self.service = node, store, service
        self.settings = settings
        self.enabled = enabled
        self.interval = interval
        self.policy: Balance | None = None
        self.adjustments = 0  # changes this node committed as leader (metrics.py)
        self._task: asyncio.Task[None] | None = None

    def register(self) -> None:
        self.node.services[wire.LOAD] = self._on_load

    async def _on_load(self, _msg: Message) -> Message:
        return Message(wire.OK, 0, store_load(self.store))

    def start(self) -> None:
        self.register()
        if self.enabled and self.service is not None and self.service.raft is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"enabled": self.enabled}
        if self.enabled:
            s = self.settings
            out.update(metric=s.metric, threshold=s.threshold, window=s.window, cooldown=s.cooldown,
                       bounds=[s.low, s.high], committed_here=self.adjustments)
            out.update(self.policy.status() if self.policy is not None else {"state": "not leading"})
        return out

    # -- the loop ------------------------------------------------------------------------------

    def _leading(self) -> bool:
        svc = self.service
        return svc is not None and svc.raft is not None and svc.raft.role == Role.LEADER and svc.state is not None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            if not self._leading():
                self.policy = None
                continue
            try:
                await self.round(loop.time())
            except Error as e:  # the store went away (shutdown), or a change was refused
                log.info("%s: auto-balance round: %s", self.node.config.name, e)

    async def round(self, now: float) -> Change | None:
        """One round: sample every member, decide, commit the change (if any)."""
        svc = self.service
        assert svc is not None and svc.state is not None
        if self.policy is None:
            self.policy = Balance(self.settings, now)
        state = svc.state
        members = state.ring.members
        answers = await asyncio.gather(*(self._load(m.name, m.addr) for m in members.values()))
        loop = asyncio.get_running_loop()
        for name, got in zip(members, answers, strict=True):
            if got is not None:
                self.policy.observe(name, Sample(got[0], got[1]["ops"], got[1]["bytes"]))
        if svc.state is not None:  # a change may have committed while the answers came
            state = svc.state
        members = state.ring.members
        for gone in set(self.policy.samples) - set(members):
            del self.policy.samples[gone]
        now = loop.time()
        weights = {n: m.weight for n, m in members.items()}
        change = self.policy.decide(now, state.epoch, weights, state.base)
        if change is None:
            return None
        log.info("%s: auto-balance: %s carries %.2fx its share: weight %g -> %g", self.node.config.name,
                 change.name, change.load, change.old, change.weight)
        try:
            await svc.change(change.command(state.epoch))
        except Error as e:
            self.policy.failed(loop.time())
            log.info("%s: auto-balance change of %s not committed: %s", self.node.config.name, change.name, e)
            return None
        self.policy.committed(loop.time(), change)
        self.adjustments += 1
        return change

    async def _load(self, name: str, addr: str) -> tuple[float, dict[str, int]] | None:
        """(when, counters) of one member, or None (it did not answer in time)."""
        loop = asyncio.get_running_loop()
        if name == self.node.config.name:
            return loop.time(), store_load(self.store)
        try:
            reply = await self.node.transport.request(addr, Message(wire.LOAD, 0, {}), self.interval)
            f = reply.fields
            if type(f.get("ops")) is int and type(f.get("bytes")) is int:
                return loop.time(), {"ops": f["ops"], "bytes": f["bytes"]}
        except (Error, OSError) as e:
            log.debug("%s: no load from %s: %s", self.node.config.name, name, e)
        return None


__all__ = ["AutoBalance", "settings_of", "store_load", "INTERVAL"]
