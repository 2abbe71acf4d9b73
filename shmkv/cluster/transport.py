"""Messages between daemons: the abstract :class:`Transport` and :class:`TcpTransport` over asyncio.

This is the only file in shmkv that opens sockets between daemons. Everything above it (the
coordinator, later gossip, handoff and Raft) talks to a ``Transport``, so the simulated network
of tests/cluster/sim.py can replace this one and run the same code in virtual time.

The contract every Transport keeps
----------------------------------
- ``await request(addr, msg, timeout)`` sends one request and returns its reply (a
  :class:`~shmkv.cluster.wire.Message` with code OK), or raises, always within ``timeout``
  seconds (plus scheduling noise), never later:

  ==========================  ======================================================================
  :class:`RequestTimeout`     no reply in time. The request may have been delivered and applied.
  :class:`Unreachable`        no connection (refused, or not made within ``timeout``), or it
                              broke. ``sent`` says whether the request may have left this host
                              (False: it certainly was not applied).
  ``wire.Overloaded``         too many requests in flight to that peer here, or the peer said so.
  the error a reply carries   ``wire.raise_for_error``: WrongEpoch, QuorumError, MaybeApplied,
                              Conflict, BadRequest, RemoteError...
  ==========================  ======================================================================

  ``msg.rid`` is ignored: the transport numbers requests itself (per connection) and the reply
  comes back with that number.
- ``await serve(addr, handler)`` answers requests arriving at ``addr`` (``"host:port"``, port 0 for
  an ephemeral one) with ``await handler(msg)`` and returns the address actually bound. A handler
  that raises answers with ``wire.error_reply`` of the exception; the connection lives on.
- ``await close()`` stops serving, fails requests in flight with Unreachable, and closes every
  connection. Idempotent.

TcpTransport
------------
- One pool per peer address of up to ``connections_per_peer`` connections (default 1: requests
  are multiplexed by request id, so one connection carries any number of them and replies may
  come back in any order); a request takes the pooled connection with the fewest in flight and
  opens another while the pool is not full and every connection is busy.
- Bounded queues instead of unbounded growth. Client side: at most ``max_in_flight`` requests per
  peer; the next raises Overloaded at once. Server side: at most ``max_pending`` requests being
  handled across all connections; the next is answered ERR_OVERLOADED at once. A connection's
  reader waits for the socket's write buffer to drain before it reads more, so a peer that sends
  but never reads is slowed by TCP, not buffered without limit.
- A timeout forgets the request id: a late reply (a SIGSTOPped peer that resumes) finds no waiter
  and is dropped, so the connection stays usable. The rejected alternative, closing the
  connection on timeout, would fail every other request multiplexed on it.
- A connection that breaks fails its requests with ``Unreachable(sent=True)`` and leaves the
  pool; the next request to that peer connects anew, so a restarted peer is reached without any
  reconnect loop. A frame the peer cannot parse (garbage on the port) is answered with one
  ERR_BAD_REQUEST (rid 0) and the connection is closed; the server keeps serving everyone else.

- The sender's address: while a handler runs (its first step, and any Task it goes on in),
  :data:`PEER_HOST` holds the IP the request's connection came from (None on a transport that
  does not know, e.g. the simulated ones). :func:`pinned_source` says for which member
  addresses that IP is a fact about the sender: gossip.py uses the pair to refuse a GOSSIP
  claiming to come from a member at an address it was not sent from.

Thread safety: none; one event loop owns a transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import ipaddress
import itertools
import math
import types
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

from . import wire
from .errors import ClusterError, ProtocolError
from .wire import Message, Overloaded

Handler = Callable[[Message], Awaitable[Message]]
T = TypeVar("T")

#: the source IP of the connection whose request the running handler answers (module docstring)
PEER_HOST: contextvars.ContextVar[str | None] = contextvars.ContextVar("shmkv_peer_host", default=None)


def pinned_source(addr: str) -> str | None:
    """The source IP every connection from the daemon listening at ``addr`` carries: the
    daemon binds its outgoing connections to its listen address (``TcpTransport(source=...)``,
    daemon.py) whenever that is one IP address of this host -- a routable IPv4 or IPv6 address,
    or a loopback one other than 127.0.0.1 (several nodes on one host's 127.0.0.x, as the
    torture harness runs them) -- so a peer can check that a message naming a member came
    from that member's address (gossip.py), and firewall rules can cut one node's traffic.
    None where the source proves nothing: 127.0.0.1 and ::1 (every process on the host shares
    them), a wildcard (0.0.0.0, ::), a hostname (it may resolve to several addresses).
    Cassandra binds its internode connections to its listen_address the same way."""
    host, _ = split_addr(addr)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # a hostname
    if ip.is_unspecified or str(ip) in ("127.0.0.1", "::1") or ip.is_multicast:
        return None
    return str(ip)


def _peer_host(writer: asyncio.StreamWriter) -> str | None:
    peer = writer.get_extra_info("peername")
    if not peer:
        return None
    host = str(peer[0])
    return host[7:] if host.startswith("::ffff:") else host  # an IPv4-mapped IPv6 address


READ_CHUNK = 256 * 1024
#: Bytes queued in a connection's socket buffer above which a request waits for the peer to
#: read (asyncio's own default high-water mark is 64 KiB).
WRITE_HIGH_WATER = 1024 * 1024


def _expire(fut: asyncio.Future[Any], message: str) -> None:
    if not fut.done():
        fut.set_exception(RequestTimeout(message))


class RequestTimeout(ClusterError, TimeoutError):
    """No reply within the request's timeout; the request may have been applied by the peer."""


