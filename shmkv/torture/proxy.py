"""A fault-injecting TCP proxy between real daemons: delay (with jitter), hold, reset.

netem is not in this kernel (issue 11), so the faults nftables cannot make come from here. The
design: inside the harness' network namespace (netns.py) an nftables ``nat output`` rule
redirects every node-to-node TCP connection (source and destination both a node's 127.0.0.x)
to this proxy's port on 127.0.0.1; the proxy reads the connection's original destination with
``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` and dials it *from the connection's own source
address* (a node's 127.0.0.x is a local address, so the bind is allowed), marking that socket
(``SO_MARK``) so the nat rule lets it through. Nothing about the daemons changes: they dial
the ring's addresses, see their peers' real source IPs (gossip's source-IP pin holds), and the
partition/loss rules on the input hook still see the same (source, destination) pairs on the
proxy's outgoing leg. Client traffic (from 127.0.0.1) is not redirected.

Why not a proxy per peer port (netns.py's rejected design): the ring would have to name the
proxies, and such a proxy cannot tell which peer dialled. The redirect keeps both. Why a thread
of the harness and not a process of its own: the nemesis changes the rules with a method call,
no control protocol; the price is the harness' GIL (its client threads), which shows in the
proxy's cost (+40-70 µs per round trip measured, README) but not in its delays (asyncio
timers, milliseconds and up).

Faults are per node address (``ip``); for bytes travelling from ``a`` to ``b``:

- delay: ``max(rule[a].out, rule[b].inbound)`` plus a uniform jitter in ``[0, jitter]``, each
  chunk delivered no earlier than the chunk before it (a TCP stream stays in order);
- hold: nothing is forwarded while ``a`` or ``b`` is held (bytes are buffered, up to
  ``QUEUE_CHUNKS`` chunks a direction, then the reader stops and TCP pushes back); released,
  everything buffered flows in order;
- reset: every open connection touching the node is closed with ``SO_LINGER 0`` on both legs
  (both peers see a reset), and while the reset window lasts new ones are reset at accept.

The proxy runs its own asyncio loop in a daemon thread (:meth:`Proxy.start`); the fault methods
are called from other threads (the nemesis): the rule table is replaced whole (a dict
assignment, atomic under the GIL) and read per chunk, so a fault takes effect on connections
already open; resets are handed to the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import InvalidArgument

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
MARK = 0x5A4B  # the proxy's outgoing sockets: the nat rule skips packets with this mark
CHUNK = 65536
QUEUE_CHUNKS = 256  # per direction; beyond it the reader waits (TCP back-pressure)
HOLD_POLL = 0.005  # seconds between looks at a held direction


@dataclass(frozen=True)
class Rule:
    out: float = 0.0  # seconds added to bytes the node sends
    inbound: float = 0.0  # seconds added to bytes sent to the node
    jitter: float = 0.0  # up to this much more, uniformly
    hold: bool = False
    reset: bool = False  # reset new connections at accept (existing ones: at reset())


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where a connection redirected by nftables was going (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, ip = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(ip), port


def _linger0(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Conn:
    def __init__(self, src: str, dst: str, cw: asyncio.StreamWriter) -> None:
        self.src, self.dst = src, dst
        self.writers = [cw]
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        for w in self.writers:
            _linger0(w)
        for t in self.tasks:
            t.cancel()


class Proxy:
    """``target(sock) -> (host, port)`` names where an accepted connection goes (default: its
    SO_ORIGINAL_DST); ``mark`` (None: none -- outside a namespace SO_MARK needs CAP_NET_ADMIN)
    marks the outgoing sockets; ``bind_source`` dials from the connection's source address."""

    def __init__(self, listen: tuple[str, int] = ("127.0.0.1", 0), *,
                 target: Callable[[socket.socket], tuple[str, int]] = original_dst,
                 mark: int | None = MARK, bind_source: bool = True, seed: int = 0) -> None:
        self.listen = listen
        self.target = target
        self.mark = mark
        self.bind_source = bind_source
        self.rules: dict[str, Rule] = {}
        self.rng = random.Random(seed)
        self.stats = {"accepted": 0, "bytes": 0, "resets": 0, "upstream_errors": 0}
        self._conns: set[_Conn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- control (any thread) ------------------------------------------------------------
    def _set(self, ip: str, **kw: Any) -> None:
        rules = dict(self.rules)
        rules[ip] = replace(rules.get(ip, Rule()), **kw)
        self.rules = rules

    def delay(self, ip: str, out: float, inbound: float | None = None, jitter: float = 0.0) -> None:
        if out < 0 or (inbound is not None and inbound < 0) or jitter < 0:
            raise InvalidArgument(f"proxy delay must be >= 0 s, got out={out} in={inbound} jitter={jitter}")
        self._set(ip, out=out, inbound=out if inbound is None else inbound, jitter=jitter)

    def hold(self, ip: str) -> None:
        self._set(ip, hold=True)

    def reset(self, ip: str) -> None:
        """Reset every open connection touching ``ip`` (done when this returns); new ones too
        until :meth:`clear`."""
        self._set(ip, reset=True)
        if self._loop is not None:
            done = threading.Event()

            def go() -> None:
                self._reset_open(ip)
                done.set()

            self._loop.call_soon_threadsafe(go)
            done.wait(5)

    def clear(self, ip: str | None = None) -> None:
        """Heal ``ip``'s faults (every node's with None); held bytes flow on."""
        self.rules = {} if ip is None else {k: v for k, v in self.rules.items() if k != ip}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> Proxy:
        ready = threading.Event()
        failed: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)  # gather() of no tasks at shutdown asks for it
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, *self.listen, reuse_address=True))
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # noqa: BLE001 -- handed to start()'s caller
                failed.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                for c in list(self._conns):
                    c.reset()
                pending = asyncio.all_tasks(loop)
                for t in pending:
                    t.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                if self._server is not None:
                    loop.run_until_complete(self._server.wait_closed())
                loop.close()

        self._thread = threading.Thread(target=main, name="torture-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise InvalidArgument("the torture proxy did not start within 10 s")
        if failed:
            raise InvalidArgument(f"the torture proxy cannot listen on {self.listen}: {failed[0]}")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._server is not None:
            loop.call_soon_threadsafe(self._server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None

    # -- the loop ----------------------------------------------------------------------------
    def _reset_open(self, ip: str) -> None:
        for c in [c for c in self._conns if ip in (c.src, c.dst)]:
            self.stats["resets"] += 1
            c.reset()
            self._conns.discard(c)

    def _rule(self, ip: str) -> Rule:
        return self.rules.get(ip) or _NONE

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            await self._forward(cr, cw)
        except asyncio.CancelledError:  # the proxy stops: asyncio's stream callback would
            _linger0(cw)  # report a cancelled handler as an error; end quietly instead

    async def _forward(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.stats["accepted"] += 1
        sock = cw.get_extra_info("socket")
        src = cw.get_extra_info("peername")[0]
        try:
            host, port = self.target(sock)
        except OSError:
            _linger0(cw)
            return
        conn = _Conn(src, host, cw)
        if self._rule(src).reset or self._rule(host).reset:
            self.stats["resets"] += 1
            conn.reset()
            return
        try:
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            up.setblocking(False)
            if self.mark is not None:
                up.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
            if self.bind_source:
                up.bind((src, 0))
            await asyncio.get_running_loop().sock_connect(up, (host, port))
            ur, uw = await asyncio.open_connection(sock=up)
        except OSError:  # the destination refused (or a partition cut it): so does the proxy
            self.stats["upstream_errors"] += 1
            up.close()
            _linger0(cw)
            return
        conn.writers.append(uw)
        self._conns.add(conn)
        a = asyncio.ensure_future(self._pipe(conn, cr, uw, src, host))
        b = asyncio.ensure_future(self._pipe(conn, ur, cw, host, src))
        conn.tasks = [a, b]
        await asyncio.gather(a, b, return_exceptions=True)
        self._conns.discard(conn)
        for w in conn.writers:
            w.close()

    async def _pipe(self, conn: _Conn, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    frm: str, to: str) -> None:
        """Bytes from ``frm`` to ``to``: read, stamp with a delivery time, deliver in order."""
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            try:
                while True:
                    at, data = await q.get()
                    if not data:
                        return
                    wait = at - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    while self._rule(frm).hold or self._rule(to).hold:
                        await asyncio.sleep(HOLD_POLL)
                    w.write(data)
                    await w.drain()
                    self.stats["bytes"] += len(data)
            except OSError:  # the receiving side reset: reset the sending side too
                conn.reset()

        sender = asyncio.ensure_future(deliver())
        last = 0.0
        try:
            while True:
                data = await r.read(CHUNK)
                a, b = self._rule(frm), self._rule(to)
                d = max(a.out, b.inbound)
                j = max(a.jitter, b.jitter)
                if j:
                    d += self.rng.uniform(0, j)
                last = max(last, loop.time() + d)
                await q.put((last, data))
                if not data:
                    break
            await sender
            if w.can_write_eof():
                w.write_eof()
        except (OSError, asyncio.IncompleteReadError):  # one side reset: reset the other
            conn.reset()
        finally:
            sender.cancel()


_NONE = Rule()


def measure_rtt(addr: tuple[str, int], n: int = 5, payload: bytes = b"x" * 64) -> float:
    """Median seconds of ``n`` echo round trips to ``addr`` (a helper for tests and docs)."""
    times = []
    with socket.create_connection(addr, timeout=10) as s:
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                part = s.recv(65536)
                if not part:
                    raise ConnectionError("echo closed")
                got += part
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
