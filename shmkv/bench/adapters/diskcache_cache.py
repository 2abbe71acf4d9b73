"""diskcache: SQLite index plus files, every process opens the same directory.

With a capacity, ``size_limit`` is set to it (least-recently-stored culling, diskcache's
default). Values of counters are bytes like every other backend's, so ``incr`` is a get and a
set inside one ``transact()`` rather than ``Cache.incr``, which works on Python ints only.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from .base import Adapter


class DiskcacheAdapter(Adapter):
    name = "diskcache"
    label = "diskcache.Cache on a temp directory (SQLite + files)"

    def unavailable(self) -> str | None:
        missing = self.missing_package("diskcache")
        if missing:
            return missing
        return super().unavailable()

    def setup(self) -> None:
        import diskcache

        self.path = tempfile.mkdtemp(prefix="shmkv-bench-diskcache-")
        # Settings are stored in the cache's database: workers' Cache(path) picks them up.
        limit = self.config.capacity or 2**40
        diskcache.Cache(self.path, size_limit=limit).close()

    def teardown(self) -> None:
        path = self.__dict__.pop("path", None)
        if path:
            shutil.rmtree(path, ignore_errors=True)

    def describe(self) -> str:
        import diskcache

        return f"diskcache {diskcache.__version__}"

    def open(self) -> None:
        import diskcache

        c = self._h_cache = diskcache.Cache(self.path)
        transact = c.transact

        def get_many(keys: list[bytes]) -> Mapping[bytes, bytes]:
            with transact():
                g = c.get
                out = {}
                for k in keys:
                    v = g(k)
                    if v is not None:
                        out[k] = v
                return out

        def put_many(mapping: dict[bytes, bytes]) -> None:
            with transact():
                s = c.set
                for k, v in mapping.items():
                    s(k, v)

        def delete_many(keys: list[bytes]) -> int:
            with transact():
                d = c.delete
                return sum(bool(d(k)) for k in keys)

        def incr(key: bytes) -> int:
            with transact():
                n = int(c.get(key, b"0")) + 1
                c.set(key, b"%d" % n)
                return n

        self.get = c.get
        self.put = c.set
        self.delete = c.delete
        self.get_many, self.put_many, self.delete_many = get_many, put_many, delete_many
        self.incr = incr

    def close(self) -> None:
        c: Any = self.__dict__.pop("_h_cache", None)
        if c is not None:
            c.close()
        super().close()
