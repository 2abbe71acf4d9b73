"""Blocking request/reply to cluster nodes: the synchronous client's network (``shmkv.connect``).

Why a second transport beside transport.py. The client's callers are blocking code (gunicorn,
uWSGI, Celery workers). The client used to run transport.py's asyncio TcpTransport on a private
loop thread and hop to it for every call (``run_coroutine_threadsafe`` + ``Future.result``):
two thread switches, a self-pipe write and the loop's futures and timers per request -- more
than the round trip to a node on 127.0.0.1. This module does what redis-py does: a blocking
socket per node, taken from a pool by the calling thread, one ``sendall`` of a frame encoded
once, the reply read with ``recv_into`` into the connection's reusable buffer -- no event loop,
no thread hop. The framing is wire.py's; only the socket handling is here.

The contract (the same errors as ``Transport.request``, so the client's rules read one way)
-------------------------------------------------------------------------------------------
``Pool.request(addr, rid, frame, timeout)`` sends one encoded request and returns the reply
(any code: the caller applies ``wire.raise_for_error``), or raises, within ``timeout`` seconds
(plus scheduling noise, at most SLACK):

==========================  ==========================================================================
:class:`RequestTimeout`     the whole request left, no whole reply came in time: it may have been
                            applied.
``Unreachable(sent=False)`` no connection within the timeout, or the frame did not leave whole (a
                            frame cut short cannot be decoded by the node, so it was not applied).
``Unreachable(sent=True)``  the connection broke, or the node answered something that is not a
                            reply to this request, after the whole request left.
==========================  ==========================================================================

``Pool.fan_out([(addr, rid, frame), ...], timeout)`` sends every request first, then reads every
reply, under one deadline: one round trip to several nodes at once from one thread (the
batches, STATUS and the local-read facts of every member). Each result is the reply or the
exception above.

Connections
-----------
- One request at a time per connection: a thread owns a connection from ``take`` to ``give``,
  so nothing is multiplexed and a reply is the next frame on the socket. Idle connections wait in
  a pool per address (last in, first out; at most ``max_idle`` kept), so a client shared by T
  threads holds up to T connections per node, as redis-py's pool does.
- Any failure closes the connection instead of giving it back. On a timeout the reply may still
  be coming: the rejected alternative, keeping the connection and skipping the late reply by its
  rid, would make the next request wait behind a stopped node's answer.
- Before an idle connection is reused it is polled: readable means the node closed it (it was
  restarted between calls) or sent something unasked (its one BAD_REQUEST before hanging up), and
  the connection is closed and another taken. So a request is never written into a connection
  already dead, which for a write would be reported "may have been applied" for nothing.
- A reply frame longer than ``max_frame`` (wire.MAX_FRAME), a bad version byte or a malformed body
  closes the connection: ``Unreachable(sent=True)``.
- Per request on a reused connection, three syscalls: the poll above, one ``sendall``, one
  ``recv_into`` when the reply comes whole (``Conn.call``: the common case in one place; a slow
  send, a reply in pieces or with more behind it go on in ``Conn.recv``). The kernel timeouts
  are re-set only when a request's budget drifts from the last one by more than SLACK.

Thread safety: the idle lists are under the pool's lock (``_lock``, the only lock here); a
connection belongs to one thread between ``take`` and ``give``. Fork: :meth:`Pool.reset` in the
child (the client registers it with ``os.register_at_fork``) forgets the parent's connections --
their sockets are the parent's conversations -- and makes a new lock (one another thread held at
the fork would stay locked forever in the child).
"""

from __future__ import annotations

import itertools
import math
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgpack

from . import wire
from .errors import ClusterError, ProtocolError
from .transport import RequestTimeout, Unreachable, split_addr
from .wire import HEADER, LENGTH, MAX_FRAME, WIRE_VERSION, Message

#: Bytes of a connection's reusable receive buffer; a longer reply gets a buffer of its own.
BUFFER = 64 * 1024
#: Idle connections kept per node address (more are closed when given back).
MAX_IDLE = 64
#: Seconds a request may overrun its timeout before the socket's own timeout is re-set (a
#: ``settimeout`` is a syscall; a request on a reused connection skips it).
SLACK = 0.001

_TIMEVAL = struct.Struct("@ll")  # struct timeval (Linux): seconds, microseconds
_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


