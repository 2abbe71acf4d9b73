"""Load-aware balance (``shmkv serve --auto-balance``): when to re-weight which node. Pure.

Inputs: load samples per node (``observe``: the leader's clock, the node's store-op counter and
its stored bytes), and at each ``decide(now, epoch, weights, base)`` the committed ring's
weights and each member's *configured* weight (the one an operator gave it; cluster_config.py
keeps it as ``base`` while auto-balance has moved the ring weight away from it). Output: one
:class:`Change` (a node and its new weight) or None. No clock, no I/O: autobalance.py feeds it
on the configuration leader and commits what it returns as a normal ``weight`` command.

What load is. ``metric="ops"`` (the default): operations per second on the node's local store
(gets + puts + deletes, the store's shared counters: every worker's replica work, zero-hop
readers on the host, streaming). ``"bytes"``: the bytes its items take in memory. A node's
*relative load* is its load per unit of configured weight over the cluster's::

    r_i = (L_i / base_i) / (sum_j L_j / sum_j base_j)        1.0: exactly its fair share

and the imbalance is ``max_i |ln r_i|`` (symmetric: twice the share and half of it are
equally far from balance).

When a change is made -- every condition at once:

1. every member's data is fresh (a sample within ``stale`` s, no counter reset inside the
   window) and covers the window; otherwise nothing is judged at all: a node that is down or
   silent pushes its load onto the others (hinted fallbacks), and re-weighting on that picture
   would be wrong twice over. So a node with stale or missing data is never re-weighted, and
   neither is anyone else while it is;
2. the loads are not idle (``sum L >= min_load``);
3. *hysteresis*: the short-term imbalance (over the last quarter of the window, or ``stale``
   s if that is longer) crossed
   ``ln(1 + threshold)`` and has not since fallen below ``ln(1 + threshold / 2)``, for at least
   ``window`` s (a Schmitt trigger: noise around the threshold neither starts nor keeps it);
4. the imbalance averaged over the whole window is also beyond ``ln(1 + threshold)``;
5. ``cooldown`` s have passed since the last change this policy made (or since it was created:
   a new leader waits too), and the window started after the ring's epoch last changed --
   loads measured under another ring say nothing about this one;
6. the node chosen is the one furthest from its share (``|ln r|``, over the window) that can
   still move: a hot node's weight is divided by ``1 + step``, a cold one's multiplied,
   clamped to ``[low, high] x base``; a node already at its bound is passed over for the next;
   a candidate must itself be outside the release band (``|ln r| > ln(1 + threshold/2)``);
7. *no reversal*: a node is not moved against the direction of its previous move within
   ``REVERSE_AFTER`` cooldowns of it.

So at most one change per cooldown, each a small step in a direction that lowers the
imbalance; ``step <= threshold`` keeps a step from carrying a node from hot past its share to
cold (Settings.check). Under a stationary load the weights move monotonically toward balance
and then stop (tests/cluster/test_balance.py checks this over random loads with hypothesis).
What re-weighting cannot do: split a single hot key -- it moves whole vnode ranges, so a node
whose load is one key drifts to its bound and stays there.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

#: a node's move against its previous direction waits this many cooldowns after that move
REVERSE_AFTER = 3
#: the share of the window the short-term (hysteresis) view looks at
SHORT = 0.25
#: the part of a span that a node's samples must cover to count (samples are discrete)
COVER = 0.75
#: weights are rounded to this (the ring's vnodes are 1/2048 of weight 1; finer is noise)
QUANTUM = 0.001
METRICS = ("ops", "bytes")


@dataclass(frozen=True)
class Settings:
    threshold: float = 0.25  # uneven: some node's load is > 1.25x or < 1/1.25 of its share
    window: float = 60.0  # seconds the imbalance must last (and the span loads average over)
    cooldown: float = 120.0  # seconds between two changes
    step: float = 0.1  # one change multiplies or divides a weight by 1 + step
    low: float = 0.5  # bounds, as factors of the configured weight
    high: float = 2.0
    stale: float = 5.0  # a node's newest sample older than this: its data is stale
    min_load: float = 50.0  # ops/s (or bytes) over all nodes below which nothing is judged
    metric: str = "ops"

    def check(self) -> None:
        """:raises ConfigError: settings that cannot work, named."""
        if not 0 < self.threshold <= 4:
            raise ConfigError(f"--balance-threshold must be in (0, 4], got {self.threshold}")
        if not 0 < self.step <= self.threshold:
            raise ConfigError(f"the balance step ({self.step}) must be in (0, threshold={self.threshold}]: "
                              "a larger step can carry a node from hot past its share to cold")
        if not 0 < self.low <= 1 <= self.high:
            raise ConfigError(f"--balance-bounds must be LOW:HIGH with 0 < LOW <= 1 <= HIGH, "
                              f"got {self.low:g}:{self.high:g}")
        if not self.window > 0 or not self.cooldown >= self.window:
            raise ConfigError(f"--balance-cooldown ({self.cooldown:g} s) must be >= --balance-window "
                              f"({self.window:g} s) > 0: each change must be judged on a full window")
        if not self.stale > 0 or not self.min_load >= 0:
            raise ConfigError(f"stale ({self.stale}) must be > 0 and min_load ({self.min_load}) >= 0")
        if self.metric not in METRICS:
            raise ConfigError(f"--balance-metric must be one of {', '.join(METRICS)}, got {self.metric!r}")


@dataclass(frozen=True)
class Sample:
    t: float  # the observer's clock when the sample was taken
    ops: int  # the node's store operations so far (a counter: only grows, unless it restarted)
    bytes: int  # bytes its items take now


@dataclass(frozen=True)
class Change:
    name: str
    old: float
    weight: float
    load: float  # the node's relative load over the window (1.0: its fair share)

    def command(self, epoch: int) -> dict[str, Any]:
        """The configuration command (cluster_config.py): ``auto`` keeps the configured weight,
        ``epoch`` makes it refused if any other change committed since it was computed."""
        return {"op": "weight", "name": self.name, "weight": self.weight, "auto": True, "epoch": epoch}


@dataclass
class Balance:
    """The policy's memory on one leader (a new leader starts a new one: it knows nothing of
    the loads yet and waits a full window and a cooldown before any change)."""

    settings: Settings
    created: float
    samples: dict[str, deque[Sample]] = field(default_factory=dict)
    epoch: int | None = None
    since: float = 0.0  # only samples from here on count (the epoch's, or the policy's, start)
    uneven_since: float | None = None
    last_change: float = 0.0
    moves: dict[str, tuple[int, float]] = field(default_factory=dict)  # node -> (direction, when)
    adjustments: int = 0
    last: Change | None = None
    #: the last judgement, for status: node -> relative load over the window, and why not
    loads: dict[str, float] = field(default_factory=dict)
    waiting: str = "starting"

    def __post_init__(self) -> None:
        self.settings.check()
        self.since = self.created
        self.last_change = self.created

    # -- inputs ----------------------------------------------------------------------------

    def observe(self, name: str, sample: Sample) -> None:
        """A node's sample. A counter that went back (the node restarted with a fresh store)
        starts that node's history again."""
        q = self.samples.setdefault(name, deque())
        if q and (sample.ops < q[-1].ops or sample.t < q[-1].t):
            q.clear()
        q.append(sample)
        horizon = sample.t - 2 * self.settings.window
        while len(q) > 2 and q[1].t <= horizon:
            q.popleft()

    def committed(self, now: float, change: Change) -> None:
        """``change`` (returned by :meth:`decide`) is committed."""
        self.last_change = now
        self.moves[change.name] = (-1 if change.weight < change.old else 1, now)
        self.adjustments += 1
        self.last = change
        self.uneven_since = None

    def failed(self, now: float) -> None:
        """The change returned by :meth:`decide` was not committed: try again after a cooldown."""
        self.last_change = now
        self.uneven_since = None

    # -- the decision ------------------------------------------------------------------------

    def relative(self, now: float, span: float, names: Mapping[str, float]) -> dict[str, float] | None:
        """Each member's relative load over the last ``span`` s (``names``: member -> configured
        weight); None when any member's data is stale, missing or short, or the load is idle."""
        s = self.settings
        start = now - span
        per_weight: dict[str, float] = {}
        total = 0.0
        for name, base in names.items():
            got = [x for x in self.samples.get(name, ()) if self.since <= x.t <= now]
            # from the last sample at or before the span's start (samples are discrete: the span
            # is then covered whole), or the first one if there is none before it
            first = max((i for i, x in enumerate(got) if x.t <= start), default=0)
            got = got[first:]
            if not got or now - got[-1].t > s.stale:
                self.waiting = f"no fresh load data from {name}"
                return None
            if got[-1].t - got[0].t < COVER * span:
                self.waiting = f"collecting a window of load data ({name})"
                return None
            if s.metric == "ops":
                load = (got[-1].ops - got[0].ops) / (got[-1].t - got[0].t)
            else:
                load = sum(x.bytes for x in got) / len(got)
            total += load
            per_weight[name] = load / base
        if len(per_weight) < 2 or total < s.min_load:
            self.waiting = "idle" if per_weight else "no members"
            return None
        fair = total / sum(names.values())
        return {n: max(v / fair, 1e-6) for n, v in per_weight.items()}

    def decide(self, now: float, epoch: int, weights: Mapping[str, float],
               base: Mapping[str, float]) -> Change | None:
        """The change to make now, or None (see the module docstring for when).
        ``weights``: the committed ring's, at ``epoch``; ``base``: configured weights of the
        members auto-balance moved (the rest: their ring weight)."""
        s = self.settings
        if epoch != self.epoch:
            if self.epoch is not None:  # the ring changed: its loads are measured afresh
                self.since = now
                self.uneven_since = None
            self.epoch = epoch
        configured = {n: float(base.get(n, w)) for n, w in weights.items()}
        trigger, release = math.log1p(s.threshold), math.log1p(s.threshold / 2)
        # at least ``stale`` s: a short view of one sample interval would be no view at all
        short = self.relative(now, min(s.window, max(SHORT * s.window, s.stale)), configured)
        if short is None:
            self.uneven_since = None
            return None
        dev = max(abs(math.log(r)) for r in short.values())
        if self.uneven_since is None and dev > trigger:
            self.uneven_since = now
        elif self.uneven_since is not None and dev < release:
            self.uneven_since = None
        whole = self.relative(now, s.window, configured)
        if whole is None:
            return None
        self.loads = whole
        if self.uneven_since is None or now - self.uneven_since < s.window:
            self.waiting = "balanced" if self.uneven_since is None else "uneven, waiting out the window"
            return None
        if max(abs(math.log(r)) for r in whole.values()) <= trigger:
            self.waiting = "balanced over the window"
            return None
        if now - self.last_change < s.cooldown:
            self.waiting = "cooling down"
            return None
        # furthest from its share first. Rejected: the hot before the cold -- it pushes load onto
        # nodes near their share until they turn hot and must later come back (non-monotone)
        for name in sorted(whole, key=lambda n: (-abs(math.log(whole[n])), n)):
            r = whole[name]
            if abs(math.log(r)) <= release:
                continue
            direction = -1 if r > 1 else 1
            prev = self.moves.get(name)
            if prev is not None and prev[0] != direction and now - prev[1] < REVERSE_AFTER * s.cooldown:
                continue
            w = float(weights[name])
            b = configured[name]
            new = w / (1 + s.step) if direction < 0 else w * (1 + s.step)
            new = min(max(new, s.low * b), s.high * b)
            new = round(new / QUANTUM) * QUANTUM
            new = float(f"{new:.6g}")
            if abs(new - w) < QUANTUM / 2 or (new - w) * direction < 0:
                continue  # at its bound (or beyond it: never moved the wrong way)
            self.waiting = "changing"
            return Change(name, w, new, r)
        self.waiting = "uneven, but every node that could help is at its bound"
        return None

    def status(self) -> dict[str, Any]:
        last = self.last
        return {
            "adjustments": self.adjustments,
            "state": self.waiting,
            "loads": {n: round(v, 3) for n, v in sorted(self.loads.items())},
            "last": None if last is None else {"name": last.name, "from": last.old, "to": last.weight,
                                               "load": round(last.load, 3)},
        }


__all__ = ["Settings", "Sample", "Change", "Balance", "METRICS", "QUANTUM", "REVERSE_AFTER"]
