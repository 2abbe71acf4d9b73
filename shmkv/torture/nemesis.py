"""The nemesis: a seeded schedule of faults, and the thread that applies it to a cluster.

The schedule is a pure function of (seed, duration, kinds, nodes): the same seed names the same
faults at the same offsets on the same nodes, so a failing run's faults can be replayed (the
cluster's own timing is not deterministic on real processes; the deterministic simulation is
what replays bit for bit). Faults come one at a time, with a quiet gap between, and every fault
is healed before the run ends, so the final states are taken from a whole cluster.

Kinds: ``kill`` (SIGKILL, restart when the fault ends), ``pause`` (SIGSTOP, SIGCONT when it
ends), ``partition`` (halves, a bridge or one-way, around the fault's node; the shape is drawn
from the fault, so it replays too), ``loss`` (random loss to and from the node), ``skew`` (the
node's wall clock jumps ahead), ``delay`` (slow messages), ``hold`` (messages to and from the
node held back until the fault ends, then delivered), ``reset`` (the node's connections
reset, new ones too while the fault lasts), ``crash`` (a host crash: the node loses what it had
not synced; simulation only), ``scale`` (one more node joins the ring, and is removed from it when
the fault ends -- live scaling through the configuration group; real daemons only: the fault's
``node`` is a founding node the schedule drew, replaced in the log by the added node's name).
Which a cluster can inject is its business (local.py: nftables
and a proxy in a private network namespace, libfaketime; simulate.py: the simulated network); one it cannot is refused, with the reason, before the run starts -- never
silently skipped.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument
from .cluster import ClusterUnderTest

KINDS = ("kill", "pause", "partition", "loss", "skew", "delay", "hold", "reset", "crash", "scale")
SHAPES = ("halves", "bridge", "one-way-out", "one-way-in")


def shape_of(f: Fault) -> str:
    """A partition fault's shape: a function of the fault, so a seed replays it."""
    return random.Random(f"{f.at}/{f.node}/{f.duration}").choice(SHAPES)


@dataclass(frozen=True)
class Fault:
    """``kind`` on ``node`` from ``at`` seconds after the run began, for ``duration`` seconds."""

    at: float
    kind: str
    node: str
    duration: float


def parse_kinds(spec: str | Sequence[str]) -> list[str]:
    """``"kill,pause"`` -> ["kill", "pause"]; ``"none"`` or empty -> [].

    :raises InvalidArgument: an unknown kind (named)."""
    kinds = [k.strip() for k in (spec.split(",") if isinstance(spec, str) else spec) if k.strip()]
    kinds = [k for k in kinds if k != "none"]
    for k in kinds:
        if k not in KINDS:
            raise InvalidArgument(f"unknown nemesis {k!r}: expected some of {', '.join(KINDS)}")
    return kinds


def schedule(
    seed: int,
    duration: float,
    kinds: Sequence[str],
    nodes: Sequence[str],
    *,
    gap: tuple[float, float] = (0.3, 1.5),
    length: tuple[float, float] = (0.3, 1.5),
    quiet_end: float = 0.5,
) -> list[Fault]:
    """Faults for a run of ``duration`` s: quiet ``gap`` s, a fault of ``length`` s, ...; none
    starts within ``quiet_end`` s of the end (the cluster heals and the final reads run)."""
    if not kinds or not nodes:
        return []
    rng = random.Random(seed)
    out: list[Fault] = []
    t = rng.uniform(*gap)
    while True:
        d = rng.uniform(*length)
        if t + d > duration - quiet_end:
            return out
        out.append(Fault(round(t, 3), rng.choice(list(kinds)), rng.choice(list(nodes)), round(d, 3)))
        t += d + rng.uniform(*gap)


class Nemesis(threading.Thread):
    """Applies a schedule to ``cluster`` from ``t0`` (``time.monotonic()``); ``log`` gets one
    dict per fault: kind, node, t0 (applied) and t1 (healed), in seconds since ``t0``."""

    def __init__(self, cluster: ClusterUnderTest, faults: list[Fault], t0: float) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.cluster = cluster
        self.faults = faults
        self.t0 = t0
        self.log: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _apply(self, f: Fault, entry: dict[str, Any]) -> None:
        c: Any = self.cluster
        if f.kind == "partition":
            entry["shape"] = shape_of(f)
            c.partition(f.node, entry["shape"])
            return
        if f.kind == "scale":  # entry["node"] becomes the added node (the heal removes it)
            entry.update(c.scale_out())
            return
        # a dict returned (the fault's parameters, e.g. a delay's) goes into the fault's entry
        got = getattr(c, {"kill": "kill", "pause": "pause", "loss": "loss", "skew": "skew",
                          "delay": "delay", "hold": "hold", "reset": "reset"}[f.kind])(f.node)
        if isinstance(got, dict):
            entry.update(got)

    def _heal(self, f: Fault, entry: dict[str, Any]) -> None:
        c: Any = self.cluster
        if f.kind == "scale":
            entry.update(c.scale_in(entry["node"]))
            return
        if f.kind in ("partition", "loss"):
            c.heal_network()
            return
        if f.kind in ("delay", "hold", "reset"):
            c.heal_proxy(f.node)
            return
        getattr(c, {"kill": "restart", "pause": "resume", "skew": "unskew"}[f.kind])(f.node)

    def run(self) -> None:
        for f in self.faults:
            if self._halt.wait(max(0.0, f.at - self._now())):
                return
            entry: dict[str, Any] = {"kind": f.kind, "node": f.node, "t0": round(self._now(), 6)}
            self.log.append(entry)
            try:
                self._apply(f, entry)
            except Exception as e:  # a fault that could not be applied is reported, not fatal
                self.errors.append(f"{f.kind} {f.node}: {e}")
                entry["t1"] = entry["t0"]
                continue
            # Heal even when stopped early: the run's final states come from a whole cluster.
            self._halt.wait(f.duration)
            try:
                self._heal(f, entry)
            except Exception as e:
                self.errors.append(f"healing {f.kind} {f.node}: {e}")
            entry["t1"] = round(self._now(), 6)
            if self._halt.is_set():
                return