#: Request ids of this process's requests (each connection carries one request at a time, so
#: any unique number will do; a reply with another is not the answer to this request).
_RIDS = itertools.count(1)
_packers = threading.local()  # a msgpack.Packer keeps a buffer: one per thread (not shared)


def frame(code: int, fields: dict[str, Any]) -> tuple[int, bytes]:
    """(a new rid, the request's frame): encoded once, sent to whichever node takes it. The
    client builds the fields itself, so wire.encode_parts' schema check is left out of this hot
    path (the node checks every request it gets).

    :raises ProtocolError: a frame over MAX_FRAME (the node would refuse it).
    """
    rid = next(_RIDS) & wire.MAX_RID
    try:
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = msgpack.Packer(use_bin_type=True).pack
    try:
        body = pack([code, rid, fields])
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"{wire.NAMES[code]}: cannot encode fields: {e}") from None
    if len(body) > BUFFER:
        del _packers.pack  # a Packer keeps its grown buffer: not for a big value's whole life
    if len(body) >= MAX_FRAME:
        raise ProtocolError(
            f"{wire.NAMES[code]}: frame of {len(body) + 1} bytes exceeds the limit of {MAX_FRAME}"
        )
    return rid, HEADER.pack(len(body) + 1, WIRE_VERSION) + body


