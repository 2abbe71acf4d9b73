"""The cluster configuration kept in an etcd cluster instead of the built-in Raft group.

``shmkv serve --config etcd://HOST:PORT[,...][/PREFIX]``: the same :class:`ClusterConfig` (the
ring -- members with weight, DC and address, hence the vnodes --, N/W/R, the epoch that every
change raises) lives in one etcd key (etcd_kv.py says which and why one). etcd is then the
linearizable log; every shmkv node is what config_service.py calls a *learner*: it never votes,
it adopts each newer configuration it learns. That is why :class:`EtcdConfigService` is a
:class:`ConfigService` with no Raft member: adopting a configuration (``_adopt``: never go back,
set the ring and the defaults, write it to the Store for the other workers, tell the
rebalancer) and the wire handlers (CONFIG, CONFIG_CHANGE, CONFIG_PUSH) are the built-in's own
code, unchanged; only where configurations come from and how a change commits differ.

Learning. One task *follows* the key: read it, then watch it from the revision after the read,
adopting every write in revision order. When the watch breaks (etcd restarted, unreachable,
the revision compacted) it waits with exponential backoff (:data:`MIN_BACKOFF` ..
:data:`MAX_BACKOFF`, jittered), reads again and watches again -- a write made while it was away
is in the read. Another task re-reads the key every :data:`RESYNC_INTERVAL` seconds, and at
once when a request arrives routed with a newer epoch (the same trigger as the built-in's
pull): a safety net for a watch that is silently stuck. While etcd is unreachable the node
serves on by the last configuration it adopted; no data request ever waits on etcd (only
configuration changes do, each within its deadline).

Changing. ``shmkv cluster add/remove/weight`` reach any member over the wire as before
(CONFIG_CHANGE; config_client.py); that member reads the key (linearizably), checks the
command against it (cluster_config.check: the same refusals as the built-in group), computes
the next configuration (cluster_config.apply: epoch + 1) and writes it with a transaction
conditioned on the key's revision being the one it read (etcd_kv.EtcdKV.cas). A change that
loses the race is refused with :class:`ConcurrentChange` ("config changed concurrently ...
retry") and changed nothing: there is no lost update. A transaction whose answer is lost (etcd
went away after it was sent) is reported as "may have been committed", never as failed.

Moves, as with the built-in group (cluster_config.py, "Moves"): the key's configuration carries
``moves`` (set when the key is created; a key written before this gets it at its next change)
and so every ring change records a move -- the old ring and the old owners awaited -- in the
same value, by the same compare-and-swap, so two changes cannot both start one. An old owner's
``streamed`` report (rebalance.py) is one more such transaction (epoch + 1, one name fewer
awaited); the last ends the move; ``cluster finish-move --force`` is one too. Reports of one
move race each other, so a report whose compare-and-swap loses is re-read, re-checked and tried
again (up to :data:`STREAMED_TRIES` times); ring changes are not retried here. A ring change
during a move is refused by cluster_config.check, word for word the built-in's refusal.

Starting. A node whose name is in the key's ring adopts it (a restart needs no seeds). A key
that is absent is initialised once: a founding node (its ``--listen`` in ``--seeds``) builds the
epoch-1 ring as the static path does (membership.join_static) and creates the key with a
transaction that only succeeds if it is still absent; every other founder adopts the winner's.
A node not in the ring adds itself (``--await-add``: waits for an operator's ``shmkv cluster
add``) and starts serving once the configuration holds it. etcd unreachable at start: retried
with backoff until ``--join-timeout``, then a clear error naming the endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack

from .cluster_config import ClusterConfig, apply
from .config_service import CHANGE_TIMEOUT, ConfigService, OnChange
from .errors import ClusterError, ConcurrentChange, ConfigError, ProtocolError
from .etcd_kv import EtcdKV, EtcdUnavailable, EtcdURL, Read
from .membership import join_static
from .ring import Ring
from .wire import Overloaded

if TYPE_CHECKING:
    from ..store import Store
    from .coordinator import Node
    from .transport import Transport

log = logging.getLogger("shmkv.cluster.config")

T = TypeVar("T")

MIN_BACKOFF = 0.1
MAX_BACKOFF = 5.0
RESYNC_INTERVAL = 5.0
JOIN_POLL = 0.3
#: tries of a ``streamed`` report whose compare-and-swap lost to another commit (change())
STREAMED_TRIES = 20
#: what cluster_config.check says of a ring change while a move is on
BUSY = "a configuration change is in progress"


def _decode(value: bytes | None) -> ClusterConfig | None:
    """:raises ProtocolError: the key holds something that is not a configuration."""
    if value is None:
        return None
    try:
        return ClusterConfig.decode(value)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"not a shmkv configuration: {e}") from None


def _describe(cmd: dict[str, Any]) -> str:
    op, name = cmd.get("op"), cmd.get("name")
    if op == "add":
        return f"add {name} at {cmd.get('addr')}"
    if op == "weight":
        return f"weight {name} {cmd.get('weight')}"
    return f"{op} {name}"


class EtcdConfigService(ConfigService):
    """One node's view of the configuration kept in etcd (module docstring). ``learn()``
    before the node serves, ``start()`` once it does, ``close()`` at stop."""

    def __init__(self, node: Node, transport: Transport, url: EtcdURL, *,
                 on_change: OnChange | None = None, store: Store | None = None,
                 kv: EtcdKV | None = None) -> None:
        # no voters, no Raft log: a learner of the built-in service, fed by etcd
        super().__init__(node, transport, (), None, on_change=on_change, store=store)
        self.url = url
        self.kv = kv if kv is not None else EtcdKV(url)
        self.pull_interval = RESYNC_INTERVAL
        #: the etcd revision of the configuration this node serves by (0: none yet)
        self.revision = 0
        self.connected = False
        self.last_error: str | None = None
        self._warned_deleted = False

    # -- life --------------------------------------------------------------------------------

    def start(self) -> None:
        super().start()  # the handlers, and the resync loop (ConfigService._puller -> pull())
        self._loops.append(asyncio.get_running_loop().create_task(self._follow()))

    async def close(self) -> None:
        # the etcd calls end first: a task reading a watch only sees its cancellation once
        # the call ends (etcd_kv.EtcdKV._calls), and super().close() waits for the tasks
        self._closed = True
        await self.kv.close()
        await super().close()

    async def learn(self, seeds: Sequence[str], await_add: bool, dc: str | None, deadline: float) -> Ring:
        """The ring to start serving by (module docstring, "Starting"). :raises ConfigError:"""
        cfg = self.node.config
        loop = asyncio.get_running_loop()
        rd = await self._until(deadline, "read the configuration", self.kv.get)
        if rd.value is None and cfg.addr in seeds:
            ring = await join_static(cfg, seeds, self.transport, deadline)
            # counts: daemon.check_options refuses level names with a configuration service
            # moves=True: ring changes keep the old owners serving until the copies are pushed
            boot = ClusterConfig(ring, cfg.n, cfg.w, cfg.r, moves=True)
            created, rd = await self._until(deadline, "initialise the configuration",
                                            lambda: self.kv.create(boot.encode()))
            if created:
                log.info("%s: initialised the cluster configuration in %s (epoch %d, %d members)",
                         cfg.name, self.url, ring.epoch, len(ring.members))
            else:
                log.info("%s: another node initialised the configuration in %s first; adopting it",
                         cfg.name, self.url)
        while rd.value is None:
            if loop.time() >= deadline:
                raise ConfigError(
                    f"{self.url} holds no cluster configuration (key {self.url.key.decode()}) and this "
                    f"node cannot make one: its --listen {cfg.addr} is not in --seeds"
                )
            await asyncio.sleep(JOIN_POLL)
            rd = await self._until(deadline, "read the configuration", self.kv.get)
        state = self._check_bad(rd)
        asked = await_add
        while True:
            me = state.ring.members.get(cfg.name)
            if me is not None and me.addr != cfg.addr:
                raise ConfigError(f"the name {cfg.name!r} belongs to {me.addr} in the ring kept in "
                                  f"{self.url}; {cfg.addr} must use another --name")
            if state.n != cfg.n:
                raise ConfigError(f"config conflict: the configuration in {self.url} has N={state.n}, "
                                  f"this node was started with N={cfg.n}")
            if me is not None:
                break
            if not asked:
                cmd: dict[str, Any] = {"op": "add", "name": cfg.name, "addr": cfg.addr,
                                       "weight": float(cfg.weight), "dc": dc}
                try:
                    state = await self.change(cmd)
                    asked = True
                    continue
                except ConfigError as e:
                    if not isinstance(e, ConcurrentChange) and BUSY not in str(e):
                        raise  # refused (an address taken...): named
                    # another change won, or a move is on (it ends by itself): re-read, try again
                    log.info("%s: adding itself: %s", cfg.name, e)
                except ClusterError as e:  # etcd away, or the outcome unknown: the re-read tells
                    log.info("%s: adding itself: %s", cfg.name, e)
            if loop.time() >= deadline:
                raise ConfigError(f"{cfg.addr} is not in the ring kept in {self.url} at the join timeout"
                                  + ("" if not await_add else f" (waiting for `shmkv cluster add {cfg.addr}`)"))
            await asyncio.sleep(JOIN_POLL)
            rd = await self._until(deadline, "read the configuration", self.kv.get)
            state = self._check_bad(rd)
            self.revision = max(self.revision, rd.mod_revision)
        self.revision = max(self.revision, rd.mod_revision)
        self._adopt(state)
        assert self.node.ring is not None
        return self.node.ring

    def _check_bad(self, rd: Read) -> ClusterConfig:
        try:
            state = _decode(rd.value)
        except ProtocolError as e:
            raise ConfigError(f"{self.url} key {self.url.key.decode()}: {e}") from None
        if state is None:
            raise ConfigError(f"{self.url} key {self.url.key.decode()} was deleted")
        return state

    async def _until(self, deadline: float, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()`` retried with backoff while etcd is unavailable, until ``deadline``."""
        loop = asyncio.get_running_loop()
        backoff = MIN_BACKOFF
        while True:
            try:
                out = await fn()
            except EtcdUnavailable as e:
                self._down(e)
                if loop.time() >= deadline:
                    raise ConfigError(f"cannot {what} before the join timeout: {e}") from None
                await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
                backoff = min(backoff * 2, 1.0)
                continue
            self._up()
            return out

    # -- following the key --------------------------------------------------------------------

    def _up(self) -> None:
        if not self.connected and self.last_error is not None:
            log.info("%s: etcd at %s answers again", self.name, self.kv.endpoint)
        self.connected = True

    def _down(self, e: BaseException) -> None:
        if self.connected or self.last_error is None:
            epoch = self.node.ring.epoch if self.node.ring is not None else 0
            log.warning("%s: %s; serving on by the configuration of epoch %d, retrying with backoff",
                        self.name, e, epoch)
        self.connected = False
        self.last_error = str(e)

    def _take(self, rd: Read) -> bool:
        """Adopt the configuration etcd held at ``rd`` if it is newer (``_adopt``: never back)."""
        try:
            cfg = _decode(rd.value)
        except ProtocolError as e:
            log.error("%s: %s holds a bad configuration at revision %d: %s; not adopted",
                      self.name, self.url, rd.mod_revision, e)
            return False
        if cfg is None:
            if self.state is not None and not self._warned_deleted:
                log.error("%s: the configuration key %s was deleted from %s; serving on by epoch %d",
                          self.name, self.url.key.decode(), self.url, self.state.epoch)
                self._warned_deleted = True
            return False
        self._warned_deleted = False
        if self.state is not None and cfg.epoch <= self.state.epoch:
            return False
        adopted = self._adopt(cfg)
        if adopted:
            self.revision = max(self.revision, rd.mod_revision)
        return adopted

    async def _follow(self) -> None:
        """Read, then watch from the next revision; on a break, back off and do it again."""
        backoff = MIN_BACKOFF
        while not self._closed:
            try:
                rd = await self.kv.get()
                self._up()
                backoff = MIN_BACKOFF
                self._take(rd)
                async for ev in self.kv.watch(rd.revision + 1):
                    self._take(ev)
            except EtcdUnavailable as e:
                self._down(e)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def pull(self, addrs: Sequence[str] = ()) -> bool:
        """Re-read the key (the resync loop; a request with a newer epoch). Whether a newer
        configuration was adopted."""
        try:
            rd = await self.kv.get()
        except EtcdUnavailable as e:
            self._down(e)
            return False
        self._up()
        return self._take(rd)

    # -- changes --------------------------------------------------------------------------------

    async def change(self, cmd: dict[str, Any], *, hops: int = 0,
                     timeout: float = CHANGE_TIMEOUT) -> ClusterConfig:
        """Commit ``cmd`` to etcd, conditioned on the epoch it was checked against; the new
        configuration. :raises ConfigError: refused (named). :raises ConcurrentChange: another
        change committed first (nothing changed; retry). :raises Overloaded: etcd unreachable
        (nothing changed; retry). :raises ClusterError: the outcome is unknown."""
        # A ``streamed`` report is re-checked against the newer configuration and tried again
        # when another commit (typically another owner's report) won the compare-and-swap: the
        # reports of one move commute, and each is checked anew, so none is lost and none
        # applies twice. A ring change is not: the caller decides (ConcurrentChange).
        tries = STREAMED_TRIES if cmd.get("op") == "streamed" else 1
        for attempt in range(tries):
            try:
                return await self._change_once(cmd, timeout)
            except ConcurrentChange:
                if attempt + 1 >= tries:
                    raise
                await asyncio.sleep(random.uniform(0.0, 0.02 * (attempt + 1)))
        raise AssertionError("unreachable")

    async def _change_once(self, cmd: dict[str, Any], timeout: float) -> ClusterConfig:
        try:
            rd = await self.kv.get()
        except EtcdUnavailable as e:
            self._down(e)
            raise Overloaded(f"{e}; the change was not made, retry") from None
        self._up()
        state = self._check_bad(rd) if rd.value is not None else None
        if state is None:
            raise ConfigError(f"{self.url} holds no cluster configuration yet (key {self.url.key.decode()})")
        if self.node.ring is not None:  # serving: what etcd holds is at least as new
            self._take(rd)
        if not state.moves:  # a key written before etcd tracked moves: from this change on
            state = dataclasses.replace(state, moves=True)
        # the very check and transition the Raft group applies (cluster_config.apply): the same
        # refusals (a ring change during a move...), the same move record
        new, why = apply(state, cmd)
        if why is not None or new is None:
            raise ConfigError(why or "refused")
        try:
            rev = await asyncio.wait_for(self.kv.cas(new.encode(), rd.mod_revision), timeout)
        except ConcurrentChange as e:
            try:
                now = _decode(e.current)
            except ProtocolError:
                now = None
            err = ConcurrentChange(
                f"config changed concurrently: `{_describe(cmd)}` was checked against epoch {state.epoch}, "
                f"but {self.url} holds epoch {now.epoch if now else '?'} now; nothing was changed, retry"
            )
            err.current = e.current
            raise err from None
        except (EtcdUnavailable, asyncio.TimeoutError) as e:
            self._down(e)
            raise ClusterError(
                f"{e}: the change to epoch {new.epoch} may or may not have been committed; "
                "check `shmkv cluster status`"
            ) from None
        log.info("%s: configuration epoch %d committed to %s at revision %d (%s)",
                 self.name, new.epoch, self.url, rev, _describe(cmd))
        self.revision = max(self.revision, rev)
        self._adopt(new)
        return new

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """This node's view, for ``cluster status``: the source (etcd endpoint, key), the
        revision of the configuration it serves by, its epoch, whether etcd answers now."""
        out: dict[str, Any] = {
            "name": self.name,
            "source": "etcd",
            "endpoint": str(self.url),
            "key": self.url.key.decode(),
            "revision": self.revision,
            "etcd_revision": self.kv.revision,
            "connected": self.connected,
            "last_error": None if self.connected else self.last_error,
            "voter": False,
            "voters": [],
            "leader": None,
            "epoch": self.node.ring.epoch if self.node.ring is not None else 0,
            "config_epoch": self.state.epoch if self.state is not None else 0,
        }
        mv = self.state.moving if self.state is not None else None
        if mv is not None:  # a ring change whose copies are not all pushed yet (cluster_config.Move)
            out["moving"] = mv.view()
        if self.extra_status is not None:
            out.update(self.extra_status())
        return out


__all__ = ["EtcdConfigService", "MIN_BACKOFF", "MAX_BACKOFF", "RESYNC_INTERVAL"]
