"""Bytes of store per item: how many items a given amount of memory holds.

Method, the same for every store that evicts (shmkv, memcached, Redis): create it with a fixed
capacity, write distinct keys in batches of ``BATCH`` until the store reports its first eviction,
then divide the capacity by the items it holds at that moment. This counts every overhead the
store has (headers, hash index, slab rounding, allocator waste) against the items, which is what
a user sizing a cache needs. LMDB cannot evict: it is filled with the same number of items as
shmkv held, and its used pages (``(last_pgno + 1) * psize``) are divided by the item count.

Numbers are exact for one fill order (keys ``k0..``, values of one size), not averages.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .workload import make_key

BATCH = 1000
KEY_SIZE = 16


@dataclass
class MemoryResult:
    """One store at one value size. ``bytes_per_item`` = ``capacity_bytes / items``."""

    backend: str
    value_size: int
    items: int
    capacity_bytes: int
    bytes_per_item: float
    payload_per_item: int
    method: str
    extra: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _fill_until(
    put_many: Callable[[dict[bytes, bytes]], Any],
    evicted: Callable[[], bool],
    value: bytes,
    limit: int,
) -> int:
    """Write keys in batches until ``evicted()`` or ``limit`` keys; returns keys written."""
    n = 0
    while n < limit:
        put_many({make_key(i, KEY_SIZE): value for i in range(n, n + BATCH)})
        n += BATCH
        if evicted():
            return n
    raise RuntimeError(f"no eviction after {limit} items: capacity too large for the limit")


def shmkv_per_item(value_size: int, capacity: int) -> MemoryResult:
    import shmkv

    name = f"shmkv-bench-{os.getpid()}-mem-{uuid.uuid4().hex[:8]}"
    kv = shmkv.attach(name, size=capacity)
    try:
        value = b"v" * value_size
        limit = 4 * capacity // (KEY_SIZE + value_size) + BATCH
        written = _fill_until(kv.put_many, lambda: kv.stats()["evictions"] > 0, value, limit)
        st = kv.stats()
        items, seg = int(st["items"]), int(st["segment_bytes"])
        return MemoryResult(
            "shmkv", value_size, items, seg, seg / items, KEY_SIZE + value_size,
            "segment_bytes / items at the first eviction",
            {"written": written, "evictions": st["evictions"], "pages_total": st.get("pages_total")},
        )  # fmt: skip
    finally:
        kv.close()
        shmkv.unlink(name)


def lmdb_per_item(value_size: int, items: int) -> MemoryResult:
    import lmdb

    from .adapters.lmdb_env import OPEN_FLAGS

    path = tempfile.mkdtemp(prefix="shmkv-bench-mem-lmdb-")
    try:
        env = lmdb.open(
            path, map_size=max(1 << 30, 4 * items * (KEY_SIZE + value_size)), **OPEN_FLAGS
        )
        try:
            value = b"v" * value_size
            for start in range(0, items, BATCH):
                with env.begin(write=True) as txn:
                    txn.cursor().putmulti(
                        (make_key(i, KEY_SIZE), value)
                        for i in range(start, min(items, start + BATCH))
                    )
            info, stat = env.info(), env.stat()
            used = (info["last_pgno"] + 1) * stat["psize"]
            return MemoryResult(
                "lmdb", value_size, items, used, used / items, KEY_SIZE + value_size,
                "used pages (last_pgno+1)*psize / items, filled with as many items as shmkv held",
                {"psize": stat["psize"], "depth": stat["depth"], "leaf_pages": stat["leaf_pages"],
                 "overflow_pages": stat["overflow_pages"]},
            )  # fmt: skip
        finally:
            env.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


def memcached_per_item(value_size: int, capacity: int) -> MemoryResult:
    from pymemcache.client.base import Client

    from .servers import MemcachedServer

    with MemcachedServer(memory_mb=capacity // (1 << 20)) as server:
        c = Client(("127.0.0.1", server.port), no_delay=True, default_noreply=False)
        try:

            def stats() -> dict[bytes, Any]:
                return c.stats()  # type: ignore[no-any-return]

            value = b"v" * value_size
            limit = 4 * capacity // (KEY_SIZE + value_size) + BATCH
            written = _fill_until(c.set_many, lambda: int(stats()[b"evictions"]) > 0, value, limit)
            st = stats()
            items, limit_bytes = int(st[b"curr_items"]), int(st[b"limit_maxbytes"])
            rss = _rss(server.proc.pid if server.proc else 0)
            return MemoryResult(
                "memcached", value_size, items, limit_bytes, limit_bytes / items,
                KEY_SIZE + value_size, "limit_maxbytes (-m) / curr_items at the first eviction",
                {"written": written, "bytes": int(st[b"bytes"]),
                 "bytes_per_item": int(st[b"bytes"]) / items, "rss_bytes": rss},
            )  # fmt: skip
        finally:
            c.close()


def redis_per_item(value_size: int, capacity: int) -> MemoryResult:
    import redis

    from .servers import RedisServer

    with RedisServer(maxmemory=capacity) as server:
        r = redis.Redis(host="127.0.0.1", port=server.port)
        try:
            value = b"v" * value_size
            limit = 4 * capacity // (KEY_SIZE + value_size) + BATCH
            written = _fill_until(
                r.mset, lambda: int(r.info("stats")["evicted_keys"]) > 0, value, limit
            )
            items = int(r.dbsize())
            used = int(r.info("memory")["used_memory"])
            return MemoryResult(
                "redis", value_size, items, capacity, capacity / items, KEY_SIZE + value_size,
                "maxmemory / dbsize at the first eviction (allkeys-lru)",
                {"written": written, "used_memory": used,
                 "rss_bytes": _rss(server.proc.pid if server.proc else 0)},
            )  # fmt: skip
        finally:
            r.close()


def _rss(pid: int) -> int | None:
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except Exception:  # noqa: BLE001 -- a fact for the report, never a failure
        return None


def measure(
    value_sizes: list[int],
    capacity: int = 64 << 20,
    backends: tuple[str, ...] = ("shmkv", "lmdb", "memcached", "redis"),
) -> tuple[list[MemoryResult], list[tuple[str, str]]]:
    """Every backend that can run here, at every value size; returns (results, skipped)."""
    from .adapters import BackendConfig, make

    results: list[MemoryResult] = []
    skipped: list[tuple[str, str]] = []
    cfg = BackendConfig(
        keys=1,
        key_size=KEY_SIZE,
        item_bytes=KEY_SIZE + 1,
        max_item_bytes=KEY_SIZE + max(value_sizes),
    )
    available = {}
    for name in backends:
        reason = make(name, cfg).unavailable()
        available[name] = reason is None
        if reason:
            skipped.append((name, reason))
    for vs in value_sizes:
        held = None
        if available.get("shmkv"):
            res = shmkv_per_item(vs, capacity)
            held = res.items
            results.append(res)
        if available.get("lmdb"):
            results.append(lmdb_per_item(vs, held or capacity // (KEY_SIZE + vs)))
        if available.get("memcached"):
            results.append(memcached_per_item(vs, capacity))
        if available.get("redis"):
            results.append(redis_per_item(vs, capacity))
    return results, skipped
