"""``multiprocessing.Manager().dict()``: the standard library's shared dict.

Every op is a round trip to the manager process (pickle over a socket). Its ``incr`` is a get
then a set: two round trips and *not* atomic across processes, as a user would write it.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Mapping
from typing import Any

from .base import Adapter


class ManagerDictAdapter(Adapter):
    name = "manager"
    label = "multiprocessing.Manager().dict(): a round trip to a manager process per call"
    evicts = False

    def setup(self) -> None:
        self._h_manager = multiprocessing.get_context("spawn").Manager()
        # The proxy is pickled to the spawned workers, which reconnect with the inherited key.
        self.proxy: Any = self._h_manager.dict()

    def teardown(self) -> None:
        manager = self.__dict__.pop("_h_manager", None)
        self.__dict__.pop("proxy", None)
        if manager is not None:
            manager.shutdown()

    def open(self) -> None:
        p = self.proxy
        self.get = p.get
        self.put = p.__setitem__

        def delete(key: bytes) -> Any:
            return p.pop(key, None)

        def get_many(keys: list[bytes]) -> Mapping[bytes, bytes]:
            # No batch read in DictProxy: one round trip per key.
            get = p.get
            out = {}
            for k in keys:
                v = get(k)
                if v is not None:
                    out[k] = v
            return out

        def delete_many(keys: list[bytes]) -> int:
            pop = p.pop
            return sum(pop(k, None) is not None for k in keys)

        def incr(key: bytes) -> int:
            n = int(p.get(key, b"0")) + 1
            p[key] = b"%d" % n
            return n

        self.delete = delete
        self.get_many = get_many
        self.put_many = p.update
        self.delete_many = delete_many
        self.incr = incr