class Conn:
    """One blocking TCP connection to one node; see the module docstring."""

    __slots__ = ("addr", "sock", "view", "poller", "timeout", "dirty")

    def __init__(self, addr: str, deadline: float) -> None:
        """Connect to ``addr`` before ``deadline`` (time.monotonic()).

        :raises Unreachable: refused, or not connected in time (``sent=False``).
        """
        self.addr = addr
        left = deadline - time.monotonic()
        if left <= 0:
            raise Unreachable(f"{addr}: no time left to connect", sent=False)
        try:
            host, port = split_addr(addr)
            sock = socket.create_connection((host, port), timeout=left)
        except TimeoutError:
            raise Unreachable(f"{addr}: cannot connect within {left:.3g} s", sent=False) from None
        except (OSError, ValueError) as e:
            raise Unreachable(f"{addr}: cannot connect: {e}", sent=False) from None
        # Requests are single small frames waiting for their answer: Nagle would hold them back.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A blocking socket whose timeouts the kernel keeps (SO_RCVTIMEO/SO_SNDTIMEO): each send
        # and recv is one syscall. Rejected: Python's settimeout(), which makes every one a
        # poll() and then the call -- twice the syscalls on the hot path.
        sock.settimeout(None)
        self.sock = sock
        self.timeout = 0.0  # the kernel timeouts now set (0: none yet; _left sets them)
        self.view = memoryview(bytearray(BUFFER))
        self.poller = select.poll()
        self.poller.register(sock.fileno(), _READABLE)
        self.dirty = False

    def idle_ok(self) -> bool:
        """Whether the idle connection may carry a request: nothing to read, no hang-up."""
        try:
            return not self.poller.poll(0)
        except (OSError, ValueError):
            return False

    def _left(self, deadline: float) -> float:
        """What is left before ``deadline`` (<= 0: nothing), the socket's kernel timeouts set to
        it unless they are within SLACK of it already -- so a request on a reused connection,
        whose budget is the same every time, sets nothing."""
        left = deadline - time.monotonic()
        if left > 0 and abs(self.timeout - left) > SLACK:
            # whole microseconds, rounded up: 0 would mean "no timeout" to the kernel
            sec, usec = divmod(max(1, math.ceil(left * 1e6)), 1_000_000)
            tv = _TIMEVAL.pack(sec, usec)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            self.timeout = left
        return left

    def send(self, frame: bytes, deadline: float) -> None:
        """Write the whole frame. :raises Unreachable: (``sent=False``) it did not leave whole."""
        if self._left(deadline) <= 0:
            raise Unreachable(f"{self.addr}: no time left to send", sent=False)
        try:
            self.sock.sendall(frame)
        except BlockingIOError:  # SO_SNDTIMEO ran out
            raise Unreachable(f"{self.addr}: request not sent in time (node not reading)", sent=False) from None
        except OSError as e:
            raise Unreachable(f"{self.addr}: connection lost before the request left: {e}", sent=False) from None

    def call(self, frame: bytes, rid: int, deadline: float, max_frame: int = MAX_FRAME) -> Message:
        """:meth:`send` then :meth:`recv` (Pool.request), the same contract, with the common
        case in one place: the kernel timeouts already right, the whole reply in the first read.
        Anything else -- a timeout to re-set after a slow send, a reply in pieces or with more
        behind it -- goes on in :meth:`recv` from the bytes read so far."""
        left = deadline - time.monotonic()
        if left <= 0 or abs(self.timeout - left) > SLACK:
            self.send(frame, deadline)
            return self.recv(rid, deadline, max_frame)
        sock = self.sock
        try:
            sock.sendall(frame)
        except BlockingIOError:  # SO_SNDTIMEO ran out
            raise Unreachable(f"{self.addr}: request not sent in time (node not reading)", sent=False) from None
        except OSError as e:
            raise Unreachable(f"{self.addr}: connection lost before the request left: {e}", sent=False) from None
        left = deadline - time.monotonic()
        if left <= 0 or self.timeout - left > SLACK:  # the send took a while: recv re-sets them
            return self.recv(rid, deadline, max_frame)
        view = self.view
        try:
            have = sock.recv_into(view)
        except BlockingIOError:  # SO_RCVTIMEO ran out (EAGAIN); before OSError: it is one
            raise RequestTimeout(f"{self.addr}: no reply within the request's timeout") from None
        except OSError as e:
            raise Unreachable(f"{self.addr}: connection lost: {e}", sent=True) from None
        if not have:
            raise Unreachable(f"{self.addr}: connection lost: closed by the node", sent=True)
        if have >= 5 and LENGTH.unpack_from(view, 0)[0] + 4 == have and have - 4 <= max_frame:
            return self._reply(view, have, have, rid)  # exactly one frame: the common reply
        return self.recv(rid, deadline, max_frame, have)

    def recv(self, rid: int, deadline: float, max_frame: int = MAX_FRAME, have: int = 0) -> Message:
        """The reply to request ``rid``: the next frame on the connection, whatever its code
        (``have``: bytes of it already read into the buffer, by :meth:`call`).

        Invariant: ``have`` bytes of the frame are in ``view``; once the length is known
        (``end`` > 0) no read asks for more than the frame, so nothing of a later frame is read.
        """
        view = self.view
        sock = self.sock
        end = 0
        try:
            while not end or have < end:
                if have >= 4 and not end:
                    (length,) = LENGTH.unpack_from(view, 0)
                    if length == 0 or length > max_frame:
                        raise ProtocolError(f"frame length {length} outside [1, {max_frame}]")
                    end = 4 + length
                    if end > len(view):  # a large reply: a buffer of its own, not kept
                        big = memoryview(bytearray(end))
                        big[:have] = view[:have]
                        view = big
                    continue
                if self._left(deadline) <= 0:
                    raise BlockingIOError
                n = sock.recv_into(view[have : end or len(view)])
                if not n:
                    raise ConnectionResetError("closed by the node")
                have += n
        except BlockingIOError:  # SO_RCVTIMEO ran out (EAGAIN); before OSError: it is one
            raise RequestTimeout(f"{self.addr}: no reply within the request's timeout") from None
        except ProtocolError as e:
            raise Unreachable(f"{self.addr}: the node sent a malformed reply: {e}", sent=True) from None
        except OSError as e:
            raise Unreachable(f"{self.addr}: connection lost: {e}", sent=True) from None
        return self._reply(view, end, have, rid)

    def _reply(self, view: memoryview, end: int, have: int, rid: int) -> Message:
        """The reply in ``view[:end]`` (``have`` bytes read), checked to answer request ``rid``."""
        try:
            if view[4] != WIRE_VERSION:
                raise ProtocolError(f"wire version {view[4]}, this client speaks {WIRE_VERSION}")
            msg = wire.decode_body(view[5:end])
        except ProtocolError as e:
            raise Unreachable(f"{self.addr}: the node sent a malformed reply: {e}", sent=True) from None
        if msg.rid != rid:
            if msg.rid == 0 and msg.code == wire.ERR_BAD_REQUEST:
                why = f"the node refused our stream: {msg.fields.get('message')}"
            else:
                why = f"a reply to request {msg.rid} came for {rid}"
            raise Unreachable(f"{self.addr}: {why}", sent=True)
        # More than the reply was read (only a length-less first read can): something unasked
        # followed it, and the stream may be cut mid-frame -- never reuse the connection.
        self.dirty = have > end
        return msg

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Pool:
    """Idle connections per node address, shared by the threads of one client."""

    def __init__(self, max_idle: int = MAX_IDLE, max_frame: int = MAX_FRAME) -> None:
        self.max_idle = max_idle
        self.max_frame = max_frame
        self.closed = False
        self._idle: dict[str, list[Conn]] = {}  # under _lock
        self._lock = threading.Lock()

    def take(self, addr: str, deadline: float) -> Conn:
        """An idle connection to ``addr`` that passed the poll, or a new one.

        :raises Unreachable: no connection (``sent=False``). :raises ClusterError: closed pool.
        """
        while True:
            if self.closed:
                raise ClusterError("the client is closed")
            with self._lock:
                idle = self._idle.get(addr)
                conn = idle.pop() if idle else None
            if conn is None:
                return Conn(addr, deadline)
            if conn.idle_ok():
                return conn
            conn.close()

    def give(self, conn: Conn) -> None:
        """Return a connection whose last reply was read whole."""
        if conn.dirty:
            conn.close()
            return
        with self._lock:
            if not self.closed:
                idle = self._idle.setdefault(conn.addr, [])
                if len(idle) < self.max_idle:
                    idle.append(conn)
                    return
        conn.close()

    def request(self, addr: str, rid: int, frame: bytes, timeout: float) -> Message:
        """One request to ``addr``; the contract is in the module docstring."""
        deadline = time.monotonic() + timeout
        conn = None
        if not self.closed:  # take()'s common case inline: an idle connection that polls clean
            with self._lock:
                idle = self._idle.get(addr)
                if idle:
                    conn = idle.pop()
            if conn is not None and not conn.idle_ok():
                conn.close()
                conn = None
        if conn is None:
            conn = self.take(addr, deadline)
        try:
            reply = conn.call(frame, rid, deadline, self.max_frame)
        except BaseException:
            conn.close()
            raise
        if not conn.dirty:  # give(), inline
            with self._lock:
                if not self.closed:
                    idle = self._idle.setdefault(addr, [])
                    if len(idle) < self.max_idle:
                        idle.append(conn)
                        return reply
        conn.close()
        return reply

    def fan_out(
        self, requests: Sequence[tuple[str, int, bytes]], timeout: float
    ) -> list[Message | ClusterError]:
        """Every request sent, then the replies read as they come (one poll over the sockets),
        under one deadline (module docstring): a silent node costs the others nothing."""
        deadline = time.monotonic() + timeout
        out: list[Message | ClusterError | None] = [None] * len(requests)
        conns: list[Conn | None] = [None] * len(requests)
        try:
            waiting: dict[int, int] = {}  # fd -> index of a request sent, reply not yet read
            poller = select.poll()
            for i, (addr, _, frame) in enumerate(requests):
                try:
                    conn = self.take(addr, deadline)
                except Unreachable as e:
                    out[i] = e
                    continue
                conns[i] = conn
                try:
                    conn.send(frame, deadline)
                except Unreachable as e:
                    out[i] = e
                    continue
                waiting[conn.sock.fileno()] = i
                poller.register(conn.sock.fileno(), _READABLE)
            while waiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for fd, _ in poller.poll(max(1, int(left * 1000))):
                    i = waiting.pop(fd)
                    poller.unregister(fd)
                    ready = conns[i]
                    assert ready is not None
                    try:
                        out[i] = ready.recv(requests[i][1], deadline, self.max_frame)
                    except (Unreachable, RequestTimeout) as e:
                        out[i] = e
                    else:
                        conns[i] = None
                        self.give(ready)
            for i in waiting.values():
                out[i] = RequestTimeout(f"{requests[i][0]}: no reply within {timeout:g} s")
        finally:
            for left_open in conns:  # every one not given back had a failure (or we were interrupted)
                if left_open is not None:
                    left_open.close()
        return out  # type: ignore[return-value]  # every slot is filled

    def close(self) -> None:
        """Close every idle connection; connections in use are closed when given back."""
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def reset(self) -> None:
        """In a forked child: forget the parent's connections (see the module docstring)."""
        self._lock = threading.Lock()
        self._idle = {}


__all__ = ["Conn", "Pool", "frame", "BUFFER", "MAX_IDLE"]
