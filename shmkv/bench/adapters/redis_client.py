"""Redis through redis-py, against a private ``redis-server`` (or ``--redis-url``).

Batches are single commands (MGET, MSET, DEL k...), the fastest form a redis-py user has for
plain gets and sets; a ``pipeline()`` of SETs was the alternative, one round trip too but more
bytes and parsing. With a capacity the private server evicts (maxmemory, allkeys-lru).

An external server (``--redis-url``) is never flushed: the run writes the workload's own keys
(``k0000…``) and deletes exactly those at teardown, so point it at a scratch database.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..servers import RedisServer, server_version
from .server_base import ServerAdapter


class RedisAdapter(ServerAdapter):
    name = "redis"
    label = "Redis via redis-py over 127.0.0.1 TCP (no persistence)"

    def unavailable(self) -> str | None:
        missing = self.missing_package("redis", "redis (redis-py)")
        if missing:
            return missing
        if not self.config.redis_url and RedisServer.which() is None:
            return "redis-server not on PATH (apt-get install redis-server) and no --redis-url"
        if self.config.redis_url and self.config.capacity:
            return "a capacity run needs the private redis-server (maxmemory), not --redis-url"
        return super().unavailable()

    def setup(self) -> None:
        if self.config.redis_url:
            self.url = self.config.redis_url
            self.external = True
        else:
            self._h_server = RedisServer(maxmemory=self.config.capacity).start()
            self.url = f"redis://{self._h_server.address}/0"
            self.external = False

    def describe(self) -> str:
        import redis

        server = "external" if self.config.redis_url else server_version("redis-server")
        server = self._server_note(server)
        return f"redis-py {redis.__version__}; {server}"

    def open(self) -> None:
        import redis

        r = self._h_client = redis.Redis.from_url(self.url)
        mget = r.mget
        rdelete = r.delete

        def get_many(keys: list[bytes]) -> Mapping[bytes, Any]:
            return {k: v for k, v in zip(keys, mget(keys), strict=True) if v is not None}

        def delete_many(keys: list[bytes]) -> int:
            return int(rdelete(*keys))

        self.get = r.get
        self.put = r.set
        self.delete = rdelete
        self.get_many = get_many
        self.put_many = r.mset
        self.delete_many = delete_many
        self.incr = r.incr

    def close(self) -> None:
        r = self.__dict__.pop("_h_client", None)
        if r is not None:
            r.close()
            r.connection_pool.disconnect()
        super().close()
