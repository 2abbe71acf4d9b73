"""Failure detection by gossip: the asyncio loop over liveness.Gossiper (pure) on a Transport.

Every ``interval`` (1 s by default, ``--gossip-interval``) the node bumps its heartbeat counter
and sends its view (``name -> (generation, counter)``) to ``fanout`` random peers as a GOSSIP
request; the OK reply carries the peer's view (push-pull). Every advance of a peer's counter,
heard directly or through a third node, is a heartbeat for the phi-accrual detector
(failure_detector.py): suspect at phi >= 4, **down at phi >= 8** (the documented threshold:
about 2.8 s of silence after a peer's last heartbeat at 1 s gossip, so a killed or paused node is
down everywhere within ~4 s), up again at its next heartbeat. Verdicts are local and never
gossiped (liveness.py says why).

One gossip owner per node. With ``--workers K`` the node is K processes behind one port, and the
kernel hands a peer's GOSSIP connection to any of them. Exactly one of them -- worker 0, or the
only process -- *owns* gossip: it alone mints this node's counter, runs the rounds and keeps the
detector. The others share what they learn through a :class:`Board`, a small memory-only shmkv
Store of the node (``<store>.live``, created by whichever worker attaches first, removed by the
supervisor at the end):

    b"mgossip.view"     the merged view: a worker answering a peer's GOSSIP merges the entries
                        into it (a cas loop; the merge is a per-entry max, so order never
                        matters) and replies with it; the owner reads it every tick (interval/10)
                        and feeds the advances to its detector
    b"mgossip.verdict"  the owner's verdicts {"at": monotonic time, "peers": {peer: state, phi,
                        heartbeat}}, written every tick; the other workers read it (cached for
                        one tick) to skip down nodes and to answer STATUS
    b"mhints.<i>"       worker i's hint counts (handoff.py), summed for STATUS
    b"mmetrics.<i>"     worker i's own Prometheus series, every second (metrics.py), which
                        worker 0 -- the one that listens on --metrics -- serves for all

Why worker 0 and not the supervisor: the supervisor is a synchronous signal loop without an event
loop or a transport (workers.py), and gossip needs both; worker 0 is restarted at once when it
dies. Why a separate small store and not the node's Store: with ``--path`` every put of the node's
Store is written through to the LSM (fsync by default), and the board changes ten times a
second. Why not forward GOSSIP to the owner: the workers share one port, so there is no address
at which only worker 0 listens. A verdict older than ``MAX_LOCAL_PAUSE`` (the owner died or is
stalled) is ignored: the other workers then know nothing and skip nobody, as before gossip.

A node that was paused (SIGSTOP, a stalled loop) must not convict its healthy peers when it
wakes: every tick calls :meth:`PhiAccrual.tick`, which sees the jump of ``now`` (more than
``MAX_LOCAL_PAUSE`` since the last tick) and restarts every peer's silence from now
(failure_detector.py); between waking and that tick :meth:`PhiAccrual.stale` keeps phi at 0.
The pause is logged.

Bad gossip is refused and logged (rate-limited, one line per reason per ``LOG_EVERY`` s): a
GOSSIP whose ``from`` is not a member, or is this node's own name (another process claiming its
identity), or a member whose address pins its connections' source IP (transport.pinned_source:
a member at an IP address, routable or its own 127.0.0.x, binds its connections to it) while the
connection came from another IP (a process claiming a member's identity; where the source
proves nothing -- 127.0.0.1 shared by every process, a hostname -- nothing is authenticated,
the documented limit); entries that are malformed, for non-members, for this node (liveness.py); entries
whose generation lies in the future of this node's wall clock by more than ``MAX_SKEW_MS`` or
whose counter could not have been reached since that generation at the fastest allowed gossip
interval (a forged huge counter would otherwise freeze a peer's entry and make it look down
forever). Nothing of a refused entry enters the view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgpack

from ..errors import Error
from . import wire
from .failure_detector import DOWN, MAX_LOCAL_PAUSE, UP, PhiAccrual
from .liveness import FANOUT, INTERVAL, Entry, Gossiper, merge_views, parse_view
from .transport import PEER_HOST, Transport, pinned_source
from .wire import BadRequest, Message

log = logging.getLogger("shmkv.cluster.gossip")

#: the fastest --gossip-interval accepted (also the plausibility bound on counters)
MIN_INTERVAL = 0.01
#: a generation (the node's start time, wall-clock ms) may lie this far in our future
MAX_SKEW_MS = 60_000
#: the same refusal reason is logged at most once per this many seconds
LOG_EVERY = 10.0
#: ticks per interval: how often the owner reads the board and publishes verdicts
TICKS = 10

VIEW_KEY = b"mgossip.view"
VERDICT_KEY = b"mgossip.verdict"
HINTS_KEY = b"mhints."
METRICS_KEY = b"mmetrics."
BOARD_SIZE = "4MiB"
CAS_TRIES = 100


def board_name(store: str) -> str:
    return f"{store}.live"


class Board(Protocol):
    """What the workers of one node share about liveness (module docstring)."""

    def merge_view(self, entries: Mapping[str, Entry]) -> dict[str, Entry]: ...
    def view(self) -> dict[str, Entry]: ...
    def publish(self, verdict: dict[str, Any]) -> None: ...
    def verdict(self) -> dict[str, Any] | None: ...
    def put_hints(self, index: int, counts: dict[str, Any]) -> None: ...
    def hints(self, count: int) -> list[dict[str, Any]]: ...


class LocalBoard:
    """The board of a one-process node (and of the simulator's nodes): plain memory."""

    def __init__(self) -> None:
        self._view: dict[str, Entry] = {}
        self._verdict: dict[str, Any] | None = None
        self._hints: dict[int, dict[str, Any]] = {}

    def merge_view(self, entries: Mapping[str, Entry]) -> dict[str, Entry]:
        self._view = merge_views(self._view, entries)
        return dict(self._view)

    def view(self) -> dict[str, Entry]:
        return dict(self._view)

    def publish(self, verdict: dict[str, Any]) -> None:
        self._verdict = verdict

    def verdict(self) -> dict[str, Any] | None:
        return self._verdict

    def put_hints(self, index: int, counts: dict[str, Any]) -> None:
        self._hints[index] = counts

    def hints(self, count: int) -> list[dict[str, Any]]:
        return [self._hints[i] for i in range(count) if i in self._hints]


class StoreBoard:
    """The board in a shmkv Store shared by the node's workers (raw codec: bytes values)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def merge_view(self, entries: Mapping[str, Entry]) -> dict[str, Entry]:
        for _ in range(CAS_TRIES):
            raw = self.store.get(VIEW_KEY)
            old = _decode_view(raw)
            merged = merge_views(old, entries)
            if merged == old:
                return old
            new = msgpack.packb(sorted([n, g, c] for n, (g, c) in merged.items()))
            if raw is None:
                if self.store.add(VIEW_KEY, new):
                    return merged
            elif self.store.cas(VIEW_KEY, raw, new):
                return merged
        raise Error("gossip board: the view's compare-and-swap kept failing")

    def view(self) -> dict[str, Entry]:
        return _decode_view(self.store.get(VIEW_KEY))

    def publish(self, verdict: dict[str, Any]) -> None:
        self.store.put(VERDICT_KEY, msgpack.packb(verdict))

    def verdict(self) -> dict[str, Any] | None:
        raw = self.store.get(VERDICT_KEY)
        if raw is None:
            return None
        try:
            v = msgpack.unpackb(raw)
        except Exception:  # noqa: BLE001 -- our own bytes; unreadable means "no verdict"
            return None
        return v if isinstance(v, dict) else None

    def put_hints(self, index: int, counts: dict[str, Any]) -> None:
        self.store.put(HINTS_KEY + str(index).encode(), msgpack.packb(counts))

    def hints(self, count: int) -> list[dict[str, Any]]:
        out = []
        for i in range(count):
            raw = self.store.get(HINTS_KEY + str(i).encode())
            if raw is not None:
                with contextlib.suppress(Exception):
                    out.append(msgpack.unpackb(raw))
        return out


    def put_metrics(self, index: int, at: float, text: bytes) -> None:
        """Worker ``index``'s own metrics (Prometheus text) as of monotonic time ``at``
        (metrics.py: worker 0 serves the node's scrape with every worker's series)."""
        self.store.put(METRICS_KEY + str(index).encode(), msgpack.packb([at, text]))

    def metrics(self, index: int) -> tuple[float, bytes] | None:
        raw = self.store.get(METRICS_KEY + str(index).encode())
        if raw is None:
            return None
        try:
            at, text = msgpack.unpackb(raw)
        except Exception:  # noqa: BLE001 -- our own bytes; unreadable means "nothing published"
            return None
        return (at, text) if isinstance(at, (int, float)) and isinstance(text, bytes) else None


def _decode_view(raw: bytes | None) -> dict[str, Entry]:
    if raw is None:
        return {}
    try:
        good, _ = parse_view(msgpack.unpackb(raw))
    except Exception:  # noqa: BLE001 -- unreadable: start over (counters only grow again)
        return {}
    return good


def plausible(raw: Any, wall_ms: int) -> tuple[list[list[Any]], list[str]]:
    """The entries of a raw view whose (generation, counter) could be real at ``wall_ms``
    (module docstring); malformed entries pass through (parse_view refuses them, with a reason)."""
    if not isinstance(raw, list):
        return raw, []
    keep: list[Any] = []
    why: list[str] = []
    for item in raw:
        if isinstance(item, list) and len(item) == 3 and type(item[1]) is int and type(item[2]) is int:
            gen, counter = item[1], item[2]
            if gen > wall_ms + MAX_SKEW_MS:
                why.append(f"entry for {item[0]!r:.40}: generation {gen} is in the future")
                continue
            if counter > (wall_ms + MAX_SKEW_MS - gen) / (MIN_INTERVAL * 1000) + 1:
                why.append(f"entry for {item[0]!r:.40}: counter {counter} is impossible since generation {gen}")
                continue
        keep.append(item)
    return keep, why


class _Throttle:
    """One log line per reason per LOG_EVERY seconds (bad gossip must not flood the log)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._last: dict[str, float] = {}

    def warn(self, reason: str, text: str, *args: Any) -> None:
        now = self.clock()
        if now - self._last.get(reason, -1e18) >= LOG_EVERY:
            self._last[reason] = now
            log.warning(text, *args)


class Gossip:
    """One process's side of gossip: the owner's loop, or a worker's view through the board.

    :param members: name -> address of every ring member (this node included).
    :param owner: whether this process runs the rounds and the detector (module docstring).
    :param clock: monotonic seconds, the same clock in every worker of the node
        (``time.monotonic``; the simulator's loop time in tests).
    :param wall_ms: wall-clock milliseconds (the generation, and the plausibility bound).
    """

    def __init__(
        self,
        name: str,
        members: Mapping[str, str],
        transport: Transport,
        *,
        board: Board | None = None,
        owner: bool = True,
        interval: float = INTERVAL,
        fanout: int = FANOUT,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        detector: PhiAccrual | None = None,
    ) -> None:
        if not interval >= MIN_INTERVAL:
            raise ValueError(f"gossip interval must be >= {MIN_INTERVAL} s, got {interval}")
        self.name = name
        self.members = dict(members)
        self.transport = transport
        self.board: Board = board if board is not None else LocalBoard()
        self.owner = owner
        self.interval = interval
        self.clock = clock
        self.wall_ms = wall_ms
        self.rejected = 0
        self.pauses = 0
        self._throttle = _Throttle(clock)
        self._cache: tuple[float, dict[str, Any]] | None = None
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self.gossiper: Gossiper | None = None
        if owner:
            self.gossiper = Gossiper(
                name, wall_ms(), self.members, rng or random.Random(), fanout=fanout,
                interval=interval, now=clock(),
                detector=detector if detector is not None else PhiAccrual(first_interval=interval),
            )
            self.gossiper.view.update(
                {n: e for n, e in self.board.view().items() if n in self.members and n != name}
            )

    def set_members(self, members: Mapping[str, str]) -> None:
        """Follow a ring change: gossip with (and accept gossip from) ``members``, this node
        included (Node.ring sets it on every ring it adopts)."""
        new = {**dict(members), self.name: self.members[self.name]}
        if new == self.members:
            return
        self.members = new
        self._cache = None
        if self.gossiper is not None:
            self.gossiper.set_members(self.members, self.clock())

    # -- the owner's loop --------------------------------------------------------------------

    def start(self) -> None:
        """Start the owner's loop (a no-op for a non-owner). REQUIRES: a running event loop."""
        if self.owner and self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop and the gossip requests in flight; the detector's state is kept (the
        simulator resumes a "paused" node with it)."""
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        self._loop_task = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _run(self) -> None:
        g = self.gossiper
        assert g is not None
        next_round = self.clock()
        tick = self.interval / TICKS
        while True:
            now = self.clock()
            if g.detector.tick(now):
                self.pauses += 1
                log.warning("%s: this node was stalled for more than %.1f s (paused?); every peer's "
                            "silence is forgiven from now, nobody is convicted for it",
                            self.name, MAX_LOCAL_PAUSE)
            self._absorb(self.board.view(), now)
            if now >= next_round:
                next_round = now + self.interval
                for peer in g.round(now):
                    if peer not in self._in_flight:  # a peer still silent from last time: skip it
                        self._spawn(self._push(peer))
                self.board.merge_view({self.name: g.view[self.name]})
            if not isinstance(self.board, LocalBoard):
                # only other workers read the published verdicts; a one-process node's
                # LocalBoard has no other reader, so the owner does not compute them
                self.board.publish(self._verdict(now))
            await asyncio.sleep(tick)

    async def _push(self, peer: str) -> None:
        g = self.gossiper
        assert g is not None
        self._in_flight.add(peer)
        try:
            msg = Message(wire.GOSSIP, 0, {"from": self.name, "view": g.payload()})
            try:
                reply = await self.transport.request(self.members[peer], msg, self.interval)
            except (Error, OSError):
                return  # the detector notices silence; a failed push is not a verdict
            view = reply.fields.get("view")
            self._receive(view, peer)
        finally:
            self._in_flight.discard(peer)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- receiving ---------------------------------------------------------------------------

    async def handle(self, msg: Message) -> Message:
        """Answer a peer's GOSSIP: merge its view, reply with ours.

        :raises BadRequest: ``from`` is not a member, is this node's name, or is a member whose
            pinned source IP is not the one this request came from (logged).
        """
        sender = msg.fields.get("from")
        if sender == self.name:
            self.rejected += 1
            self._throttle.warn("self", "%s: refused GOSSIP claiming to come from this node's own name "
                                "(another process uses --name %s?)", self.name, self.name)
            raise BadRequest(f"GOSSIP from {sender!r}: that is this node's own name")
        if sender not in self.members:
            self.rejected += 1
            self._throttle.warn("from", "%s: refused GOSSIP from %r, not a member of the ring",
                                self.name, sender)
            raise BadRequest(f"GOSSIP from {sender!r:.80}: not a member of the ring")
        src, pinned = PEER_HOST.get(), pinned_source(self.members[sender])
        if src is not None and pinned is not None and src != pinned:
            self.rejected += 1
            self._throttle.warn("spoof", "%s: refused GOSSIP claiming to come from %s (%s) sent from %s",
                                self.name, sender, self.members[sender], src)
            raise BadRequest(f"GOSSIP from {sender!r}: {sender} connects from {pinned}, this came from {src}")
        self._receive(msg.fields.get("view"), str(sender))
        if self.gossiper is not None:
            return Message(wire.OK, 0, {"view": self.gossiper.payload()})
        return Message(wire.OK, 0, {"view": [[n, g, c] for n, (g, c) in sorted(self.board.view().items())]})

    def _receive(self, raw: Any, sender: str) -> None:
        now = self.clock()
        kept, why = plausible(raw, self.wall_ms())
        view, bad = parse_view(kept)
        why += bad
        good: dict[str, Entry] = {}
        for n, e in view.items():
            if n == self.name:
                mine = self._own_entry()
                if mine is not None and e > mine:
                    why.append(f"an entry for this node ({n}) ahead of its own: {e} > {mine} "
                               "(another process uses this name?)")
                continue
            if n not in self.members:
                why.append(f"entry for {n!r:.40}, not a member of the ring")
                continue
            good[n] = e
        if why:
            self.rejected += len(why)
            self._throttle.warn(f"entries:{sender}", "%s: refused %d gossip entries from %s: %s",
                                self.name, len(why), sender, "; ".join(why[:3]))
        if good:
            self.board.merge_view(good)
            self._absorb(good, now)

    def _absorb(self, view: Mapping[str, Entry], now: float) -> None:
        """Feed the owner's detector with the entries of ``view`` that advanced."""
        g = self.gossiper
        if g is None:
            return
        payload = [[n, gen, c] for n, (gen, c) in view.items() if n != self.name and n in self.members]
        if payload:
            g.receive(payload, now)

    def _own_entry(self) -> Entry | None:
        if self.gossiper is not None:
            return self.gossiper.view[self.name]
        return self.board.view().get(self.name)

    # -- verdicts ----------------------------------------------------------------------------

    def _verdict(self, now: float) -> dict[str, Any]:
        g = self.gossiper
        assert g is not None
        return {"at": now, "peers": g.status(now)}

    def peers(self) -> dict[str, dict[str, Any]]:
        """Per peer: state (up / suspect / down), phi, heartbeat -- this node's view. Empty when
        nothing is known (a non-owner whose owner has published nothing recent)."""
        now = self.clock()
        if self.gossiper is not None:
            return self.gossiper.status(now)
        cached = self._cache
        if cached is None or now - cached[0] > self.interval / TICKS:
            v = self.board.verdict()
            peers: dict[str, Any] = {}
            if v is not None and isinstance(v.get("at"), (int, float)) and now - v["at"] <= MAX_LOCAL_PAUSE:
                peers = v.get("peers") or {}
            cached = self._cache = (now, peers)
        return cached[1]

    def state(self, peer: str) -> str:
        if peer == self.name:
            return UP
        if self.gossiper is not None:
            return self.gossiper.detector.state(peer, self.clock())
        st = self.peers().get(peer)
        return st.get("state", UP) if isinstance(st, dict) else UP

    def is_down(self, peer: str) -> bool:
        """What coordinators ask: skip ``peer`` (phi at or above the threshold)?"""
        if self.gossiper is not None and peer != self.name:
            return self.gossiper.detector.is_down(peer, self.clock())
        return self.state(peer) == DOWN


__all__ = ["Gossip", "Board", "LocalBoard", "StoreBoard", "board_name", "plausible", "MIN_INTERVAL"]
