"""The phi-accrual failure detector (pure: heartbeat arrivals and ``now`` in, phi out).

Hayashibara et al., "The phi accrual failure detector" (2004), in the form Akka and Cassandra
use. For each peer the detector keeps a window of the intervals between the arrivals of that
peer's heartbeats (here: the moments this node learnt that the peer's gossip heartbeat counter
advanced, directly or through another node). From the window's mean and standard deviation it
computes, at time ``now``,

    phi(now) = -log10( P(the next heartbeat comes later than now - last_arrival) )

under a normal distribution of the intervals. phi = 1 means a 10 % chance that the silence is
normal, phi = 8 a 1e-8 chance. A peer is **down** when phi >= ``threshold`` and **suspect** when
phi >= ``suspect`` (below the threshold); one fresh heartbeat makes it up again.

Defaults (documented in the README, "Failures"), for gossip every 1 s:

- ``threshold = 8.0`` (Akka's and Cassandra's default). With heartbeats every ~1 s and the
  standard deviation floored at ``min_std = 0.25`` s, phi reaches 8 about 2.8 s of silence after
  the last heartbeat (mean 1 s + ``acceptable_pause`` + ~5 floored deviations); a killed or paused
  node, last heard from at most one interval before it stopped, is marked down by every peer
  within ~4 s (plus one check interval).
- ``min_std``: a floor under the measured deviation. A perfectly regular peer (virtual time, a quiet
  LAN) would otherwise have a deviation near 0 and be convicted by a 10 ms hiccup.
- ``acceptable_pause = 0.5`` s: added to the mean, so one lost gossip message (a 2 s gap) gives
  phi ~ 1.6, far below 8 -- no flapping at 1 % loss. A 3 s silence convicts (phi ~ 11); in a
  small cluster each node hears a peer's counter directly *and* through every other node's
  gossip, so that takes several losses in a row. In a larger cluster (fanout < peers) the
  intervals spread more, the measured deviation exceeds the floor and the detector adapts --
  that is what the accrual detector is for.
- ``max_sample = 5.0`` s: a longer interval is not recorded. It is an outage (or this node's own
  pause) ending, not a sample of normal behaviour; recording it would inflate the mean and make
  the next failure take a minute to detect.

A pause of *this* node (SIGSTOP, a long GC, a VM steal) would make every peer look silent when it
wakes, and it would convict them all. Cassandra's guard is copied: :meth:`PhiAccrual.tick` is
called by the owner of the detector on its own schedule; when ``now`` jumped by more than
``max_local_pause`` since the last tick, the last-arrival times of all peers are moved to ``now``
-- the node does not know anything about the time it missed, so it gives everyone a fresh
window instead of convicting healthy peers. Between waking and that tick (``now`` already far
past the last tick), :meth:`PhiAccrual.stale` holds and phi is 0 for everyone. Rejected: keeping the verdicts across the pause and
waiting for gossip to clear them -- coordinators would skip healthy replicas for a while and
sloppy-quorum writes would go to fallbacks for no reason.

Invariants: ``phi`` is 0 for a peer never heard from since :meth:`add` (it is given the benefit
of the doubt from that moment, as if a heartbeat had arrived then); phi never decreases while no
heartbeat arrives and ``now`` grows; the state of the detector depends only on the sequence of
calls and their ``now`` arguments (no clock of its own).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

THRESHOLD = 8.0
SUSPECT = 4.0
MIN_STD = 0.25
ACCEPTABLE_PAUSE = 0.5
MAX_SAMPLE = 5.0
MAX_LOCAL_PAUSE = 3.0
WINDOW = 100

UP = "up"
SUSPECTED = "suspect"
DOWN = "down"


@dataclass
class _History:
    """Invariant: ``intervals`` is never empty -- it starts with the prior (below).
    ``stats`` caches :meth:`mean_std` of ``intervals``; whoever changes ``intervals`` resets it
    to None (coordinators ask for a verdict per replica per request, heartbeats come once a
    gossip round: O(WINDOW) per request was a fifth of a coordinator's CPU)."""

    last: float
    intervals: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    stats: tuple[float, float] | None = None
    #: (threshold, the silence at which phi reaches it): :meth:`PhiAccrual.is_down`'s cache,
    #: reset with ``stats`` (it is a function of them and the detector's constants only)
    crossing: tuple[float, float] | None = None

    @classmethod
    def fresh(cls, now: float, first_interval: float) -> _History:
        # Akka's bootstrap: a prior of two intervals, mean first_interval, deviation half of it,
        # diluted as real samples fill the window. Without it a peer not heard from in the
        # first seconds after start (gossip targets are random) would be convicted at once.
        h = cls(now)
        h.intervals.extend((first_interval * 0.5, first_interval * 1.5))
        return h

    def mean_std(self) -> tuple[float, float]:
        if self.stats is None:
            n = len(self.intervals)
            mean = sum(self.intervals) / n
            var = sum((x - mean) ** 2 for x in self.intervals) / n
            self.stats = (mean, math.sqrt(var))
        return self.stats


def _logistic_x(y: float) -> float:
    return y * (1.5976 + 0.070566 * y * y)


def silence_at(phi: float, mean: float, std: float) -> float:
    """The silence at which :func:`phi_of` reaches ``phi`` (its inverse: phi_of is strictly
    increasing in the silence). Bisection on y, to a relative error far below the margin
    :meth:`PhiAccrual.is_down` leaves to :func:`phi_of` itself; 200 halvings at most."""
    x = math.log(10.0 ** phi - 1.0) if phi < 300 else phi * math.log(10)  # phi = log10(1 + e^x)
    lo, hi = -1.0, 1.0
    while _logistic_x(lo) > x:
        lo *= 2.0
    while _logistic_x(hi) < x:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if mid in (lo, hi):
            break
        if _logistic_x(mid) < x:
            lo = mid
        else:
            hi = mid
    return mean + std * (lo + hi) / 2.0


def phi_of(elapsed: float, mean: float, std: float) -> float:
    """-log10 of the probability that a normal(mean, std) interval exceeds ``elapsed``
    (the logistic approximation of the normal CDF Akka uses; error < 1e-4 over the range)."""
    y = (elapsed - mean) / std
    x = y * (1.5976 + 0.070566 * y * y)  # P(later) = 1 / (1 + exp(x)); phi = log10(1 + exp(x))
    if x > 30:  # exp(x) dominates: log10(exp(x)) without the overflow
        return x / math.log(10) + math.log10(1.0 + math.exp(-x))
    return math.log10(1.0 + math.exp(x))


class PhiAccrual:
    """One node's detector over its peers. Every method takes ``now`` (seconds, any monotonic
    origin) and none reads a clock."""

    def __init__(
        self,
        *,
        threshold: float = THRESHOLD,
        suspect: float = SUSPECT,
        min_std: float = MIN_STD,
        acceptable_pause: float = ACCEPTABLE_PAUSE,
        max_sample: float = MAX_SAMPLE,
        max_local_pause: float = MAX_LOCAL_PAUSE,
        first_interval: float = 1.0,
    ) -> None:
        if not 0 < suspect <= threshold:
            raise ValueError(f"need 0 < suspect <= threshold, got {suspect}, {threshold}")
        self.threshold = threshold
        self.suspect = suspect
        self.min_std = min_std
        self.acceptable_pause = acceptable_pause
        self.max_sample = max_sample
        self.max_local_pause = max_local_pause
        self.first_interval = first_interval
        self._peers: dict[str, _History] = {}
        self._last_tick: float | None = None

    def add(self, peer: str, now: float) -> None:
        """Start watching ``peer`` (idempotent)."""
        if peer not in self._peers:
            self._peers[peer] = _History.fresh(now, self.first_interval)

    def remove(self, peer: str) -> None:
        self._peers.pop(peer, None)

    @property
    def peers(self) -> list[str]:
        return sorted(self._peers)

    def heartbeat(self, peer: str, now: float) -> None:
        """A heartbeat of ``peer`` arrived at ``now`` (its counter advanced)."""
        h = self._peers.get(peer)
        if h is None:
            self.add(peer, now)
            return
        interval = now - h.last
        if 0 <= interval <= self.max_sample:
            h.intervals.append(interval)
            h.stats = h.crossing = None
        h.last = max(h.last, now)

    def tick(self, now: float) -> bool:
        """Called by the detector's owner on its own schedule (every gossip round). Returns
        True when ``now`` shows this node itself was paused (module docstring); then every
        peer's silence is forgiven from ``now`` on."""
        paused = self._last_tick is not None and now - self._last_tick > self.max_local_pause
        self._last_tick = now
        if paused:
            for h in self._peers.values():
                h.last = max(h.last, now)
        return paused

    def stale(self, now: float) -> bool:
        """True when the owner has not ticked for longer than ``max_local_pause``: this node was
        paused (or its loop blocked) and has not caught up yet, so it convicts nobody until the
        next :meth:`tick` -- a request served in the instant after waking, before the gossip
        round runs, must not skip healthy replicas either."""
        return self._last_tick is not None and now - self._last_tick > self.max_local_pause

    def phi(self, peer: str, now: float) -> float:
        h = self._peers.get(peer)
        if h is None or self.stale(now):
            return 0.0
        mean, std = h.mean_std()
        return phi_of(max(0.0, now - h.last), mean + self.acceptable_pause, max(std, self.min_std))

    def is_down(self, peer: str, now: float) -> bool:
        """``state(peer, now) == DOWN``, at the cost of a comparison: coordinators ask it for
        every replica of every request, heartbeats come once a gossip round. The silence at
        which phi reaches the threshold is solved once per change of the window
        (:func:`silence_at`); within a hair of it phi itself decides, so the verdict is
        exactly phi's."""
        h = self._peers.get(peer)
        if h is None or (self._last_tick is not None and now - self._last_tick > self.max_local_pause):
            return False  # never heard of, or this node is just back from a pause (stale)
        c = h.crossing
        if c is None or c[0] != self.threshold:
            mean, std = h.mean_std()
            c = h.crossing = (self.threshold, silence_at(
                self.threshold, mean + self.acceptable_pause, max(std, self.min_std)))
        silence = max(0.0, now - h.last)
        margin = 1e-9 * (1.0 + abs(c[1]))
        if silence < c[1] - margin:
            return False
        if silence > c[1] + margin:
            return True
        return self.phi(peer, now) >= self.threshold

    def state(self, peer: str, now: float) -> str:
        p = self.phi(peer, now)
        if p >= self.threshold:
            return DOWN
        if p >= self.suspect:
            return SUSPECTED
        return UP

    def down(self, now: float) -> set[str]:
        """The peers whose phi is at or above the threshold at ``now``."""
        return {p for p in self._peers if self.phi(p, now) >= self.threshold}


__all__ = ["PhiAccrual", "phi_of", "silence_at", "THRESHOLD", "UP", "SUSPECTED", "DOWN"]