class Unreachable(ClusterError, ConnectionError):
    """The peer could not be reached, or the connection broke with the request in flight.

    ``sent`` is False when the request certainly never left this host (the connect failed), True
    when it may have reached the peer (and, for a write, may have been applied).
    """

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class Transport(ABC):
    """Request/reply messaging between nodes; see the module docstring for the contract."""

    @abstractmethod
    async def request(self, addr: str, msg: Message, timeout: float) -> Message:
        """Send ``msg`` to the node at ``addr`` and return its OK reply (or raise, within ``timeout``)."""

    def send(self, addr: str, msg: Message, timeout: float) -> asyncio.Future[Message]:
        """:meth:`request` as a future, started now: the coordinator's fan-out waits on many
        replies with a callback each instead of a Task each. Never raises; the future holds
        what ``request`` would raise. This default runs ``request`` in a Task (the simulated
        networks use it: same order as before, deterministic); TcpTransport sends on a ready
        pooled connection without any Task."""
        return asyncio.get_running_loop().create_task(self.request(addr, msg, timeout))

    @abstractmethod
    async def serve(self, addr: str, handler: Handler) -> str:
        """Answer requests at ``addr`` with ``handler``; return the bound ``host:port``."""

    @abstractmethod
    async def close(self) -> None:
        """Stop serving and drop every connection; requests in flight raise Unreachable."""


