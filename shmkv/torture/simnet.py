"""A simulated network in virtual time: the cluster's protocol code, deterministic by seed.

(Moved here from tests/cluster/sim.py, which re-exports it, so that ``shmkv torture --simulate``
-- simulate.py -- can drive it from an installed package.)

``SimNetwork(seed)`` is a message network between named addresses plus a virtual clock. It offers
the same :class:`~shmkv.cluster.transport.Transport` as TcpTransport (``net.transport(addr)``), so
the coordinator -- and later gossip, handoff, Raft -- run unchanged over it, and a pure step
function can be plugged in directly (``net.add_machine``). The same seed gives the same run, event
for event (``net.trace``); a failing seed replays.

    net = SimNetwork(seed=7, delay=(0.001, 0.010), drop=0.01)
    a, b = net.transport("a:1"), net.transport("b:1")
    net.run(b.serve("b:1", handler))
    net.partition({"a:1"}, {"b:1"})          # both ways; net.cut(srcs, dsts) is one-way
    net.run(a.request("b:1", msg, timeout=1.0))   # RequestTimeout at virtual t = 1.0
    net.heal(); net.run_for(30.0)             # 30 virtual seconds, milliseconds of wall time

The choice: virtual time *inside* asyncio
------------------------------------------
The loop is a real asyncio loop whose clock is virtual (:class:`VirtualTimeLoop`): when nothing is
runnable it jumps straight to the next timer instead of sleeping. Async code under test keeps every
asyncio tool -- ``wait_for`` timeouts, ``gather``, ``sleep``, tasks, events -- and measures time
with ``loop.time()``, which is the virtual clock. The rejected alternative, an asyncio-free
scheduler of our own, would drive step functions fine but would force every async layer
(coordinator, daemon loops) to be written twice, once for production and once for the simulator;
FoundationDB's lesson is that the simulated code must be the shipped code.

Pure step functions need no asyncio at all on their side: a machine is any object with
``step(now, inbox) -> outbox`` (``inbox``: ``[(src, Message)]``, ``outbox``: ``[(dst, Message)]``),
like etcd-raft's ``Step``/``Tick``/``Ready``. The network calls it on every delivery and every
``tick`` seconds with an empty inbox, and sends what it returns as one-way messages. Machines and
async nodes share the network, the clock, the knobs and the trace.

Determinism
-----------
Every random choice comes from ``net.rng`` (seeded) and is drawn at send time, in send order: for
each message a drop draw, a delay draw, a duplicate draw, always all three (so turning one knob
does not reshuffle the others' choices). Delivery order is the order of the drawn delivery times:
messages overtake each other unless ``fifo=True`` keeps each (src, dst) pair in order, as one TCP
connection would. Deliveries at equal times go in send order (the network keeps its own heap
of (time, sequence)); timers of the code under test follow asyncio's heap, itself a function
of the operation sequence.

What can break determinism is the code under test, not the simulator: iterating a ``set`` of
objects (hashed by address, e.g. ``asyncio.wait(set_of_tasks)``'s callbacks) or of ``str`` across
processes with different ``PYTHONHASHSEED``, wall-clock reads (``time.time()``), real I/O, threads.
The same-seed-same-trace test of a scenario is the check.

Faults
------
- ``drop``: probability a message is lost; ``duplicate``: probability it is delivered twice;
  ``delay=(lo, hi)``: uniform latency per message. All three are plain attributes, change them
  mid-run.
- ``partition(*groups)``: nodes in different groups cannot exchange messages (both directions);
  ``cut(srcs, dsts)``: messages from ``srcs`` to ``dsts`` are lost, the other way works (a
  one-way partition: requests arrive and are applied, their replies vanish); ``heal()``.
  Partitions are checked at *delivery*, so a cut also loses what was already on the wire.
- ``skew[addr] = seconds``: the ``now`` a machine at ``addr`` is given runs that far ahead (or
  behind); async code shares the loop's one clock, so skew reaches it only through what it is
  told.
- ``crash(addr)``: the node stops serving at once, its handlers are cancelled and messages to it
  are refused. Callers see what TCP would show: ``Unreachable(sent=False)`` when the address had
  no server when they sent, ``Unreachable(sent=True)`` when it went down with their request in
  flight; a partition shows as a timeout. (TCP would say ``Unreachable(sent=False)`` for a
  partition that predates the connection; the simulation has no connections and always says
  the less certain "timeout, may have been applied", the safe direction for a checker.) ``transport(addr)`` again and ``serve`` to restart.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import selectors
from collections.abc import Awaitable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from shmkv.cluster import wire
from shmkv.cluster.transport import Handler, RequestTimeout, Transport, Unreachable
from shmkv.cluster.wire import Message, Overloaded

T = TypeVar("T")


class SimDeadlock(RuntimeError):
    """Nothing is runnable and no timer is pending, yet the awaited result is not done: every
    task waits for something that can never happen."""


class _VirtualSelector(selectors.BaseSelector):
    """A selector that never reports I/O and turns "wait up to t seconds" into "advance the
    virtual clock by t". Registrations (the loop's self-pipe) are remembered, never polled."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._loop = loop
        self._keys: dict[Any, selectors.SelectorKey] = {}

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = selectors.SelectorKey(fileobj, _fd(fileobj), events, data)
        self._keys[key.fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys.pop(_fd(fileobj))

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        self.unregister(fileobj)
        return self.register(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimDeadlock(
                f"at virtual t={self._loop.time():.6f}: no runnable task, no timer, "
                "and the awaited result is not done"
            )
        if timeout > 0:
            self._loop._vnow += timeout
        return []

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


def _fd(fileobj: Any) -> int:
    return fileobj if isinstance(fileobj, int) else fileobj.fileno()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose ``time()`` is virtual and starts at 0.0; idle waits cost no wall
    time. No real I/O may run on it (sockets would never be polled)."""

    def __init__(self) -> None:
        self._vnow = 0.0
        super().__init__(selector=_VirtualSelector(self))

    def time(self) -> float:
        return self._vnow


@dataclass(frozen=True, slots=True)
class _Envelope:
    kind: str  # "req" | "rep" | "one" (one-way, to a machine) | "refused"
    src: str
    dst: str
    msg: Message
    data: bytes | None  # the frame as TcpTransport would send it (encode=True), for fidelity
    sent: bool = True  # "refused" only: whether the request reached a server before it died


class Machine(Protocol):
    """A pure protocol node: inputs are messages and the time, outputs are messages."""

    def step(self, now: float, inbox: list[tuple[str, Message]]) -> list[tuple[str, Message]]: ...


class SimNetwork:
    """The network, its clock and its fault knobs; see the module docstring."""

    def __init__(
        self,
        seed: int,
        *,
        delay: tuple[float, float] = (0.0005, 0.002),
        drop: float = 0.0,
        duplicate: float = 0.0,
        fifo: bool = False,
        encode: bool = True,
    ) -> None:
        """
        :param seed: the only source of randomness; same seed, same run.
        :param delay: (min, max) one-way latency in virtual seconds, uniform.
        :param drop: probability that a message is lost.
        :param duplicate: probability that a message is delivered twice.
        :param fifo: keep each (src, dst) pair's messages in send order (one TCP connection).
        :param encode: pass every message through wire.encode/FrameDecoder, so what cannot
            cross a real socket cannot cross this one either.
        """
        self.seed = seed
        self.rng = random.Random(seed)
        self.delay = delay
        self.drop = drop
        self.duplicate = duplicate
        self.fifo = fifo
        self.encode = encode
        self.loop = VirtualTimeLoop()
        self.trace: list[tuple[float, str, str, str, str, int]] = []
        #: frame bytes handed to the network (requests and replies; encode=True), for tests
        #: that bound what a protocol sends
        self.bytes_sent = 0
        self._servers: dict[str, tuple[SimTransport, Handler]] = {}
        self._transports: dict[str, SimTransport] = {}
        self._machines: dict[str, Machine] = {}
        self.skew: dict[str, float] = {}
        self._blocked: set[tuple[str, str]] = set()
        self._last_delivery: dict[tuple[str, str], float] = {}
        self._seq = itertools.count()
        # Invariant: _timer is armed for _events[0] whenever _events is non-empty and no
        # _pump is running (_pump re-arms it on exit).
        self._events: list[tuple[float, int, _Envelope]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._pumping = False

    # -- time -------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.loop.time()

    def run(self, aw: Awaitable[T], timeout: float | None = None) -> T:
        """Run the simulation until ``aw`` is done; return its result (or raise its error).

        :param timeout: virtual seconds after which ``aw`` is cancelled and TimeoutError
            raised -- a bound for runs with periodic timers (ticks), which never deadlock.
        """
        if timeout is not None:
            aw = asyncio.wait_for(aw, timeout)
        return self.loop.run_until_complete(aw)

    def run_for(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass (deliveries, ticks, background tasks)."""
        self.run(asyncio.sleep(seconds))

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start ``coro`` as a task on the simulated loop (it runs during run/run_for)."""
        return self.loop.create_task(coro)

    def close(self) -> None:
        """Cancel every task left on the loop and close it."""
        for t in list(self._transports.values()):
            t._shutdown("network closed")
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        if tasks:
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    # -- nodes ------------------------------------------------------------------------------

    def transport(
        self, addr: str, *, max_in_flight: int = 1024, max_pending: int = 4096
    ) -> SimTransport:
        """The Transport of the node at ``addr`` (its source address); a new one after a crash.
        The bounds are TcpTransport's (they apply when the transport is first made)."""
        t = self._transports.get(addr)
        if t is None or t._closed:
            t = self._transports[addr] = SimTransport(
                self, addr, max_in_flight=max_in_flight, max_pending=max_pending
            )
        return t

    def add_machine(self, addr: str, machine: Machine, tick: float | None = None) -> None:
        """Plug a pure step-function node in at ``addr``; with ``tick``, it also steps with an
        empty inbox every ``tick`` virtual seconds (its timers: elections, heartbeats)."""
        self._machines[addr] = machine
        if tick is not None:

            def on_tick() -> None:
                if self._machines.get(addr) is machine:
                    self._emit(addr, machine.step(self.now + self.skew.get(addr, 0.0), []))
                    self.loop.call_later(tick, on_tick)

            self.loop.call_later(tick, on_tick)

    def send(self, src: str, dst: str, msg: Message) -> None:
        """A one-way message (to a machine); lost if nobody is there."""
        self._send("one", src, dst, msg)

    def crash(self, addr: str) -> None:
        """``addr`` stops at once: serving ends, its handlers are cancelled, its requests fail."""
        self._machines.pop(addr, None)
        t = self._transports.get(addr)
        if t is not None:
            t._shutdown(f"{addr} crashed")

    # -- faults -----------------------------------------------------------------------------

    def partition(self, *groups: Iterable[str]) -> None:
        """Nodes in different groups cannot exchange messages, either way (adds to other cuts)."""
        sets = [set(g) for g in groups]
        for i, a in enumerate(sets):
            for b in sets[i + 1 :]:
                self.cut(a, b)
                self.cut(b, a)

    def cut(self, srcs: Iterable[str], dsts: Iterable[str]) -> None:
        """Messages from any of ``srcs`` to any of ``dsts`` are lost (one way only)."""
        dst_list = list(dsts)
        for s in srcs:
            for d in dst_list:
                self._blocked.add((s, d))

    def heal(self) -> None:
        """Remove every partition and cut."""
        self._blocked.clear()

    # -- the wire ---------------------------------------------------------------------------

    def _send(self, kind: str, src: str, dst: str, msg: Message, *, sent: bool = True) -> None:
        data = wire.encode(msg) if self.encode else None  # raises ProtocolError like TCP would
        if data is not None:
            self.bytes_sent += len(data)
        lost = self.rng.random() < self.drop
        lo, hi = self.delay
        latency = self.rng.uniform(lo, hi)
        dup = self.rng.random() < self.duplicate
        name = wire.NAMES.get(msg.code, str(msg.code))
        if lost and kind != "refused":  # a refusal is the local TCP stack's answer: never lost
            self.trace.append((self.now, "drop", src, dst, name, msg.rid))
            return
        at = self.now + latency
        if self.fifo:
            at = max(at, self._last_delivery.get((src, dst), 0.0))
            self._last_delivery[(src, dst)] = at
        env = _Envelope(kind, src, dst, msg, data, sent)
        self.trace.append((self.now, "send", src, dst, name, msg.rid))
        self._schedule(at, env)
        if dup:
            self._schedule(at + self.rng.uniform(lo, hi), env)

    def _schedule(self, at: float, env: _Envelope) -> None:
        # Our own heap ordered by (time, send sequence), one loop timer for its head: asyncio's
        # heap leaves the order of equal times unspecified, and fifo=True needs send order.
        heapq.heappush(self._events, (at, next(self._seq), env))
        if self._timer is not None and at < self._timer.when():
            self._timer.cancel()
            self._timer = None
        if self._timer is None and not self._pumping:
            self._timer = self.loop.call_at(at, self._pump)

    def _pump(self) -> None:
        self._timer = None
        self._pumping = True
        try:
            # asyncio fires a timer up to its clock resolution early; the slack keeps a head
            # that is due "now" from being re-armed for a 0-second wait forever.
            while self._events and self._events[0][0] <= self.now + 1e-9:
                _, _, env = heapq.heappop(self._events)
                self._deliver(env)
        finally:
            self._pumping = False
            if self._events:
                self._timer = self.loop.call_at(self._events[0][0], self._pump)

    def _deliver(self, env: _Envelope) -> None:
        name = wire.NAMES.get(env.msg.code, str(env.msg.code))
        if (env.src, env.dst) in self._blocked and env.kind != "refused":
            self.trace.append((self.now, "cut", env.src, env.dst, name, env.msg.rid))
            return
        msg = env.msg
        if env.data is not None:
            (msg,) = wire.FrameDecoder().feed(env.data)
        self.trace.append((self.now, "deliver", env.src, env.dst, name, msg.rid))
        if env.kind == "req":
            served = self._servers.get(env.dst)
            if served is None:
                # the server went away after the request left: like a TCP reset
                self._send("refused", env.dst, env.src, msg, sent=True)
            else:
                served[0]._handle(env.src, msg, served[1])
        elif env.kind in ("rep", "refused"):
            t = self._transports.get(env.dst)
            if t is not None:
                t._resolve(env.src, msg, env.kind == "refused", env.sent)
        else:
            m = self._machines.get(env.dst)
            if m is not None:
                now = self.now + self.skew.get(env.dst, 0.0)
                self._emit(env.dst, m.step(now, [(env.src, msg)]))

    def _emit(self, src: str, outbox: list[tuple[str, Message]]) -> None:
        for dst, msg in outbox:
            self._send("one", src, dst, msg)


class SimTransport(Transport):
    """One node's :class:`Transport` on a :class:`SimNetwork` (same contract as TcpTransport)."""

    def __init__(
        self, net: SimNetwork, addr: str, *, max_in_flight: int = 1024, max_pending: int = 4096
    ) -> None:
        self._net = net
        self._addr = addr
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._in_flight: dict[str, int] = {}
        # handler task -> (requester, request): a crash resets these requesters' connections
        self._tasks: dict[asyncio.Task[None], tuple[str, Message]] = {}
        self._serving = 0
        self._max_in_flight = max_in_flight
        self._max_pending = max_pending
        self._closed = False

    @property
    def addr(self) -> str:
        return self._addr

    async def request(self, addr: str, msg: Message, timeout: float) -> Message:
        if self._closed:
            raise Unreachable(f"{addr}: transport closed", sent=False)
        n = self._in_flight.get(addr, 0)
        if n >= self._max_in_flight:
            raise Overloaded(f"{addr}: {n} requests in flight (limit {self._max_in_flight})")
        rid = next(self._rids)
        fut: asyncio.Future[Message] = self._net.loop.create_future()
        self._pending[rid] = fut
        self._in_flight[addr] = n + 1
        try:
            if addr not in self._net._servers:
                # connection refused: the sender learns it one network delay later, unsent
                refusal = Message(msg.code, rid, dict(msg.fields))
                self._net._send("refused", addr, self._addr, refusal, sent=False)
            else:
                self._net._send("req", self._addr, addr, Message(msg.code, rid, dict(msg.fields)))
            reply = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"{addr}: no reply to {wire.NAMES.get(msg.code, msg.code)} within {timeout:g} s"
            ) from None
        finally:
            self._pending.pop(rid, None)
            self._in_flight[addr] -= 1
        return wire.raise_for_error(reply)

    async def serve(self, addr: str, handler: Handler) -> str:
        if self._closed:
            raise RuntimeError("transport closed")
        self._net._servers[addr] = (self, handler)
        return addr

    async def close(self) -> None:
        self._shutdown("transport closed")

    # -- called by the network ----------------------------------------------------------------

    def _handle(self, src: str, msg: Message, handler: Handler) -> None:
        if msg.code not in wire.REQUESTS:
            reply = Message(
                wire.ERR_BAD_REQUEST,
                msg.rid,
                {"message": f"{wire.NAMES[msg.code]} is not a request"},
            )
            self._net._send("rep", self._addr, src, reply)
            return
        if self._serving >= self._max_pending:
            text = f"{self._serving} requests in progress (limit {self._max_pending})"
            self._net._send(
                "rep", self._addr, src, Message(wire.ERR_OVERLOADED, msg.rid, {"message": text})
            )
            return
        self._serving += 1
        task = self._net.loop.create_task(self._run_handler(src, msg, handler))
        self._tasks[task] = (src, msg)
        task.add_done_callback(lambda t: self._tasks.pop(t, None))

    async def _run_handler(self, src: str, msg: Message, handler: Handler) -> None:
        try:
            try:
                r = await handler(msg)
                reply = Message(r.code, msg.rid, dict(r.fields))
            except asyncio.CancelledError:
                return  # crashed: no reply
            except Exception as e:  # noqa: BLE001 -- the requester's error, as over TCP
                reply = wire.error_reply(msg.rid, e)
            if not self._closed:
                self._net._send("rep", self._addr, src, reply)
        finally:
            self._serving -= 1

    def _resolve(self, peer: str, msg: Message, refused: bool, sent: bool) -> None:
        fut = self._pending.get(msg.rid)
        if fut is None or fut.done():
            return  # timed out already (or a duplicate): dropped, as by TcpTransport
        if refused:
            why = "connection reset" if sent else "cannot connect: connection refused"
            fut.set_exception(Unreachable(f"{peer}: {why}", sent=sent))
        else:
            fut.set_result(msg)

    def _shutdown(self, why: str) -> None:
        if self._closed:
            return
        self._closed = True
        for a, (srv, _) in list(self._net._servers.items()):
            if srv is self:
                del self._net._servers[a]
        for task, (src, msg) in list(self._tasks.items()):
            task.cancel()
            self._net._send("refused", self._addr, src, msg, sent=True)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(Unreachable(f"{self._addr}: {why}", sent=True))


__all__ = ["SimNetwork", "SimTransport", "VirtualTimeLoop", "SimDeadlock", "Machine"]
