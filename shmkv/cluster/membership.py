"""Static membership: the ring is the ``--seeds`` list, learnt at start, epoch 1.

This step has no configuration service yet (the Raft log is a later issue). Every node is started
with the same seed list, which *is* the membership: at start a node asks each seed for its
identity (STATUS: name, weight, N) and builds the ring from the answers -- or, when some seed
already runs with a ring (a node restarting into a running cluster), adopts that ring after
checking that it agrees with its own flags. A conflict -- another N, a name used twice, a seed
whose identity differs from the ring's -- is a :class:`ConfigError` naming both sides, and the
node refuses to start; the nodes already running answer the conflicting node's STATUS with an
error saying why and keep serving everyone else.

The decisions (:func:`ring_from_statuses`, :func:`check_ring`, :func:`check_peer`) are pure; only
:func:`join_static` loops over the transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from . import wire
from .errors import ClusterError, ConfigError, ProtocolError
from .nodeconfig import Config
from .ring import Member, Ring
from .transport import Transport
from .wire import BadRequest, Message

STATIC_EPOCH = 1


def check_peer(mine: Config, ring: Ring | None, peer: Mapping[str, Any]) -> None:
    """A node's check of a peer's STATUS question (its identity): :raises BadRequest: conflict."""
    name, addr, n = peer.get("name"), peer.get("addr"), peer.get("n")
    if name is None:  # a plain status request (the CLI), not a joining node
        return
    if n is not None and n != mine.n:
        raise BadRequest(
            f"config conflict: {name} ({addr}) was started with N={n}, this cluster runs with "
            f"N={mine.n} ({mine.name} at {mine.addr})"
        )
    if name == mine.name and addr != mine.addr:
        raise BadRequest(
            f"config conflict: the name {name!r} is taken by {mine.addr}; {addr} must use another --name"
        )
    if ring is not None:
        for m in ring.members.values():
            if m.name == name and m.addr != addr:
                raise BadRequest(
                    f"config conflict: the name {name!r} belongs to {m.addr} in the ring; "
                    f"{addr} must use another --name"
                )


def ring_from_statuses(
    mine: Config, seeds: Sequence[str], statuses: Mapping[str, Mapping[str, Any]]
) -> Ring:
    """The epoch-1 ring of the seeds, from every seed's STATUS answer (``mine`` for this node).

    :raises ConfigError: a seed with another N, two seeds with one name, N > seeds.
    """
    members = []
    by_name: dict[str, str] = {}
    for addr in seeds:
        st = statuses[addr]
        if st.get("n") != mine.n:
            raise ConfigError(
                f"config conflict: seed {addr} ({st.get('name')}) runs with N={st.get('n')}, "
                f"this node ({mine.name}) with N={mine.n}"
            )
        name = st.get("name")
        if not isinstance(name, str):
            raise ConfigError(f"seed {addr} answered STATUS without a name")
        if name in by_name:
            raise ConfigError(
                f"config conflict: seeds {by_name[name]} and {addr} both call themselves {name!r}; "
                "give each node its own --name"
            )
        if st.get("n_per_dc") != mine.n_per_dc:
            raise ConfigError(
                f"config conflict: seed {addr} ({name}) runs with --n-per-dc {_map(st.get('n_per_dc'))}, "
                f"this node ({mine.name}) with {_map(mine.n_per_dc)}"
            )
        by_name[name] = addr
        dc = st.get("dc")
        members.append(Member(name, addr, float(st.get("weight", 1.0)), dc if isinstance(dc, str) else None))
    ring = Ring(members, STATIC_EPOCH)
    # The map's checks (a DC with no nodes, more replicas than a DC has) refuse the start here.
    ring.with_replication(mine.n_per_dc).check_n(mine.n)
    return ring


def _map(m: Any) -> str:
    return ",".join(f"{dc}:{c}" for dc, c in sorted(m.items())) if isinstance(m, dict) and m else "none"


def check_defaults(mine: Config, defaults: Mapping[str, Any]) -> None:
    """This node places keys as the cluster does: the same N and the same replication map as
    ``defaults`` (a node's RING answer). ``--n-per-dc`` is every node's flag, not part of any
    replicated configuration, so a starting or joining node checks it here.

    :raises ConfigError: naming both values.
    """
    if defaults.get("n") != mine.n:
        raise ConfigError(
            f"config conflict: the cluster runs with N={defaults.get('n')}, this node was started "
            f"with N={mine.n}"
        )
    if defaults.get("n_per_dc") != mine.n_per_dc:
        raise ConfigError(
            f"config conflict: the cluster runs with --n-per-dc {_map(defaults.get('n_per_dc'))}, "
            f"this node was started with {_map(mine.n_per_dc)}"
        )


def check_ring(mine: Config, ring: Ring, seeds: Sequence[str], defaults: Mapping[str, Any]) -> Ring:
    """Adopt a running cluster's ring after checking it agrees with this node's flags.

    :raises ConfigError: another N, this node missing or different in the ring, other seeds.
    """
    check_defaults(mine, defaults)
    me = ring.members.get(mine.name)
    if me is None or me.addr != mine.addr:
        raise ConfigError(
            f"config conflict: the running cluster's ring has "
            f"{'no member ' + repr(mine.name) if me is None else repr(mine.name) + ' at ' + me.addr}, "
            f"this node is {mine.name!r} at {mine.addr} (membership is static in this version: "
            "restart every node with the same --seeds to change it)"
        )
    if me.weight != float(mine.weight):
        raise ConfigError(
            f"config conflict: {mine.name} has weight {me.weight:g} in the running cluster's ring, "
            f"this node was started with --weight {mine.weight:g}"
        )
    if me.dc != mine.dc:
        raise ConfigError(
            f"config conflict: {mine.name} is in data centre {me.dc!r} in the running cluster's ring, "
            f"this node was started with --dc {mine.dc!r}"
        )
    if sorted(m.addr for m in ring.members.values()) != sorted(seeds):
        raise ConfigError(
            f"config conflict: the running cluster's members are "
            f"{sorted(m.addr for m in ring.members.values())}, --seeds lists {sorted(seeds)}"
        )
    return ring


async def join_static(
    mine: Config, seeds: Sequence[str], transport: Transport, deadline: float, poll: float = 0.2
) -> Ring:
    """Learn the ring: adopt a running seed's, or build it once every seed answered STATUS.

    :param deadline: the event loop's ``time()`` by which every seed must have answered.
    :raises ConfigError: a conflict (see the module docstring), or seeds still silent at the
        deadline (named).
    """
    if mine.addr not in seeds:
        raise ConfigError(
            f"--listen {mine.addr} is not in --seeds {','.join(seeds)}: membership is static, "
            "every node must be one of the seeds (spelled the same way)"
        )
    loop = asyncio.get_running_loop()
    statuses: dict[str, Mapping[str, Any]] = {}
    ask = Message(wire.STATUS, 0, mine.to_wire())
    while True:
        for addr in seeds:
            if addr == mine.addr or addr in statuses:
                continue
            try:
                reply = await transport.request(addr, ask, 1.0)
            except BadRequest as e:  # the peer refused us: a conflict it named
                raise ConfigError(f"seed {addr} refused this node: {e}") from None
            except (ClusterError, OSError):
                continue  # not up yet
            st = dict(reply.fields.get("status") or {})
            if st.get("ready") and isinstance(st.get("ring"), dict):
                try:
                    ring = Ring.from_wire(st["ring"])
                except ProtocolError as e:
                    raise ConfigError(f"seed {addr} sent a bad ring: {e}") from None
                return check_ring(mine, ring, seeds, st)
            statuses[addr] = st
        statuses[mine.addr] = mine.to_wire()
        if len(statuses) == len(set(seeds)):
            return ring_from_statuses(mine, list(dict.fromkeys(seeds)), statuses)
        if loop.time() >= deadline:
            silent = [a for a in seeds if a not in statuses]
            raise ConfigError(
                f"seeds {', '.join(silent)} did not answer before the join timeout: "
                "start every node of the seed list (membership is static in this version)"
            )
        await asyncio.sleep(poll)


__all__ = ["join_static", "ring_from_statuses", "check_ring", "check_peer", "STATIC_EPOCH"]
