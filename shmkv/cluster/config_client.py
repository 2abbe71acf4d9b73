"""The CLI's side of the configuration group: propose a change, read the group's status.

Blocking functions over a short-lived TcpTransport (``shmkv cluster add/remove/weight/status``).
A change goes to the first seed that answers; a node that is not the leader forwards it there
(config_service.ConfigService.change), so any member will do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from ..errors import Error
from . import wire
from .cluster_config import ClusterConfig
from .errors import ClusterError
from .transport import TcpTransport, Unreachable, run
from .wire import Message, Overloaded


class NoConfigGroup(ClusterError):
    """No node answered with a configuration group (none was started with --raft-dir/--join)."""


async def _propose(seeds: Sequence[str], cmd: dict[str, Any], timeout: float) -> ClusterConfig:
    t = TcpTransport()
    last: BaseException | None = None
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for addr in seeds:
                try:
                    reply = await t.request(addr, Message(wire.CONFIG_CHANGE, 0, {"cmd": cmd}), timeout)
                    return ClusterConfig.from_wire(reply.fields["config"])
                except (Overloaded, Unreachable) as e:  # no leader yet / not up: another, or later
                    last = e
            if asyncio.get_running_loop().time() >= deadline:
                raise ClusterError(f"no member committed the change within {timeout:g} s: {last}")
            await asyncio.sleep(0.3)
    finally:
        await t.close()


def propose(seeds: Sequence[str], cmd: dict[str, Any], timeout: float = 15.0) -> ClusterConfig:
    """Commit ``cmd`` (cluster_config.py); the committed configuration.
    :raises ConfigError: refused, with the reason. :raises ClusterError: no leader in time."""
    return run(_propose(seeds, cmd, timeout))


async def _identity(addr: str, timeout: float) -> dict[str, Any]:
    t = TcpTransport()
    try:
        reply = await t.request(addr, Message(wire.STATUS, 0, {}), timeout)
        return dict(reply.fields.get("status") or {})
    finally:
        await t.close()


def node_identity(addr: str, timeout: float = 2.0) -> dict[str, Any]:
    """The STATUS of the (running) node at ``addr``: its name and weight for ``cluster add``."""
    return run(_identity(addr, timeout))


async def _group_status(addrs: Sequence[str], timeout: float) -> dict[str, Any] | None:
    t = TcpTransport()
    try:
        views: dict[str, dict[str, Any]] = {}
        for addr in dict.fromkeys(addrs):
            try:
                reply = await t.request(addr, Message(wire.CONFIG, 0, {}), timeout)
            except (Error, OSError):
                continue
            raft = reply.fields.get("raft")
            if isinstance(raft, dict):
                views[addr] = raft
        if not views:
            return None
        etcd = [v for v in views.values() if v.get("source") == "etcd"]
        if etcd:  # --config etcd://: no group, the source and how far each node has followed it
            return {
                "source": "etcd",
                "endpoint": etcd[0].get("endpoint"),
                "key": etcd[0].get("key"),
                "revision": max(v.get("revision") or 0 for v in etcd),
                "epoch": max(v.get("epoch") or 0 for v in etcd),
                "voters": [], "leader": None, "term": None, "commit": None,
                "nodes": {v["name"]: {"epoch": v.get("epoch"), "revision": v.get("revision"),
                                      "connected": v.get("connected"), "last_error": v.get("last_error"),
                                      "role": "learner", "rebalance": v.get("rebalance")}
                          for v in etcd},
                # the move under way (cluster_config.Move), as the most advanced node knows it
                "moving": max(etcd, key=lambda v: v.get("config_epoch") or 0).get("moving"),
            }
        # The leader's own view is the authority for term, commit and voters: the highest term's leader.
        leaders = [v for v in views.values() if v.get("role") == "leader"]
        lead = max(leaders, key=lambda v: v.get("term", 0)) if leaders else None
        base = lead or max(views.values(), key=lambda v: (v.get("term") or 0, v.get("commit") or 0))
        voters = base.get("voters") or next(iter(views.values())).get("voters") or []
        return {
            "source": "raft",
            "voters": voters,
            "leader": {"name": lead["name"], "addr": lead.get("leader_addr")} if lead else None,
            "term": base.get("term"),
            "commit": base.get("commit"),
            "epoch": max(v.get("epoch") or 0 for v in views.values()),
            "nodes": {v["name"]: {"epoch": v.get("epoch"), "role": v.get("role", "learner"),
                                  "rebalance": v.get("rebalance")}
                      for v in views.values()},
            # auto-balance as the leader runs it (autobalance.py): state, loads, adjustments
            "balance": (lead or {}).get("balance"),
            # the move under way (cluster_config.Move) as the most advanced node knows it, or None
            "moving": max(views.values(), key=lambda v: v.get("config_epoch") or 0).get("moving"),
        }
    finally:
        await t.close()


async def _wait_moved(seeds: Sequence[str], epoch: int, timeout: float) -> dict[str, Any] | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    st: dict[str, Any] | None = None
    while True:
        st = await _group_status(seeds, 1.0)
        mv = (st or {}).get("moving")
        if st is not None and (mv is None or mv.get("epoch") != epoch) and (st.get("epoch") or 0) >= epoch:
            return None
        if loop.time() >= deadline:
            return mv if isinstance(mv, dict) else {"epoch": epoch, "waiting": ["(unknown: no node answered)"]}
        await asyncio.sleep(0.5)


def wait_moved(seeds: Sequence[str], epoch: int, timeout: float) -> dict[str, Any] | None:
    """Wait up to ``timeout`` s until the move started at ``epoch`` is over (every old owner
    has pushed its copies, rebalance.py); None then, else the move still under way."""
    return run(_wait_moved(seeds, epoch, timeout))


def group_status(addrs: Sequence[str], timeout: float = 1.0) -> dict[str, Any] | None:
    """The group as the nodes at ``addrs`` see it (None when none runs one): voters, the
    leader (name, address), term, commit index, epoch, and each node's epoch. With
    ``--config etcd://`` (``source`` "etcd"): the etcd endpoint and key, the highest revision
    and epoch the nodes serve by, and each node's epoch, revision and whether etcd answers it."""
    return run(_group_status(addrs, timeout))


__all__ = ["propose", "group_status", "node_identity", "wait_moved", "NoConfigGroup"]
