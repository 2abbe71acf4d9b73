"""transport.py: TcpTransport over real sockets on 127.0.0.1 -- multiplexing, timeouts that
leave the connection usable, bounded queues answering "overloaded", garbage on the port, a
SIGSTOPped peer (timeout, no hang), a peer that dies and restarts on the same port."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from shmkv.cluster import wire
from shmkv.cluster.transport import (
    RequestTimeout,
    TcpTransport,
    Unreachable,
    split_addr,
)
from shmkv.cluster.wire import BadRequest, Message, Overloaded

PEER = Path(__file__).with_name("peer_proc.py")


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(coro_fn(), 60))


async def echo(msg: Message) -> Message:
    if msg.code == wire.GET and msg.fields["key"].startswith(b"sleep:"):
        await asyncio.sleep(float(msg.fields["key"].split(b":")[1]))
    if msg.code == wire.PUT:
        raise wire.Overloaded("handler says no")
    return Message(wire.OK, 0, {"value": msg.fields.get("key")})


def get(key: bytes) -> Message:
    return Message(wire.GET, 0, {"key": key})


class Peer:
    """A peer_proc.py process; stop() kills it."""

    def __init__(self, addr: str = "127.0.0.1:0") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), addr], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            raise RuntimeError(f"peer_proc did not start (exit {self.proc.poll()})")
        self.addr = line

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    started: list[Peer] = []
    yield started
    for p in started:
        p.stop()


def test_many_requests_multiplexed_on_one_connection_come_back_to_their_callers() -> None:
    async def main() -> None:
        server, client = TcpTransport(), TcpTransport()
        addr = await server.serve("127.0.0.1:0", echo)
        # later requests answer first: replies arrive out of order on the same connection
        keys = [b"sleep:%.2f:%d" % (0.01 * (20 - i), i) for i in range(20)]
        replies = await asyncio.gather(*(client.request(addr, get(k), 5) for k in keys))
        assert [r.fields["value"] for r in replies] == keys
        assert all(r.code == wire.OK for r in replies)
        assert len(client._pools[addr].conns) == 1
        await client.close()
        await server.close()

    run(main)


def test_pool_opens_up_to_connections_per_peer_when_busy() -> None:
    async def main() -> None:
        server, client = TcpTransport(), TcpTransport(connections_per_peer=3)
        addr = await server.serve("127.0.0.1:0", echo)
        await asyncio.gather(*(client.request(addr, get(b"sleep:0.05"), 5) for _ in range(10)))
        assert 1 <= len(client._pools[addr].conns) <= 3
        await client.close()
        await server.close()

    run(main)


def test_timeout_raises_and_the_connection_stays_usable() -> None:
    async def main() -> None:
        server, client = TcpTransport(), TcpTransport()
        addr = await server.serve("127.0.0.1:0", echo)
        with pytest.raises(RequestTimeout, match="no reply to GET within 0.1 s"):
            await client.request(addr, get(b"sleep:0.5"), 0.1)
        conn = client._pools[addr].conns[0]
        assert conn.pending == {}
        assert (await client.request(addr, get(b"k"), 5)).fields["value"] == b"k"
        await asyncio.sleep(0.6)  # the late reply arrives, finds no waiter, is dropped
        assert (await client.request(addr, get(b"k2"), 5)).fields["value"] == b"k2"
        assert client._pools[addr].conns == [conn]
        await client.close()
        await server.close()

    run(main)


def test_handler_errors_come_back_as_their_exceptions() -> None:
    async def main() -> None:
        server, client = TcpTransport(), TcpTransport()
        addr = await server.serve("127.0.0.1:0", echo)
        with pytest.raises(Overloaded, match="handler says no"):
            await client.request(addr, Message(wire.PUT, 0, {"key": b"k", "value": b"v"}), 5)
        # a reply code sent as a request is refused, the connection lives
        with pytest.raises(BadRequest, match="OK is not a request"):
            await client.request(addr, Message(wire.OK, 0, {}), 5)
        assert (await client.request(addr, get(b"k"), 5)).fields["value"] == b"k"
        await client.close()
        await server.close()

    run(main)


def test_client_side_in_flight_bound_answers_overloaded_at_once() -> None:
    async def main() -> None:
        server, client = TcpTransport(), TcpTransport(max_in_flight=3)
        addr = await server.serve("127.0.0.1:0", echo)
        slow = [asyncio.ensure_future(client.request(addr, get(b"sleep:0.3"), 5)) for _ in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="3 requests in flight"):
            await client.request(addr, get(b"k"), 5)
        await asyncio.gather(*slow)
        assert (await client.request(addr, get(b"k"), 5)).fields["value"] == b"k"
        await client.close()
        await server.close()

    run(main)


def test_server_side_pending_bound_answers_overloaded_instead_of_queueing() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def blocked(msg: Message) -> Message:
            await release.wait()
            return Message(wire.OK, 0, {})

        server, client = TcpTransport(max_pending=4), TcpTransport()
        addr = await server.serve("127.0.0.1:0", blocked)
        futs = [asyncio.ensure_future(client.request(addr, get(b"k"), 5)) for _ in range(10)]
        await asyncio.sleep(0.2)
        done = [f for f in futs if f.done()]
        assert len(done) == 6
        assert all(isinstance(f.exception(), Overloaded) for f in done)
        release.set()
        rest = await asyncio.gather(*(f for f in futs if f not in done))
        assert len(rest) == 4 and server._pending == 0
        await client.close()
        await server.close()

    run(main)


def test_nobody_listening_is_unreachable_not_sent() -> None:
    async def main() -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        client = TcpTransport()
        with pytest.raises(Unreachable, match="cannot connect") as e:
            await client.request(f"127.0.0.1:{port}", get(b"k"), 2)
        assert e.value.sent is False
        await client.close()

    run(main)


def _read_frame(sock: socket.socket) -> Message | None:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    msgs = wire.FrameDecoder().feed(data) if data else []
    return msgs[0] if msgs else None


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        struct.pack(">IB", 10**9, 1),  # oversized
        struct.pack(">IB", 3, 9) + b"xx",  # wrong version
        struct.pack(">IB", 3, 1) + b"\xc1\xc1",  # malformed msgpack
        random.Random(1).randbytes(4096),
    ],
)
def test_garbage_on_the_port_is_refused_and_the_server_keeps_serving(garbage: bytes) -> None:
    async def main() -> None:
        server, client = TcpTransport(), TcpTransport()
        addr = await server.serve("127.0.0.1:0", echo)
        host, port = split_addr(addr)

        def attack() -> Message | None:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(garbage)
                return _read_frame(s)

        reply = await asyncio.to_thread(attack)
        if reply is not None:  # random bytes may also just look like an incomplete frame
            assert reply.code == wire.ERR_BAD_REQUEST and reply.rid == 0
        assert (await client.request(addr, get(b"k"), 5)).fields["value"] == b"k"
        await client.close()
        await server.close()

    run(main)


def test_garbage_from_the_server_fails_requests_and_the_next_connection_recovers() -> None:
    async def main() -> None:
        connections = 0

        async def first_bad_then_good(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            nonlocal connections
            connections += 1
            dec = wire.FrameDecoder()
            msgs: list[Message] = []
            while not msgs:
                data = await reader.read(100)
                if not data:
                    break
                msgs = dec.feed(data)
            if connections == 1:
                writer.write(b"\xff" * 10)
            else:
                writer.write(wire.encode(Message(wire.OK, msgs[0].rid, {"value": b"good"})))
            await writer.drain()
            await reader.read(100)  # until the client hangs up
            writer.close()
            await writer.wait_closed()

        srv = await asyncio.start_server(first_bad_then_good, "127.0.0.1", 0)
        addr = f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        client = TcpTransport()
        with pytest.raises(Unreachable, match="malformed stream") as e:
            await client.request(addr, get(b"k"), 5)
        assert e.value.sent is True
        assert (await client.request(addr, get(b"k"), 5)).fields["value"] == b"good"
        await client.close()
        srv.close()
        await srv.wait_closed()

    run(main)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigstopped_peer_times_out_without_hanging_and_answers_after_sigcont(peers) -> None:
    peer = Peer()
    peers.append(peer)

    async def main() -> None:
        client = TcpTransport()
        pid = (await client.request(peer.addr, Message(wire.PING, 0, {}), 5)).fields["pid"]
        assert pid == peer.proc.pid
        peer.signal(signal.SIGSTOP)
        try:
            results = await asyncio.gather(
                *(client.request(peer.addr, get(b"k%d" % i), 0.3) for i in range(50)),
                return_exceptions=True,
            )
            assert all(isinstance(r, RequestTimeout) for r in results)
        finally:
            peer.signal(signal.SIGCONT)
        # same connection; the 50 late replies are dropped, a new request gets its own answer
        reply = await client.request(peer.addr, get(b"after"), 5)
        assert reply.fields["value"] == b"after"
        assert len(client._pools[peer.addr].conns) == 1
        await client.close()

    run(main)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_peer_killed_then_restarted_on_the_same_port_is_reached_again(peers) -> None:
    first = Peer()
    peers.append(first)

    async def main() -> None:
        client = TcpTransport()
        assert (await client.request(first.addr, Message(wire.PING, 0, {}), 5)).fields[
            "pid"
        ] == first.proc.pid
        in_flight = asyncio.ensure_future(client.request(first.addr, get(b"sleep:30"), 10))
        await asyncio.sleep(0.2)
        first.signal(signal.SIGKILL)
        with pytest.raises(Unreachable) as e:
            await in_flight
        assert e.value.sent is True  # it may have been applied: the caller must know
        first.proc.wait(10)
        with pytest.raises(Unreachable) as e2:
            await client.request(first.addr, Message(wire.PING, 0, {}), 5)
        assert e2.value.sent is False

        second = await asyncio.to_thread(Peer, first.addr)
        peers.append(second)
        reply = await client.request(first.addr, Message(wire.PING, 0, {}), 5)
        assert reply.fields["pid"] == second.proc.pid
        await client.close()

    run(main)


def test_close_fails_requests_in_flight_and_is_idempotent() -> None:
    async def main() -> None:
        server, client = TcpTransport(), TcpTransport()
        addr = await server.serve("127.0.0.1:0", echo)
        fut = asyncio.ensure_future(client.request(addr, get(b"sleep:5"), 10))
        await asyncio.sleep(0.1)
        await client.close()
        with pytest.raises(Unreachable, match="transport closed"):
            await fut
        await client.close()
        with pytest.raises(Unreachable):
            await client.request(addr, get(b"k"), 1)
        await server.close()

    run(main)


def test_works_on_uvloop_when_installed() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        server, client = TcpTransport(), TcpTransport()
        addr = await server.serve("127.0.0.1:0", echo)
        replies = await asyncio.gather(
            *(client.request(addr, get(b"%d" % i), 5) for i in range(100))
        )
        assert [r.fields["value"] for r in replies] == [b"%d" % i for i in range(100)]
        with pytest.raises(RequestTimeout):
            await client.request(addr, get(b"sleep:1"), 0.05)
        await client.close()
        await server.close()

    uvloop.run(main())


def test_bad_addresses_are_value_errors() -> None:
    for bad in ("nohost", "host:", ":80", "h:99999", "h:x"):
        with pytest.raises(ValueError, match="not host:port"):
            split_addr(bad)
    assert split_addr("[::1]:7401") == ("::1", 7401)


def test_a_timed_out_requester_does_not_cancel_the_connect_others_wait_for() -> None:
    # A listener whose accept queue is full and never accepted: further connects hang in
    # SYN_SENT, like connecting to a host that is down.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)

    async def main() -> None:
        client = TcpTransport()
        addr = f"127.0.0.1:{port}"
        short = asyncio.ensure_future(client.request(addr, get(b"a"), 0.2))
        long = asyncio.ensure_future(client.request(addr, get(b"b"), 0.6))
        results = await asyncio.gather(short, long, return_exceptions=True)
        assert [type(r) for r in results] == [Unreachable, Unreachable]
        assert all(r.sent is False and "cannot connect within" in str(r) for r in results)
        await client.close()

    try:
        run(main)
    finally:
        for s in fillers:
            s.close()
        lsock.close()


def test_a_peer_that_never_reads_makes_big_requests_time_out_not_pile_up() -> None:
    async def main() -> None:
        stop = asyncio.Event()

        async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await stop.wait()  # accepts, never reads: TCP buffers fill, then our writes queue
            writer.close()

        srv = await asyncio.start_server(deaf, "127.0.0.1", 0)
        addr = f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        client = TcpTransport()
        big = Message(wire.PUT, 0, {"key": b"k", "value": b"x" * (2 << 20)})
        results = await asyncio.gather(
            *(client.request(addr, big, 0.5) for _ in range(8)), return_exceptions=True
        )
        assert all(isinstance(r, RequestTimeout) for r in results)
        assert any("not even sent" in str(r) for r in results)  # waited for room, bounded
        assert client._pools[addr].in_flight == 0
        stop.set()
        await client.close()
        srv.close()
        await srv.wait_closed()

    run(main)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_workers_share_one_port_with_reuse_port() -> None:
    # Two worker processes bound to one port (SO_REUSEPORT); connections land on both.
    code = (
        "import asyncio, os, sys; sys.path.insert(0, '.');"
        "from shmkv.cluster import wire; from shmkv.cluster.transport import TcpTransport;"
        "from shmkv.cluster.wire import Message\n"
        "async def h(m): return Message(wire.OK, 0, {'pid': os.getpid()})\n"
        "async def main():\n"
        "    t = TcpTransport(reuse_port=True)\n"
        "    print(await t.serve(sys.argv[1], h), flush=True)\n"
        "    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    root = Path(__file__).resolve().parents[2]
    procs = []
    try:
        first = subprocess.Popen(
            [sys.executable, "-c", code, "127.0.0.1:0"], cwd=root, stdout=subprocess.PIPE, text=True
        )
        procs.append(first)
        addr = first.stdout.readline().strip()
        second = subprocess.Popen(
            [sys.executable, "-c", code, addr], cwd=root, stdout=subprocess.PIPE, text=True
        )
        procs.append(second)
        assert second.stdout.readline().strip() == addr

        async def main() -> set[int]:
            pids = set()
            for _ in range(40):  # a fresh transport = a fresh connection each time
                t = TcpTransport()
                pids.add((await t.request(addr, Message(wire.PING, 0, {}), 5)).fields["pid"])
                await t.close()
                if len(pids) == 2:
                    break
            return pids

        pids = asyncio.run(main())
        assert pids == {first.pid, second.pid}
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
            p.stdout.close()


# -- write coalescing, Task-less send, eager handlers (the speed work) ------------------------------


class _CountingWriter:
    """A StreamWriter stand-in that records every write (what reached the "socket")."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_frames_of_one_loop_iteration_go_out_in_one_write_in_order() -> None:
    from shmkv.cluster.transport import _Out

    async def main() -> None:
        w = _CountingWriter()
        out = _Out(w)  # type: ignore[arg-type]
        frames = [wire.encode(Message(wire.OK, i, {"i": i})) for i in range(1, 51)]
        for f in frames:
            out.write(f)
        assert w.writes == []  # nothing yet: flushed at the end of the iteration
        await asyncio.sleep(0)
        assert w.writes == [b"".join(frames)]  # one write, the frames in order
        dec = wire.FrameDecoder()
        assert [m.rid for m in dec.feed(w.writes[0])] == list(range(1, 51))
        out.write(frames[0])
        out.flush()  # a direct flush (before a close) writes at once...
        assert w.writes[-1] == frames[0]
        await asyncio.sleep(0)
        assert len(w.writes) == 2  # ...and the scheduled one then finds nothing to write
        out.write(frames[1])
        w.close()
        out.flush()  # a closed stream drops the frame, never raises
        assert len(w.writes) == 2

    run(main)


