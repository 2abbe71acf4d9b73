"""memcached through pymemcache, against a private ``memcached`` (or ``--memcached``).

The client waits for every reply (``default_noreply=False``): pymemcache's default of not
waiting for set replies would time sends, not stores. Batches are ``get_many`` / ``set_many``
/ ``delete_many``. The private server gets ``-m`` = the capacity (or room for every key).
An external server has the workload's keys deleted at teardown, nothing else.
"""

from __future__ import annotations

from ..servers import MemcachedServer, server_version
from .server_base import ServerAdapter


def _parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return (host or "127.0.0.1", int(port))


class MemcachedAdapter(ServerAdapter):
    name = "memcached"
    label = "memcached via pymemcache over 127.0.0.1 TCP"

    def unavailable(self) -> str | None:
        missing = self.missing_package("pymemcache")
        if missing:
            return missing
        if not self.config.memcached_addr and MemcachedServer.which() is None:
            return "memcached not on PATH (apt-get install memcached) and no --memcached"
        if self.config.memcached_addr and self.config.capacity:
            return "a capacity run needs the private memcached (-m), not --memcached"
        if self.config.max_item_bytes > 1024**2 - 1024:
            return "values near 1 MiB or more exceed memcached's default item size"
        return super().unavailable()

    def setup(self) -> None:
        if self.config.memcached_addr:
            self.addr = _parse_addr(self.config.memcached_addr)
            self.external = True
        else:
            size = self.config.capacity or self.config.default_size()
            self._h_server = MemcachedServer(memory_mb=max(1, -(-size // 1024**2))).start()
            self.addr = ("127.0.0.1", self._h_server.port)
            self.external = False

    def describe(self) -> str:
        import pymemcache

        server = "external" if self.config.memcached_addr else server_version("memcached")
        server = self._server_note(server)
        return f"pymemcache {pymemcache.__version__}; {server}"

    def open(self) -> None:
        from pymemcache.client.base import Client

        c = self._h_client = Client(self.addr, no_delay=True, default_noreply=False)
        cincr, cadd = c.incr, c.add

        def incr(key: bytes) -> int:
            n = cincr(key, 1)
            if n is None:  # missing: create at 1, or lose the race to another creator
                if cadd(key, b"1", noreply=False):
                    return 1
                n = cincr(key, 1)
            return int(n)

        self.get = c.get
        self.put = c.set
        self.delete = c.delete
        self.get_many = c.get_many  # a dict of the found keys: the contract as is
        self.put_many = c.set_many
        self.delete_many = c.delete_many
        self.incr = incr

    def close(self) -> None:
        c = self.__dict__.pop("_h_client", None)
        if c is not None:
            c.close()
        super().close()