def split_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:7401"`` for IPv6) -> (host, port).

    :raises ValueError: no port, or a port that is not an int in [0, 65535].
    """
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {addr!r} is not host:port")
    return host.strip("[]"), int(port)


def join_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed, on asyncio's default loop otherwise.

    uvloop is optional (``pip install shmkv[fast]``): it only makes the same code faster.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def start_eager(coro: Coroutine[Any, Any, T]) -> tuple[bool, Any]:
    """Run ``coro`` now, up to its first real wait: ``(True, result)`` when it finished without
    waiting (no Task was made), else ``(False, task)`` with a Task that goes on from where it
    stopped. An exception ``coro`` raises before its first wait is raised here.

    Why: most requests a daemon serves never wait (a replica request, a 1-node or R=1/W=1
    client request answered from the local copy), and a Task per request plus its wake-up is a
    good part of their cost. Python 3.12's ``eager_task_factory`` does the same for every Task;
    this is the explicit, per-call form (3.10+). The coroutine's first step runs in the caller's
    context and stack, so callers use it where running the handler inline is what they want
    (order of commands kept; the handler itself never blocks).
    """
    try:
        first = coro.send(None)
    except StopIteration as e:
        return True, e.value
    return False, asyncio.get_running_loop().create_task(_resume(coro, first))


@types.coroutine
def _resume(coro: Coroutine[Any, Any, T], first: Any) -> Generator[Any, None, T]:
    """Go on with ``coro``, suspended on ``first`` (what it yielded to the event loop): hand
    ``first`` to the Task, then resume ``coro`` the way a Task would (``send(None)`` after a
    wake-up, ``throw`` for what the Task throws in, e.g. its cancellation)."""
    while True:
        try:
            yield first
        except BaseException as e:  # noqa: BLE001 -- thrown in by the Task: forward it
            try:
                first = coro.throw(e)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            continue
        try:
            first = coro.send(None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


class _Out:
    """Write coalescing for one stream: the frames written to it within one loop iteration go
    out in one ``write`` (one syscall) at the end of the iteration, in the order they were
    written. A coordinator answering 50 clients in one iteration sends a replica one write of
    50 frames instead of 50 writes.

    Invariant: ``frames`` holds, in order, every frame written since the last flush; a flush is
    scheduled whenever it is not empty -- or, while ``held``, is sure to come: the server side
    sets ``held`` for the frames of one read (_ServerConn.data_received), whose replies it
    flushes itself right after, so the reply of a request answered at once costs no callback
    on the loop; whoever closes the stream flushes first, so a frame is never lost to a close
    (only to a connection that is already broken).
    """

    __slots__ = ("writer", "frames", "size", "scheduled", "held")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.frames: list[bytes] = []
        self.size = 0
        self.scheduled = False
        self.held = False

    def write(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.size += len(frame)
        if not self.scheduled and not self.held:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        frames = self.frames
        if not frames:
            return
        self.frames = []
        self.size = 0
        writer = self.writer
        if writer.is_closing():
            return  # broken or closed: the requests in flight on it fail as Unreachable
        try:
            writer.write(frames[0] if len(frames) == 1 else b"".join(frames))
        except (OSError, RuntimeError):
            writer.close()  # the reader sees it end and fails what is in flight

    def backlog(self) -> int:
        """Bytes not yet taken by the peer: buffered here and in the socket's write buffer."""
        return self.size + self.writer.transport.get_write_buffer_size()


class _ServerConn(asyncio.Protocol):
    """One accepted connection, served from ``data_received``: the frames of each read are
    dispatched at once (TcpTransport._dispatch: a handler that never waits is answered
    without a Task) and the replies known by then go out in one write. Rejected: a reader
    Task over asyncio streams, as before -- a future and a Task wake-up per read, a good part
    of the cost of one small request.

    Backpressure: while the socket's write buffer is above the loop's high-water mark
    (``pause_writing``), the connection is not read, so a peer that sends but never reads is
    slowed by TCP, not buffered without limit. Invariant: ``out`` holds only frames not yet
    written; a ProtocolError answers once (rid 0) and closes; nothing is read after that.
    """

    def __init__(self, owner: TcpTransport, handler: Handler) -> None:
        self.owner = owner
        self.handler = handler
        self.decoder = wire.FrameDecoder(owner._max_frame)
        self.transport: asyncio.Transport | None = None
        self.out: _Out | None = None
        self.closed = False
        self.peer_host: str | None = None
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.peer_host = _peer_host(transport)  # type: ignore[arg-type]  # get_extra_info only
        self.out = _Out(_TransportWriter(self.transport))  # type: ignore[arg-type]
        self.owner._server_conns.add(self)

    def data_received(self, data: bytes) -> None:
        out = self.out
        if self.closed or out is None:
            return
        try:
            msgs = self.decoder.feed(data)
        except ProtocolError as e:
            # The stream cannot be re-synchronised: say why once, then hang up.
            out.write(wire.encode(wire.error_reply(0, e)))
            self.close()
            return
        dispatch, handler = self.owner._dispatch, self.handler
        # PEER_HOST: this connection's source IP, for every handler these frames start (a
        # handler that waits goes on in a Task, which copies the context as it is here)
        token = PEER_HOST.set(self.peer_host)
        out.held = True  # the flush below sends what these frames answer at once (_Out)
        try:
            for msg in msgs:
                dispatch(msg, out, handler)
        finally:
            PEER_HOST.reset(token)
            out.held = False
            # The replies known at once (most: replica requests never wait) go out now, in
            # one write with any that completed meanwhile.
            out.flush()

    def eof_received(self) -> bool | None:
        return None  # the peer is done sending: close (replies still in flight are dropped)

    def pause_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.owner._server_conns.discard(self)
        if not self._lost.done():
            self._lost.set_result(None)

    def close(self) -> None:
        """Write what is queued, then close."""
        self.closed = True
        if self.out is not None:
            self.out.flush()
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._lost), 1.0)


