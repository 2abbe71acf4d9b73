"""How a daemon gets its ring when the configuration group runs (``--raft-dir`` or ``--join``),
or when an etcd cluster keeps the configuration instead (``--config etcd://``: etcd_config.py).

The daemon calls :meth:`ConfigHook.learn` where it would call membership.join_static, then
:meth:`ConfigHook.start` once it serves and :meth:`ConfigHook.close` at stop; that is the whole
of its wiring. Three ways to the first ring:

- a voter whose ``--raft-dir`` holds a log with a committed configuration: replays it and
  serves the latest committed ring at once (a restart needs no seeds);
- ``--seeds`` (every founding node): the static epoch-1 ring of membership.join_static, which the
  group's first leader then commits as its bootstrap (config_service.py);
- ``--join SEED`` (a node that is not in the ring yet): asks SEED for the committed
  configuration, proposes its own ``add`` (unless ``--await-add``: then an operator's ``shmkv
  cluster add`` does) and waits until a committed configuration holds it. A node already in
  the ring under its name and address just adopts it (a restart of a joined node).

With ``--config etcd://`` the service is etcd_config.EtcdConfigService (the same interface,
:class:`~shmkv.cluster.config_source.ConfigSource`), which learns its first ring from etcd.

Workers 1..K-1 of a ``--workers K`` node do not run a member: they take the ring as the static
path or the Store gives it and follow the Store (config_service.StoreFollower).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Error
from . import wire
from .autobalance import INTERVAL, AutoBalance, settings_of
from .cluster_config import ClusterConfig
from .config_service import (
    CONFIG_KEY,
    RELAY_KEY,
    ConfigService,
    OnChange,
    StoreFollower,
    default_voters,
)
from .config_source import ConfigSource
from .errors import ConfigError
from .etcd_kv import parse_url
from .membership import check_defaults, join_static
from .rebalance import DEFAULT_RATE, Rebalancer
from .ring import Ring
from .transport import TcpTransport, Transport, split_addr
from .wire import Message, Overloaded

if TYPE_CHECKING:
    from ..store import Store
    from .coordinator import Node
    from .daemon import Options
    from .workers import Worker

log = logging.getLogger("shmkv.cluster.config")

JOIN_POLL = 0.3


def wanted(o: Options) -> bool:
    return bool(getattr(o, "raft_dir", None) or getattr(o, "join", None) or getattr(o, "config", None))


def _has_log(raft_dir: str) -> bool:
    p = Path(raft_dir)
    return (p / "hardstate").exists() or (p / "snapshot").exists()


class ConfigHook:
    def __init__(self, o: Options, node: Node, transport: Transport, store: Store,
                 worker: Worker | None, on_change: OnChange | None = None) -> None:
        self.o, self.node, self.transport, self.store = o, node, transport, store
        self.worker = worker
        self.on_change = on_change
        self.primary = worker is None or worker.index == 0  # runs the node's group member
        self.rebalancer: Rebalancer | None = None
        if self.primary and on_change is None:
            self.rebalancer = Rebalancer(node, rate=float(getattr(o, "stream_rate", None) or DEFAULT_RATE))
            self.rebalancer.report = self._report
            self.on_change = self.rebalancer.on_change
        self.service: ConfigSource | None = None
        #: --config etcd://...: the configuration is etcd's, not the built-in group's
        url: str | None = getattr(o, "config", None)
        self.etcd_url = parse_url(url) if url else None
        self.follower: StoreFollower | None = None
        self.balance: AutoBalance | None = None  # LOAD answers; the --auto-balance loop
        self._relay: TcpTransport | None = None

    async def _report(self, cmd: dict[str, Any]) -> Any:
        """The rebalancer's ``streamed`` report, committed through the group (rebalance.py)."""
        if self.service is None:
            raise Overloaded("the configuration service is not up yet")
        return await self.service.change(cmd)

    def _service(self, voters: tuple[str, ...] | None) -> ConfigService:
        return ConfigService(self.node, self.transport, voters, self.o.raft_dir,
                             on_change=self.on_change, store=self.store if self.worker else None)

    async def learn(self, deadline: float) -> Ring:
        """The ring to start serving by (see the module docstring). :raises ConfigError."""
        o, cfg = self.o, self.node.config
        if not self.primary:
            return await self._learn_follower(deadline)
        if self.etcd_url is not None:
            from .etcd_config import EtcdConfigService

            etcd = EtcdConfigService(self.node, self.transport, self.etcd_url, on_change=self.on_change,
                                     store=self.store if self.worker else None)
            self.service = etcd
            return await etcd.learn(o.seeds, o.await_add, o.dc, deadline)
        if o.raft_dir and _has_log(o.raft_dir):
            svc = self._service(None)
            self.service = svc
            if svc.restored() is not None and self.node.ring is not None:
                log.info("%s: restarted from its Raft log at epoch %d", cfg.name, self.node.ring.epoch)
                return self.node.ring
        if o.join:
            return await self._join(deadline)
        ring = await join_static(cfg, o.seeds, self.transport, deadline)
        if self.service is None:
            voters = tuple(o.config_voters) if o.config_voters else default_voters(ring)
            unknown = [v for v in voters if v not in ring.members]
            if unknown:
                raise ConfigError(f"--config-voters names {', '.join(unknown)}, not members of --seeds")
            self.service = self._service(voters)
        return ring

    async def _join(self, deadline: float) -> Ring:
        o, cfg = self.o, self.node.config
        loop = asyncio.get_running_loop()
        asked = bool(o.await_add)
        seed = o.join
        assert seed is not None
        last: str = "no answer yet"
        while True:
            try:
                reply = wire.raise_for_error(await self.transport.request(seed, Message(wire.CONFIG, 0, {}), 2.0))
                raw, raft = reply.fields.get("config"), reply.fields.get("raft") or {}
                state = ClusterConfig.from_wire(raw) if raw is not None else None
                if state is not None:
                    me = state.ring.members.get(cfg.name)
                    if me is not None and me.addr != cfg.addr:
                        raise ConfigError(f"the name {cfg.name!r} belongs to {me.addr} in the cluster's ring; "
                                          f"{cfg.addr} must use another --name")
                    if me is not None:
                        if state.n != cfg.n:
                            raise ConfigError(f"config conflict: the cluster runs with N={state.n}, this node "
                                              f"was started with N={cfg.n}")
                        svc = self._service(tuple(raft.get("voters") or ()))
                        self.service = svc
                        svc._adopt(state)
                        assert self.node.ring is not None
                        return self.node.ring
                    if not asked:
                        await self._check_seed_defaults(seed)  # before the cluster commits us
                        cmd: dict[str, Any] = {"op": "add", "name": cfg.name, "addr": cfg.addr,
                                               "weight": float(cfg.weight), "dc": o.dc}
                        req = Message(wire.CONFIG_CHANGE, 0, {"cmd": cmd})
                        wire.raise_for_error(await self.transport.request(seed, req, 15.0))
                        asked = True
                        continue
                last = f"{seed} has no committed configuration yet" if state is None else \
                    f"waiting for a `shmkv cluster add` of {cfg.addr}"
            except ConfigError:
                raise
            except (Error, OSError) as e:
                last = str(e)
            if loop.time() >= deadline:
                raise ConfigError(f"could not join through {seed} before the join timeout: {last}")
            await asyncio.sleep(JOIN_POLL)

    async def _check_seed_defaults(self, seed: str) -> None:
        """A joining node must place keys as the cluster does (membership.check_defaults), as
        the seed's RING answer states it. :raises ConfigError: naming both values."""
        got = wire.raise_for_error(await self.transport.request(seed, Message(wire.RING, 0, {}), 2.0))
        check_defaults(self.node.config, got.fields)

    async def _learn_follower(self, deadline: float) -> Ring:
        loop = asyncio.get_running_loop()
        if not self.o.join and self.etcd_url is None:
            return await join_static(self.node.config, self.o.seeds, self.transport, deadline)
        while True:  # joining (or etcd's): worker 0 writes the configuration it learnt to the Store
            raw = self.store.get(CONFIG_KEY)
            if isinstance(raw, bytes):
                state = ClusterConfig.decode(raw)
                if state is not None and self.node.config.name in state.ring.members:
                    return state.ring
            if loop.time() >= deadline:
                raise ConfigError("worker 0 did not join the cluster before the join timeout")
            await asyncio.sleep(JOIN_POLL)

    async def start(self) -> None:
        # auto-balance leads from the built-in Raft group only (check_options: --raft-dir or --join)
        raft_service = self.service if isinstance(self.service, ConfigService) else None
        self.balance = bal = AutoBalance(self.node, self.store, raft_service, settings_of(self.o),
                                         enabled=bool(getattr(self.o, "auto_balance", False)),
                                         interval=getattr(self.o, "balance_interval", INTERVAL))
        if self.service is not None:
            rb = self.rebalancer
            self.service.extra_status = lambda: {
                **({"rebalance": dict(rb.progress)} if rb is not None else {}), "balance": bal.status()}
            self.service.start()
            if self.worker is not None and self.worker.count > 1:
                # the private listener workers 1..K-1 relay the group's requests to
                self._relay = TcpTransport()
                host, _ = split_addr(self.o.listen)
                addr = await self._relay.serve(f"{host}:0", self.node.handle)
                with contextlib.suppress(Error, OSError):
                    self.store.put(RELAY_KEY, addr.encode())
        elif self.worker is not None:
            self.follower = StoreFollower(self.node, self.store, self.transport, self.on_change)
            self.follower.start()
        bal.start()  # after the follower: LOAD is answered by every worker, not relayed

    def status(self) -> dict[str, Any] | None:
        return self.service.status() if self.service is not None else None

    async def close(self) -> None:
        if self.balance is not None:
            await self.balance.close()
        if self.rebalancer is not None:
            await self.rebalancer.close()
        if self.service is not None:
            await self.service.close()
        if self.follower is not None:
            await self.follower.close()
        if self._relay is not None:
            await self._relay.close()


__all__ = ["ConfigHook", "wanted"]
