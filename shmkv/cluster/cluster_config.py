"""The configuration the Raft group replicates: the ring, the cluster defaults, the epoch (pure).

A :class:`ClusterConfig` is the state machine of config_service.py's Raft group. Its value is
one ring (members with name, address, weight and data centre; the ring's vnodes follow from
them, ring.py) plus the cluster defaults N/W/R. The ring's epoch is the configuration's
epoch: every command that changes anything raises it by exactly one, so two nodes that agree
on the epoch agree on the whole configuration (they applied the same log prefix).

Commands are the NORMAL entries of the Raft log, msgpack maps:

    {"op": "bootstrap", "ring": Ring.to_wire(), "n", "w", "r"}   the static ring of --seeds
    {"op": "add", "name", "addr", "weight", "dc"}
    {"op": "remove", "name"}
    {"op": "weight", "name", "weight"}
    {"op": "weight", "name", "weight", "auto": True, "epoch"}   auto-balance's (balance.py)
    {"op": "streamed", "name", "move"}   NAME finished pushing the copies of move MOVE
    {"op": "streamed", "force": True, "move"}   the operator ends move MOVE (cluster finish-move)

Moves (pending ranges, Cassandra's word). A bootstrap with ``"moves": True`` (the built-in
group's) makes every ring change -- add, remove, weight -- start a *move*: the configuration
keeps the ring before the change (``moving.ring``) and the names of the old owners still in the
ring (``moving.waiting``) until each has reported with ``streamed`` that it pushed every copy
whose preference list gained members (rebalance.py); the last report ends the move. While a move
is on, coordinators read a moving key from R of its old AND R of its new owners and write it
to W of the old AND W of the new (coordinator.py), so a read never depends on new owners that
have not caught up; and
no other ring change is accepted ("a configuration change is in progress"). Each report raises
the epoch like any command (the ring's members do not change), so nodes that agree on the epoch
agree on the move too. Why the removed node is not waited for: one removal at a time, with
W >= 2 every write acknowledged before it is also on a remaining old owner of its key, which
pushes it (the removed node pushes too, best effort); with W = 1 it is waited for like the rest. Without ``moves`` (a log written before
this) changes apply at once as before. etcd_config.py keeps the same configuration, moves and
all, in an etcd key: it runs this module's :func:`apply` and commits the result by
compare-and-swap.

An ``auto`` weight change moves the ring weight but keeps the member's *configured* weight
(``base``: only the members whose ring weight auto-balance moved are listed; for the rest it is
their ring weight), which auto-balance's bounds are relative to; an operator's weight change
(or add) sets the configured weight and ends any automatic adjustment of it. Any command may
carry ``epoch``: it is then refused unless the configuration is still at that epoch (a change
computed from one configuration is not applied to another).

:func:`apply` is deterministic and total: a command that does not fit the state it meets (an
add of a name already there, a remove that leaves fewer than N members, a second bootstrap) is
*refused* -- the state is unchanged and the reason is returned -- rather than raising, because
every node applies the same log and must reach the same state whatever the log holds. The
leader runs the same check (:func:`check`) before proposing, so users get the error at once.

Invariants: ``epoch`` only grows; ``N <= len(members)``; names and addresses are unique.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import ConfigError, ProtocolError
from .levels import LEVELS, Level
from .ring import RING_FORMAT, Member, Ring

# DO NOT CHANGE: stored layout (commands are Raft log entries). Add ops; never change one.
OPS = ("bootstrap", "add", "remove", "weight", "streamed")
RING_OPS = ("add", "remove", "weight")

_RINGS: dict[tuple[Any, ...], Ring] = {}


def _ring(members: tuple[Member, ...], epoch: int, vnodes_per_weight: int) -> Ring:
    """Rings are immutable and cost milliseconds to build (their vnodes); the same
    configuration arrives many times (pulls, pushes, every voter's apply), so a few are kept."""
    key = (members, epoch, vnodes_per_weight)
    ring = _RINGS.get(key)
    if ring is None:
        ring = Ring(members, epoch, vnodes_per_weight)
        if len(_RINGS) >= 8:
            _RINGS.pop(next(iter(_RINGS)))
        _RINGS[key] = ring
    return ring


def ring_from_wire(d: Any) -> Ring:
    """Ring.from_wire, through the cache. :raises ProtocolError: as Ring.from_wire."""
    try:
        if d["format"] != RING_FORMAT or not all(isinstance(m, list) and len(m) == 4 for m in d["members"]):
            return Ring.from_wire(d)  # refuses it, naming the problem
        members = tuple(Member(*m) for m in d["members"])
        return _ring(members, d["epoch"], d["vnodes_per_weight"])
    except (KeyError, TypeError, ConfigError):
        return Ring.from_wire(d)  # refuses it, naming the problem


@dataclass(frozen=True)
class Move:
    """A ring change whose copies are still being pushed (module docstring, "Moves")."""

    epoch: int  # the epoch at which the ring changed: the move's name
    ring: Ring  # the ring before the change (the old owners)
    waiting: frozenset[str]  # old owners that have not reported ``streamed`` yet

    def to_wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "ring": self.ring.to_wire(), "waiting": sorted(self.waiting)}

    def view(self) -> dict[str, Any]:
        """What ``cluster status`` shows of it (``config.moving``), with either service."""
        return {"epoch": self.epoch, "from_epoch": self.ring.epoch, "waiting": sorted(self.waiting)}

    @staticmethod
    def from_wire(d: Any) -> Move:
        if not isinstance(d, Mapping) or type(d.get("epoch")) is not int or not isinstance(d.get("waiting"), list):
            raise ProtocolError(f"a move must be a map with epoch, ring, waiting: {d!r}")
        return Move(d["epoch"], ring_from_wire(d["ring"]), frozenset(str(x) for x in d["waiting"]))