def test_server_replies_written_before_the_connection_closes_are_not_lost() -> None:
    """A stream that turns to garbage after good requests: the replies to the good ones, then
    the BAD_REQUEST (buffered, flushed by the close) reach the client, in that order."""

    async def main() -> None:
        server = TcpTransport()
        addr = await server.serve("127.0.0.1:0", echo)
        host, port = addr.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        good = b"".join(wire.encode(Message(wire.GET, i, {"key": b"k%d" % i})) for i in range(1, 21))
        writer.write(good)
        await asyncio.sleep(0.2)  # (a frame decoded in the chunk that fails is dropped with it)
        writer.write(b"\x00\x00\x00\x05\x09garbage")
        data = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            data += chunk
        msgs = wire.FrameDecoder().feed(data)
        assert [m.rid for m in msgs[:-1]] == list(range(1, 21))
        assert [m.fields["value"] for m in msgs[:-1]] == [b"k%d" % i for i in range(1, 21)]
        assert msgs[-1].code == wire.ERR_BAD_REQUEST and msgs[-1].rid == 0
        writer.close()
        await server.close()

    run(main)


def test_send_answers_as_request_does_without_a_task_on_a_ready_connection() -> None:
    async def main() -> None:
        server, client = TcpTransport(), TcpTransport()
        addr = await server.serve("127.0.0.1:0", echo)
        first = client.send(addr, get(b"a"), 5)  # no connection yet: the coroutine path
        assert isinstance(first, asyncio.Task)
        assert (await first).fields["value"] == b"a"
        futs = [client.send(addr, get(b"%d" % i), 5) for i in range(200)]
        assert not any(isinstance(f, asyncio.Task) for f in futs)  # the Task-less path
        assert [(await f).fields["value"] for f in futs] == [b"%d" % i for i in range(200)]
        await asyncio.sleep(0)  # each future's bookkeeping is a done callback (call_soon)
        assert client._pools[addr].in_flight == 0 and not client._pools[addr].conns[0].pending
        bad = client.send(addr, Message(wire.PUT, 0, {"key": b"k", "value": b"v"}), 5)
        with pytest.raises(Overloaded, match="handler says no"):  # the error the reply carries
            await bad
        slow = client.send(addr, get(b"sleep:1"), 0.05)
        with pytest.raises(RequestTimeout):
            await slow
        await asyncio.sleep(0)
        assert client._pools[addr].in_flight == 0
        late = client.send(addr, get(b"sleep:5"), 10)
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(Unreachable, match="transport closed"):
            await late
        await server.close()

    run(main)


def test_start_eager_finishes_inline_or_goes_on_in_a_task() -> None:
    from shmkv.cluster.transport import start_eager

    async def inline() -> int:
        return 7

    async def waits(steps: list[str]) -> int:
        steps.append("first step")
        await asyncio.sleep(0.01)
        steps.append("after the wait")
        await asyncio.sleep(0)
        return 8

    async def raises() -> None:
        raise ValueError("at once")

    async def main() -> None:
        assert start_eager(inline()) == (True, 7)
        steps: list[str] = []
        done, task = start_eager(waits(steps))
        assert not done and steps == ["first step"]  # ran up to its first wait, here
        assert await task == 8 and steps == ["first step", "after the wait"]
        with pytest.raises(ValueError, match="at once"):
            start_eager(raises())
        done, task = start_eager(waits([]))
        task.cancel()  # a cancellation reaches the coroutine inside
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main)