class _TransportWriter:
    """What _Out needs of a StreamWriter, over a bare transport (the server side's)."""

    __slots__ = ("transport", "write", "is_closing", "close")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.write = transport.write
        self.is_closing = transport.is_closing
        self.close = transport.close


class _Conn:
    """One client connection: writes requests, a reader task resolves their futures by rid.

    Invariant: every future in ``pending`` is resolved exactly once -- by its reply (an error
    reply as the exception it carries, wire.raise_for_error), by the connection breaking
    (Unreachable), or it is removed by its requester on timeout.
    """

    __slots__ = ("addr", "reader", "writer", "out", "pending", "rids", "task", "closed", "max_frame")

    def __init__(
        self, addr: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int
    ) -> None:
        self.addr = addr
        self.reader = reader
        self.writer = writer
        self.out = _Out(writer)
        self.pending: dict[int, asyncio.Future[Message]] = {}
        self.rids = itertools.count(1)  # rid 0 is the server's unsolicited BAD_REQUEST
        self.closed = False
        self.max_frame = max_frame
        self.task: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        decoder = wire.FrameDecoder(self.max_frame)
        why = "connection closed by the peer"
        errors = wire.ERRORS
        try:
            while True:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                for msg in decoder.feed(data):
                    fut = self.pending.pop(msg.rid, None)
                    if fut is not None and not fut.done():
                        if msg.code in errors:
                            try:
                                wire.raise_for_error(msg)
                            except Exception as e:  # noqa: BLE001 -- the error the reply carries
                                fut.set_exception(e)
                        else:
                            fut.set_result(msg)
                    elif msg.rid == 0 and msg.code == wire.ERR_BAD_REQUEST:
                        why = f"the peer refused our stream: {msg.fields.get('message')}"
                    # else: a reply whose requester timed out; dropped on purpose
        except ProtocolError as e:
            why = f"the peer sent a malformed stream: {e}"
        except asyncio.CancelledError:
            why = "transport closed"  # only close() cancels us
            raise
        except (ConnectionError, OSError) as e:
            why = f"connection lost: {e}"
        finally:
            self._fail_all(why)

    def _fail_all(self, why: str) -> None:
        self.closed = True
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(Unreachable(f"{self.addr}: {why}", sent=True))
        self.out.flush()  # (dropped if the stream is already broken)
        self.writer.close()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        self._fail_all("transport closed")
        await _wait_closed(self.writer)


def _sent_done(pool: _Pool, conn: _Conn, rid: int, _fut: asyncio.Future[Message]) -> None:
    """A request of :meth:`TcpTransport.send` is resolved: what ``_request``'s finally does."""
    conn.pending.pop(rid, None)  # on timeout the rid is forgotten; a late reply is dropped
    pool.in_flight -= 1


#: Deadline granularity of :meth:`TcpTransport.send`: its requests' timeouts share one timer
#: per tick (a timer per request -- create, then cancel -- cost ~2.7 us each, more than the rest
#: of a send). A request times out at the end of its deadline's tick: never early, at most one
#: tick late (well inside "scheduling noise").
DEADLINE_TICK = 0.005


async def _wait_closed(writer: asyncio.StreamWriter) -> None:
    """Let the loop really close the socket (not at garbage collection, with a ResourceWarning)."""
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)


