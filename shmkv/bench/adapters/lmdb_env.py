"""LMDB (py-lmdb): a memory-mapped B+tree file every process opens.

Opened with ``writemap=True, sync=False, metasync=False``: no fsync, so the comparison is with
LMDB as a cache, not as a durable database. Each op is its own transaction (a reader sees other
processes' writes only in a new transaction); batches share one transaction. LMDB never evicts,
so a capacity (eviction) workload skips it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from .base import Adapter

# Flags of every open, also the fill's and the memory report's.
OPEN_FLAGS: dict[str, Any] = {
    "writemap": True,
    "sync": False,
    "metasync": False,
    "max_readers": 256,
}


class LmdbAdapter(Adapter):
    name = "lmdb"
    label = "LMDB file (writemap, sync=False, metasync=False), a transaction per op"
    evicts = False
    scans = True

    def unavailable(self) -> str | None:
        missing = self.missing_package("lmdb")
        if missing:
            return missing
        return super().unavailable()

    def setup(self) -> None:
        self.path = tempfile.mkdtemp(prefix="shmkv-bench-lmdb-")
        # The map is address space, not memory: generous, so a fill never hits MapFullError.
        self.map_size = max(1024**3, 4 * self.config.default_size())

    def teardown(self) -> None:
        path = self.__dict__.pop("path", None)
        if path:
            shutil.rmtree(path, ignore_errors=True)

    def describe(self) -> str:
        import lmdb

        return f"py-lmdb {lmdb.__version__}, LMDB {'.'.join(map(str, lmdb.version()))}"

    def open(self) -> None:
        import lmdb

        env = self._h_env = lmdb.open(self.path, map_size=self.map_size, **OPEN_FLAGS)
        begin = env.begin

        def get(key: bytes) -> bytes | None:
            with begin() as txn:
                return txn.get(key)

        def put(key: bytes, value: bytes) -> bool:
            with begin(write=True) as txn:
                return txn.put(key, value)

        def delete(key: bytes) -> bool:
            with begin(write=True) as txn:
                return txn.delete(key)

        def get_many(keys: list[bytes]) -> Mapping[bytes, bytes]:
            with begin() as txn:
                g = txn.get
                out = {}
                for k in keys:
                    v = g(k)
                    if v is not None:
                        out[k] = v
                return out

        def put_many(mapping: dict[bytes, bytes]) -> Any:
            with begin(write=True) as txn:
                return txn.cursor().putmulti(mapping.items())

        def delete_many(keys: list[bytes]) -> int:
            with begin(write=True) as txn:
                d = txn.delete
                return sum(bool(d(k)) for k in keys)

        def incr(key: bytes) -> int:
            with begin(write=True) as txn:
                n = int(txn.get(key, b"0")) + 1
                txn.put(key, b"%d" % n)
                return n

        def scan(key: bytes, n: int) -> int:
            # a read transaction and a cursor per scan, pairs copied out as bytes (as shmkv's)
            with begin() as txn:
                cur = txn.cursor()
                if not cur.set_range(key):
                    return 0
                got = 0
                for _ in cur.iternext():
                    got += 1
                    if got >= n:
                        break
                return got

        self.scan = scan
        self.get, self.put, self.delete = get, put, delete
        self.get_many, self.put_many, self.delete_many = get_many, put_many, delete_many
        self.incr = incr

    def close(self) -> None:
        env = self.__dict__.pop("_h_env", None)
        if env is not None:
            env.close()
        super().close()