@dataclass(frozen=True)
class ClusterConfig:
    ring: Ring
    n: int
    #: the cluster's default W and R: a count, or a consistency level's name (levels.py)
    w: Level
    r: Level
    #: configured weights of the members auto-balance re-weighted (module docstring)
    base: Mapping[str, float] = field(default_factory=dict)
    #: ring changes start moves (module docstring); set by the bootstrap, kept forever
    moves: bool = False
    moving: Move | None = None

    @property
    def epoch(self) -> int:
        return self.ring.epoch

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ring": self.ring.to_wire(), "n": self.n, "w": self.w, "r": self.r}
        if self.base:  # absent when empty: the form before auto-balance, still read as is
            out["base"] = dict(self.base)
        if self.moves:
            out["moves"] = True
        if self.moving is not None:
            out["moving"] = self.moving.to_wire()
        return out

    def configured_weight(self, name: str) -> float:
        return float(self.base.get(name, self.ring.members[name].weight))

    @staticmethod
    def from_wire(d: Any) -> ClusterConfig:
        """:raises ProtocolError: not a description of a configuration."""
        if not isinstance(d, Mapping) or not {"ring", "n", "w", "r"} <= set(d):
            raise ProtocolError("cluster configuration must be a map with ring, n, w, r")
        if not (type(d["n"]) is int and d["n"] > 0 and _level_ok(d["w"]) and _level_ok(d["r"])):
            raise ProtocolError(f"cluster defaults: N must be an int > 0, W and R ints > 0 or one of "
                                f"{', '.join(LEVELS)}: {d['n']!r} {d['w']!r} {d['r']!r}")
        base = d.get("base") or {}
        if not isinstance(base, Mapping) or not all(
            isinstance(k, str) and type(v) in (int, float) and v > 0 for k, v in base.items()
        ):
            raise ProtocolError(f"configured weights must map names to numbers > 0: {base!r}")
        ring = Ring.from_wire(d["ring"]) if not isinstance(d["ring"], Mapping) else ring_from_wire(d["ring"])
        moving = Move.from_wire(d["moving"]) if d.get("moving") is not None else None
        return ClusterConfig(ring, d["n"], d["w"], d["r"], {k: float(v) for k, v in base.items()},
                             bool(d.get("moves")), moving)

    def encode(self) -> bytes:
        return bytes(msgpack.packb(self.to_wire(), use_bin_type=True))

    @staticmethod
    def decode(data: bytes) -> ClusterConfig | None:
        if not data:
            return None
        return ClusterConfig.from_wire(msgpack.unpackb(data, raw=False))


