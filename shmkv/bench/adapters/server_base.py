"""What the two server peers (Redis, memcached) share: a private server the adapter started,
or an external one whose workload keys it must remove again."""

from __future__ import annotations

from typing import Any

from ..servers import ping_rtt_us
from ..workload import make_key
from .base import Adapter


class ServerAdapter(Adapter):
    """REQUIRES of subclasses: setup() stores a started server as ``self._h_server`` (or
    sets ``self.external = True``); open()/close()/delete_many() work on it."""

    external: bool

    def teardown(self) -> None:
        server = self.__dict__.pop("_h_server", None)
        if server is not None:
            server.stop()
        elif getattr(self, "external", False):
            # an external server keeps other people's keys: remove only the workload's
            self.open()
            try:
                ks = self.config.key_size
                for start in range(0, self.config.keys, 1000):
                    stop = min(start + 1000, self.config.keys)
                    self.delete_many([make_key(i, ks) for i in range(start, stop)])
            finally:
                self.close()
            self.external = False

    def _server_note(self, server: str) -> str:
        srv: Any = self.__dict__.get("_h_server")
        if srv is not None:  # the loopback floor under every op, measured without a client
            server += f"; raw ping round trip p50 {ping_rtt_us(srv.port, srv.ping, srv.pong):.0f} us"
        return server
