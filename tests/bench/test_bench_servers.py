"""Private redis-server / memcached: they answer once started and are gone once stopped."""

from __future__ import annotations

import socket

import pytest

from shmkv.bench.servers import MemcachedServer, RedisServer, Server, ServerError

SERVERS = [
    pytest.param(
        RedisServer,
        marks=pytest.mark.skipif(RedisServer.which() is None, reason="redis-server not installed"),
    ),
    pytest.param(
        MemcachedServer,
        marks=pytest.mark.skipif(MemcachedServer.which() is None, reason="memcached not installed"),
    ),
]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("cls", SERVERS)
def test_server_listens_on_loopback_and_stops_for_good(cls: type[Server]) -> None:
    server = cls()
    with server:
        assert server.proc is not None and server.proc.poll() is None
        pid_proc = server.proc
        assert _port_open(server.port)
    assert server.proc is None and pid_proc.returncode is not None
    assert not _port_open(server.port)
    server.stop()  # idempotent


def test_redis_runs_without_persistence() -> None:
    if RedisServer.which() is None:
        pytest.skip("redis-server not installed")
    import redis

    with RedisServer(maxmemory=16 << 20) as server:
        r = redis.Redis(host="127.0.0.1", port=server.port)
        try:
            cfg = r.config_get("*")
            assert cfg["save"] == "" and cfg["appendonly"] == "no"
            assert cfg["maxmemory"] == str(16 << 20) and cfg["maxmemory-policy"] == "allkeys-lru"
        finally:
            r.close()


def test_server_stopped_after_an_exception_in_its_block() -> None:
    if RedisServer.which() is None:
        pytest.skip("redis-server not installed")
    server = RedisServer()
    with pytest.raises(KeyboardInterrupt), server:
        proc = server.proc
        raise KeyboardInterrupt
    assert proc is not None and proc.returncode is not None


def test_missing_binary_raises_server_error() -> None:
    class Nope(RedisServer):
        binary = "no-such-server-binary"

    with pytest.raises(ServerError, match="not found"):
        Nope().start()