def encode_command(cmd: Mapping[str, Any]) -> bytes:
    return bytes(msgpack.packb(dict(cmd), use_bin_type=True))


def decode_command(data: bytes) -> dict[str, Any]:
    """:raises ProtocolError: not a command map (an empty entry -- a leader's term-start entry
    -- is not a command; the caller skips those)."""
    try:
        cmd = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise ProtocolError(f"bad configuration command: {e}") from None
    if not isinstance(cmd, dict) or cmd.get("op") not in OPS:
        raise ProtocolError(f"bad configuration command {cmd!r}")
    return cmd


def _level_ok(v: object) -> bool:
    return (type(v) is int and v > 0) or (type(v) is str and v in LEVELS)


def _acks_alone(w: Level, n: int) -> bool:
    """Whether a write at the default ``w`` may be acknowledged by one replica alone. A level is
    judged without the key (its DCs decide ``local_quorum``'s count): anything but ``all`` is
    taken to be able to -- the safe side, a removed node then reports its push as well."""
    if isinstance(w, int):
        return w < 2
    return w != "all" or n < 2


def bootstrap_command(ring: Ring, n: int, w: Level, r: Level, *, moves: bool = False) -> dict[str, Any]:
    cmd: dict[str, Any] = {"op": "bootstrap", "ring": ring.to_wire(), "n": n, "w": w, "r": r}
    if moves:
        cmd["moves"] = True
    return cmd


def _check_streamed(state: ClusterConfig, cmd: Mapping[str, Any]) -> str | None:
    mv = state.moving
    if mv is None:
        return "streamed: no data is moving"
    if cmd.get("move") != mv.epoch:
        return f"streamed: move {cmd.get('move')!r} is over (the move now is of epoch {mv.epoch})"
    if cmd.get("force"):
        return None
    if cmd.get("name") not in mv.waiting:
        return f"streamed: {cmd.get('name')!r} is not among the owners the move waits for"
    return None


def check(state: ClusterConfig | None, cmd: Mapping[str, Any]) -> str | None:
    """Why ``cmd`` cannot apply to ``state`` (None: it can). Pure; see the module docstring."""
    op = cmd.get("op")
    if op == "bootstrap":
        return "the cluster configuration is already set" if state is not None else None
    if state is None:
        return f"{op}: the cluster configuration is not set yet (no bootstrap committed)"
    epoch = cmd.get("epoch")
    if epoch is not None and epoch != state.epoch:
        return f"{op}: computed at epoch {epoch!r}, the configuration is at epoch {state.epoch} now"
    if op == "streamed":
        return _check_streamed(state, cmd)
    why = _check_member(state, cmd)
    if why is None and op in RING_OPS and state.moving is not None:
        mv = state.moving
        return (f"a configuration change is in progress: data is moving since epoch {mv.epoch}, waiting "
                f"for {', '.join(sorted(mv.waiting))} to finish streaming (see `shmkv cluster status`)")
    return why


