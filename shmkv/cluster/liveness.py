"""Who is up: the gossip view of heartbeat counters, merged, fed to the phi detector (pure).

Each node owns one entry of the view, ``name -> (generation, counter)``: ``counter`` grows by one
every gossip round, ``generation`` is fixed for one run of the node (the daemon uses its start
time in milliseconds, so a restarted node's counter, back at 0, is still newer than its old one).
Every round a node bumps its counter and sends its whole view to ``fanout`` peers picked at random
(seeded rng: the simulator replays); a receiver merges, taking per node the larger
``(generation, counter)`` -- commutative, associative, idempotent, so gossip can be lost,
duplicated and reordered and views still converge. Each time a peer's entry *advances* (directly
or through a third node), that is a heartbeat of that peer for :class:`~.failure_detector.PhiAccrual`.

Rejected: a node that cannot reach a peer declaring it down for everyone (gossiping verdicts).
A verdict is local -- each node computes phi from what it has heard -- so one node cut off from
a peer does not make the others skip it, and a node that wakes from a pause cannot spread its
stale opinions. Only counters travel.

Bad gossip is dropped entry by entry, with a reason (the caller logs it): entries that are not
``[str, int >= 0, int >= 0]``, names not in the ring (a node that no longer exists, a forged
one), and any entry about *this* node -- it alone mints its counter, so a remote entry for it is
either an old echo (harmless) or another process claiming its name (logged when it is ahead of
ours). Nothing of a rejected entry enters the view.

:meth:`Gossiper.step` is the same logic as a machine of tests/cluster/sim.py
(``step(now, inbox) -> outbox``); gossip.py drives :meth:`Gossiper.round` and
:meth:`Gossiper.receive` over the real transport.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from . import wire
from .failure_detector import DOWN, PhiAccrual
from .wire import Message

INTERVAL = 1.0
FANOUT = 3  # in clusters of up to 4 nodes: every peer, every round (regular heartbeats)

Entry = tuple[int, int]  # (generation, counter)


def merge_views(a: Mapping[str, Entry], b: Mapping[str, Entry]) -> dict[str, Entry]:
    """The per-node maximum of two views (the gossip join)."""
    out = dict(a)
    for name, e in b.items():
        if name not in out or e > out[name]:
            out[name] = e
    return out


def parse_view(raw: Any) -> tuple[dict[str, Entry], list[str]]:
    """Decode a view off the wire: (the well-formed entries, why each bad one was dropped)."""
    good: dict[str, Entry] = {}
    bad: list[str] = []
    if not isinstance(raw, list):
        return good, [f"view is {type(raw).__name__}, not a list"]
    for item in raw:
        if (
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and all(type(x) is int and 0 <= x < 2**63 for x in item[1:])
        ):
            e = (item[1], item[2])
            if item[0] not in good or e > good[item[0]]:
                good[item[0]] = e
        else:
            bad.append(f"malformed entry {item!r:.80}")
    return good, bad


class Gossiper:
    """One node's side of gossip. ``members``: name -> address of every ring member (this node
    included). No method reads a clock or does I/O."""

    def __init__(
        self,
        name: str,
        generation: int,
        members: Mapping[str, str],
        rng: random.Random,
        *,
        detector: PhiAccrual | None = None,
        fanout: int = FANOUT,
        interval: float = INTERVAL,
        now: float = 0.0,
    ) -> None:
        if name not in members:
            raise ValueError(f"{name} is not a member")
        self.name = name
        self.members = dict(members)
        self.rng = rng
        self.fanout = fanout
        self.interval = interval
        self.detector = detector if detector is not None else PhiAccrual(first_interval=interval)
        self.view: dict[str, Entry] = {name: (generation, 0)}
        self.rejected = 0
        self._next_round = now
        for peer in self.peers:
            self.detector.add(peer, now)

    @property
    def peers(self) -> list[str]:
        return sorted(m for m in self.members if m != self.name)

    def set_members(self, members: Mapping[str, str], now: float) -> None:
        """The ring changed (a node added or removed, config_service.py): gossip with ``members``
        from now on (this node stays one). A new peer is watched from ``now`` with the
        detector's bootstrap prior; a peer gone is forgotten."""
        new = {**dict(members), self.name: self.members[self.name]}
        for gone in set(self.members) - set(new):
            self.detector.remove(gone)
            self.view.pop(gone, None)
        self.members = new
        for peer in self.peers:
            self.detector.add(peer, now)

    # -- the two inputs ----------------------------------------------------------------------

    def round(self, now: float) -> list[str]:
        """One gossip round at ``now``: bump this node's counter, return the peers to send
        :meth:`payload` to."""
        self.detector.tick(now)
        gen, counter = self.view[self.name]
        self.view[self.name] = (gen, counter + 1)
        peers = self.peers
        return self.rng.sample(peers, min(self.fanout, len(peers)))

    def receive(self, raw: Any, now: float) -> list[str]:
        """Merge a view received at ``now``; returns why entries were rejected (for a log)."""
        view, why = parse_view(raw)
        mine = self.view[self.name]
        for name, e in sorted(view.items()):
            if name == self.name:
                if e > mine:
                    why.append(f"an entry for this node ({name}) ahead of its own: {e} > {mine} "
                               "(another process uses this name?)")
                continue
            if name not in self.members:
                why.append(f"entry for {name!r}, not a member of the ring")
                continue
            old = self.view.get(name)
            if old is None or e > old:
                self.view[name] = e
                if old is not None and (e[0] != old[0] or self.detector.state(name, now) == DOWN):
                    # A restart (a new generation) or the end of an outage this node saw: the
                    # gap is not a sample of the peer's normal intervals. Recorded, one such
                    # gap of ~4 s would inflate mean and deviation so much that the peer's next
                    # failure took twice as long to detect; a fresh window instead (Cassandra
                    # clears the arrival window of a restarted node too).
                    self.detector.remove(name)
                    self.detector.add(name, now)
                else:
                    self.detector.heartbeat(name, now)
        self.rejected += len(why)
        return why

    def payload(self) -> list[list[Any]]:
        return [[n, g, c] for n, (g, c) in sorted(self.view.items())]

    # -- the verdicts ------------------------------------------------------------------------

    def down(self, now: float) -> set[str]:
        return self.detector.down(now)

    def status(self, now: float) -> dict[str, dict[str, Any]]:
        """Per peer: state (up / suspect / down), phi, the heartbeat last heard."""
        out: dict[str, dict[str, Any]] = {}
        for peer in self.peers:
            phi = self.detector.phi(peer, now)
            out[peer] = {
                "state": self.detector.state(peer, now),
                "phi": round(min(phi, 1e6), 2),
                "heartbeat": list(self.view.get(peer, (0, 0))),
            }
        return out

    # -- as a simulator machine ----------------------------------------------------------------

    def step(self, now: float, inbox: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
        """The simulator's interface: merge what arrived and answer each push with this node's
        view (push-pull, as the daemon's GOSSIP request and its reply); when a round is due,
        gossip."""
        out: list[tuple[str, Message]] = []
        for _src, msg in inbox:
            if msg.code != wire.GOSSIP:
                continue
            self.receive(msg.fields.get("view"), now)
            sender = msg.fields.get("from")
            if not msg.fields.get("reply") and sender in self.members and sender != self.name:
                body = {"from": self.name, "view": self.payload(), "reply": 1}
                out.append((self.members[sender], Message(wire.GOSSIP, 0, body)))
        if now >= self._next_round:
            self._next_round = now + self.interval
            targets = self.round(now)
            body = {"from": self.name, "view": self.payload()}
            out += [(self.members[p], Message(wire.GOSSIP, 0, body)) for p in targets]
        return out


__all__ = ["Gossiper", "merge_views", "parse_view", "INTERVAL", "FANOUT"]
