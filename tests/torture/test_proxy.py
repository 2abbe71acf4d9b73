"""The fault-injecting proxy (proxy.py) over real sockets on 127.0.0.1: bytes go through intact
both ways, a set delay shows in the measured round trip, a hold stops traffic until released,
and a reset reaches the client as ECONNRESET. (The nat redirect in front of it is exercised by
the real torture run with ``--nemesis delay`` in test_netns.py.)"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from shmkv.torture.proxy import Proxy, measure_rtt


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(c: socket.socket) -> None:
        with c:
            try:
                while data := c.recv(65536):
                    c.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[:2]
    stop.set()
    t.join(5)
    srv.close()


@pytest.fixture
def proxy(echo: tuple[str, int]) -> Iterator[Proxy]:
    p = Proxy(target=lambda _s: echo, mark=None, seed=1).start()
    yield p
    p.stop()


def _roundtrip(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        part = s.recv(1 << 20)
        assert part, "closed early"
        got += part
    return got


def test_bytes_are_forwarded_intact_both_ways(proxy: Proxy) -> None:
    # 3 MiB each way (many chunks, more than the socket buffers): every byte back, in order
    data = os.urandom(3 << 20)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        assert _roundtrip(s, b"hello") == b"hello"
        sender = threading.Thread(target=s.sendall, args=(data,))
        sender.start()
        got = bytearray()
        while len(got) < len(data) and (part := s.recv(1 << 20)):
            got += part
        sender.join(10)
        assert bytes(got) == data
    # the proxy's thread counts a chunk after writing it on: the last count may trail the echo
    deadline = time.monotonic() + 5
    while proxy.stats["bytes"] < 2 * len(data) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proxy.stats["accepted"] == 1 and proxy.stats["bytes"] >= 2 * len(data)


def test_delay_shows_in_the_round_trip(proxy: Proxy) -> None:
    addr = ("127.0.0.1", proxy.port)
    base = measure_rtt(addr)
    proxy.delay("127.0.0.1", 0.05, jitter=0.01)
    slow = measure_rtt(addr)
    assert slow >= 0.1, (base, slow)  # 50 ms each way, plus up to 10 ms jitter each way
    assert slow < 5.0  # bounded, not stuck
    proxy.clear()
    assert measure_rtt(addr) < 0.1


def test_hold_stops_traffic_until_released(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        assert _roundtrip(s, b"ab") == b"ab"
        proxy.hold("127.0.0.1")
        s.sendall(b"cd")
        s.settimeout(0.3)
        with pytest.raises(TimeoutError):
            s.recv(10)
        t = time.monotonic()
        threading.Timer(0.2, proxy.clear).start()
        s.settimeout(10)
        assert s.recv(10) == b"cd" and time.monotonic() - t >= 0.15


def test_reset_reaches_the_client_and_new_connections_are_reset(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        assert _roundtrip(s, b"xy") == b"xy"
        proxy.reset("127.0.0.1")
        with pytest.raises(ConnectionResetError):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the RST arrives asynchronously
                s.sendall(b"z")
                if not s.recv(10):
                    break
                time.sleep(0.01)
    with pytest.raises(ConnectionResetError):  # in connect() already, or at the first recv
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(b"z")
            s.recv(10)
    assert proxy.stats["resets"] >= 2
    proxy.clear()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        assert _roundtrip(s, b"ok") == b"ok"