def _check_member(state: ClusterConfig, cmd: Mapping[str, Any]) -> str | None:
    op = cmd.get("op")
    members = state.ring.members
    name = cmd.get("name")
    if not isinstance(name, str) or not name:
        return f"{op}: a node name is needed"
    if op == "add":
        addr = cmd.get("addr")
        if name in members:
            return f"cannot add {name}: it is already a member (at {members[name].addr})"
        for m in members.values():
            if m.addr == addr:
                return f"cannot add {name} at {addr}: {m.name} is already there"
        try:
            Member(name, addr, float(cmd.get("weight", 1.0)), cmd.get("dc"))  # type: ignore[arg-type]
        except (ConfigError, TypeError, ValueError) as e:
            return f"cannot add {name}: {e}"
        return None
    if name not in members:
        return f"cannot {op} {name}: it is not a member (members: {', '.join(sorted(members))})"
    if op == "remove":
        if len(members) - 1 < state.n:
            return (
                f"cannot remove {name}: {len(members) - 1} members would be left, fewer than "
                f"N={state.n} replicas"
            )
        return None
    if op == "weight":
        weight = cmd.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            return f"cannot re-weight {name}: weight must be > 0, got {weight!r}"
        # an operator's weight equal to an auto-balanced ring weight still sets it as configured
        if float(weight) == members[name].weight and (cmd.get("auto") or name not in state.base):
            return f"{name} already has weight {float(weight):g}"
        return None
    return f"unknown configuration command {op!r}"


def apply(state: ClusterConfig | None, cmd: Mapping[str, Any]) -> tuple[ClusterConfig | None, str | None]:
    """The state after ``cmd``, and None; or ``state`` unchanged and why ``cmd`` was refused."""
    why = check(state, cmd)
    if why is not None:
        return state, why
    op = cmd["op"]
    if op == "bootstrap":
        try:
            if not (type(cmd["n"]) is int and cmd["n"] > 0 and _level_ok(cmd["w"]) and _level_ok(cmd["r"])):
                return state, f"bad bootstrap: defaults N={cmd['n']!r} W={cmd['w']!r} R={cmd['r']!r}"
            return ClusterConfig(ring_from_wire(cmd["ring"]), cmd["n"], cmd["w"], cmd["r"],
                                 moves=bool(cmd.get("moves"))), None
        except (ProtocolError, KeyError) as e:
            return state, f"bad bootstrap: {e}"
    assert state is not None
    if op == "streamed":
        mv = state.moving
        assert mv is not None
        waiting = frozenset() if cmd.get("force") else mv.waiting - {cmd["name"]}
        ring = _ring(tuple(state.ring.members.values()), state.epoch + 1, state.ring.vnodes_per_weight)
        moving = Move(mv.epoch, mv.ring, waiting) if waiting else None
        return ClusterConfig(ring, state.n, state.w, state.r, state.base, state.moves, moving), None
    members = dict(state.ring.members)
    base = dict(state.base)
    name = cmd["name"]
    if op == "add":
        members[name] = Member(name, cmd["addr"], float(cmd.get("weight", 1.0)), cmd.get("dc"))
        base.pop(name, None)
    elif op == "remove":
        del members[name]
        base.pop(name, None)
    else:
        old = members[name]
        members[name] = Member(name, old.addr, float(cmd["weight"]), old.dc)
        if cmd.get("auto"):
            base.setdefault(name, old.weight)
            if base[name] == members[name].weight:
                del base[name]  # back at its configured weight
        else:
            base.pop(name, None)
    ring = _ring(tuple(members.values()), state.epoch + 1, state.ring.vnodes_per_weight)
    moving = None
    if state.moves:  # the old owners still in the ring must report their pushes (docstring)
        # with W=1 a write may be on the removed node alone: then it must report too
        waiting = frozenset(m for m in state.ring.members if m in members or _acks_alone(state.w, state.n))
        moving = Move(ring.epoch, state.ring, waiting)
    return ClusterConfig(ring, state.n, state.w, state.r, base, state.moves, moving), None


__all__ = [
    "ClusterConfig",
    "Move",
    "apply",
    "check",
    "bootstrap_command",
    "encode_command",
    "decode_command",
    "OPS",
]