class _Pool:
    __slots__ = ("conns", "connecting", "in_flight")

    def __init__(self) -> None:
        self.conns: list[_Conn] = []
        self.connecting: asyncio.Task[_Conn] | None = None
        self.in_flight = 0


class TcpTransport(Transport):
    """:class:`Transport` over TCP, framed by wire.py: asyncio streams on the client side, a
    Protocol per accepted connection on the server side (_ServerConn)."""

    def __init__(
        self,
        *,
        connections_per_peer: int = 1,
        max_in_flight: int = 1024,
        max_pending: int = 4096,
        max_frame: int = wire.MAX_FRAME,
        reuse_port: bool = False,
        source: str | None = None,
    ) -> None:
        """
        :param connections_per_peer: pooled connections per peer address (>= 1).
        :param max_in_flight: requests in flight to one peer before ``request`` raises Overloaded.
        :param max_pending: requests being handled by ``serve``'s handlers (all connections)
            before new ones are answered ERR_OVERLOADED.
        :param max_frame: largest frame accepted or sent (wire.MAX_FRAME).
        :param reuse_port: ``serve`` binds with SO_REUSEPORT, so several worker processes of
            one node (``--workers K``) accept on the same port and the kernel spreads the
            connections among them.
        :param source: bind outgoing connections to this local address (port 0), so peers and
            firewall rules see the node's own address as the source; the daemon sets it for a
            node listening on a loopback address other than 127.0.0.1 (several nodes on one
            host's loopback, as the torture harness's network namespace runs them).
        """
        if connections_per_peer < 1 or max_in_flight < 1 or max_pending < 1:
            raise ValueError("connections_per_peer, max_in_flight and max_pending must be >= 1")
        self._per_peer = connections_per_peer
        self._max_in_flight = max_in_flight
        self._max_pending = max_pending
        self._max_frame = max_frame
        self._reuse_port = reuse_port
        self._source = source
        self._pools: dict[str, _Pool] = {}
        #: send()'s deadlines: tick -> its requests (future, addr, code, timeout), one timer each
        self._due: dict[int, list[tuple[asyncio.Future[Message], str, int, float]]] = {}
        self._connecting: set[asyncio.Task[_Conn]] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._server_conns: set[_ServerConn] = set()
        self._handler_tasks: set[asyncio.Task[None]] = set()
        # requests being handled by serve()'s handlers. Invariant: 0 <= _pending <= _max_pending
        self._pending = 0
        self._closed = False

    # -- client side ------------------------------------------------------------------------

    async def request(self, addr: str, msg: Message, timeout: float) -> Message:
        if self._closed:
            raise Unreachable(f"{addr}: transport closed", sent=False)
        pool = self._pools.get(addr)
        if pool is None:
            pool = self._pools[addr] = _Pool()
        if pool.in_flight >= self._max_in_flight:
            raise Overloaded(
                f"{addr}: {pool.in_flight} requests in flight (limit {self._max_in_flight})"
            )
        pool.in_flight += 1
        try:
            return await self._request(addr, pool, msg, timeout)
        finally:
            pool.in_flight -= 1

    def send(self, addr: str, msg: Message, timeout: float) -> asyncio.Future[Message]:
        # The common case without a Task: a ready pooled connection with room in its buffers.
        # Anything else (connect first, wait for the peer to read, closed, overloaded) is the
        # coroutine path's, in a Task.
        loop = asyncio.get_running_loop()
        pool = self._pools.get(addr)
        conn = None
        if pool is not None and not self._closed and pool.in_flight < self._max_in_flight:
            conn = self._ready(pool)
        if pool is None or conn is None or conn.closed or conn.out.backlog() > WRITE_HIGH_WATER:
            return loop.create_task(self.request(addr, msg, timeout))
        fut: asyncio.Future[Message] = loop.create_future()
        rid = next(conn.rids)
        try:
            frame = wire.encode_parts(msg.code, rid, dict(msg.fields), max_frame=self._max_frame)
        except Exception as e:  # noqa: BLE001 -- what request() would raise
            fut.set_exception(e)
            return fut
        tick = math.ceil((loop.time() + timeout) / DEADLINE_TICK)
        due = self._due.get(tick)
        if due is None:
            due = self._due[tick] = []
            loop.call_at(tick * DEADLINE_TICK, self._expire_tick, tick)
        due.append((fut, addr, msg.code, timeout))
        conn.pending[rid] = fut
        pool.in_flight += 1
        fut.add_done_callback(functools.partial(_sent_done, pool, conn, rid))
        conn.out.write(frame)
        return fut

    def _expire_tick(self, tick: int) -> None:
        """The deadlines of one tick passed: every request of it still unanswered times out."""
        for fut, addr, code, timeout in self._due.pop(tick, ()):
            if not fut.done():
                fut.set_exception(RequestTimeout(
                    f"{addr}: no reply to {wire.NAMES.get(code, code)} within {timeout:g} s"
                ))

    async def _request(self, addr: str, pool: _Pool, msg: Message, timeout: float) -> Message:
        # One deadline for connect + send + reply. On the common path (a pooled connection,
        # socket buffer not full) the wait is a timer on the reply future rather than
        # asyncio.wait_for, which wraps every request in a Task of its own (about a third of
        # the cost of a round trip on one core).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        name = wire.NAMES.get(msg.code, msg.code)
        conn = self._ready(pool)
        if conn is None:
            try:
                conn = await asyncio.wait_for(self._conn(addr, pool), timeout)
            except asyncio.TimeoutError:
                # nothing was sent: the caller may count this request as certainly not applied
                raise Unreachable(
                    f"{addr}: cannot connect within {timeout:g} s", sent=False
                ) from None
        if conn.closed:  # broke while we waited for the connect we shared
            raise Unreachable(f"{addr}: connection lost before the request was sent", sent=False)
        rid = next(conn.rids)
        frame = wire.encode_parts(msg.code, rid, dict(msg.fields), max_frame=self._max_frame)
        fut: asyncio.Future[Message] = loop.create_future()
        conn.pending[rid] = fut
        timer = loop.call_at(
            deadline, _expire, fut, f"{addr}: no reply to {name} within {timeout:g} s"
        )
        try:
            try:
                conn.out.write(frame)  # coalesced with this iteration's other frames (_Out)
                if conn.out.backlog() > WRITE_HIGH_WATER:
                    # The peer reads slower than we write: wait for room, within the deadline.
                    conn.out.flush()
                    try:
                        await asyncio.wait_for(conn.writer.drain(), max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        raise RequestTimeout(
                            f"{addr}: {name} not even sent within {timeout:g} s (peer not reading)"
                        ) from None
            except (Unreachable, RequestTimeout):
                raise
            except (ConnectionError, OSError) as e:
                raise Unreachable(f"{addr}: connection lost: {e}", sent=True) from None
            # the reader resolves it: the reply, the error the reply carries, or Unreachable
            return await fut
        finally:
            timer.cancel()
            # on timeout the rid is forgotten; a late reply finds no waiter and is dropped
            conn.pending.pop(rid, None)

    def _ready(self, pool: _Pool) -> _Conn | None:
        """A pooled connection to use right away, or None when one should be opened first:
        the pool is empty, or every connection is busy and there is room for another."""
        best: _Conn | None = None
        stale = False
        for c in pool.conns:
            if c.closed:
                stale = True
            elif best is None or len(c.pending) < len(best.pending):
                best = c
        if stale:
            pool.conns = [c for c in pool.conns if not c.closed]
        if best is not None and (
            not best.pending or len(pool.conns) >= self._per_peer or pool.connecting is not None
        ):
            return best
        return None

    async def _conn(self, addr: str, pool: _Pool) -> _Conn:
        """A live pooled connection to ``addr``, opening one if :meth:`_ready` says so."""
        ready = self._ready(pool)
        if ready is not None:
            return ready
        busy = min(pool.conns, key=lambda c: len(c.pending), default=None)
        if pool.connecting is None:
            # The connect runs as its own task, shared by every request that waits for it: a
            # requester that times out must not cancel it under the others (they would see a
            # CancelledError that is not theirs), and a slow connect still serves later ones.
            task = asyncio.get_running_loop().create_task(self._connect(addr))
            task.add_done_callback(lambda t: self._connected(pool, t))
            pool.connecting = task
            self._connecting.add(task)
        try:
            return await asyncio.shield(pool.connecting)
        except Unreachable:
            if busy is not None and not busy.closed:
                return busy  # an extra connection failed; the pooled one still works
            raise

    def _connected(self, pool: _Pool, task: asyncio.Task[_Conn]) -> None:
        pool.connecting = None
        self._connecting.discard(task)
        if task.cancelled() or task.exception() is not None:  # exception() marks it retrieved
            return
        conn = task.result()
        if self._closed:
            conn.writer.close()
        else:
            pool.conns.append(conn)

    async def _connect(self, addr: str) -> _Conn:
        host, port = split_addr(addr)
        try:
            reader, writer = await asyncio.open_connection(
                host, port, limit=READ_CHUNK,
                local_addr=(self._source, 0) if self._source is not None else None,
            )
        except OSError as e:
            raise Unreachable(f"{addr}: cannot connect: {e}", sent=False) from None
        if self._closed:
            writer.close()
            raise Unreachable(f"{addr}: transport closed", sent=False)
        return _Conn(addr, reader, writer, self._max_frame)

    # -- server side ------------------------------------------------------------------------

    async def serve(self, addr: str, handler: Handler) -> str:
        if self._closed:
            raise RuntimeError("transport closed")
        host, port = split_addr(addr)

        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _ServerConn(self, handler), host, port, reuse_port=self._reuse_port or None
        )
        self._servers.append(server)
        sock_host, sock_port = server.sockets[0].getsockname()[:2]
        return join_addr(sock_host, sock_port)

    def _dispatch(self, msg: Message, out: _Out, handler: Handler) -> None:
        if msg.code not in wire.REQUESTS:
            out.write(
                wire.encode(
                    Message(
                        wire.ERR_BAD_REQUEST,
                        msg.rid,
                        {"message": f"{wire.NAMES[msg.code]} is not a request"},
                    )
                )
            )
            return
        if self._pending >= self._max_pending:
            out.write(
                wire.encode(
                    Message(
                        wire.ERR_OVERLOADED,
                        msg.rid,
                        {
                            "message": f"{self._pending} requests in progress (limit {self._max_pending})"
                        },
                    )
                )
            )
            return
        self._pending += 1
        # Run the handler at once (start_eager): one that never waits -- every replica request
        # -- is answered without a Task; one that waits goes on in a Task from there.
        done, result = start_eager(self._handle(msg, out, handler))  # _handle never raises
        if not done:
            self._handler_tasks.add(result)
            result.add_done_callback(self._handler_tasks.discard)

    async def _handle(self, msg: Message, out: _Out, handler: Handler) -> None:
        try:
            try:
                reply = await handler(msg)
                fields = reply.fields
                frame = wire.encode_parts(
                    reply.code, msg.rid, fields if type(fields) is dict else dict(fields),
                    max_frame=self._max_frame,
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 -- a handler's failure is the requester's error
                frame = wire.encode(wire.error_reply(msg.rid, e))
            if not out.writer.is_closing():
                out.write(frame)
        finally:
            self._pending -= 1

    # -- both -------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for server in self._servers:
            server.close()
        served = list(self._server_conns)
        for c in served:
            c.close()
        for task in list(self._handler_tasks):
            task.cancel()
        for connecting in list(self._connecting):
            connecting.cancel()
        conns = [c for pool in self._pools.values() for c in pool.conns]
        for conn in conns:
            await conn.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        if self._handler_tasks:
            await asyncio.gather(*self._handler_tasks, return_exceptions=True)
        for c in served:
            await c.wait_closed()
        self._pools.clear()
        self._servers.clear()


__all__ = [
    "Transport",
    "TcpTransport",
    "Handler",
    "RequestTimeout",
    "Unreachable",
    "Overloaded",
    "split_addr",
    "join_addr",
    "run",
]
