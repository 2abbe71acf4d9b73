"""shmkv itself: every worker attaches the same named shared-memory segment."""

from __future__ import annotations

import os
from typing import Any

from .base import Adapter

PREFIX = "shmkv-bench-"


def remove_stale_stores() -> list[str]:
    """Unlink ``shmkv-bench-<pid>-…`` segments whose benchmark process is gone (one killed
    with SIGKILL cannot unlink its own). Returns the names removed."""
    import shmkv

    removed = []
    for name in shmkv.list_stores():
        if not name.startswith(PREFIX):
            continue
        pid_text = name[len(PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        try:
            shmkv.unlink(name)
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShmkvAdapter(Adapter):
    name = "shmkv"
    label = "shmkv: one shared-memory segment, attached by every process"
    engine = "hash"
    # engine "hash" scans by sorting a snapshot of every key (O(n log n) per scan): measured
    # so the table shows what the btree engine buys
    scans = True

    def unavailable(self) -> str | None:
        try:
            import shmkv

            shmkv.attach  # noqa: B018 -- loads the compiled extension
        except (ImportError, AttributeError) as e:
            return f"shmkv extension not built: run python setup.py build_ext --inplace ({e})"
        return super().unavailable()

    def setup(self) -> None:
        import shmkv

        remove_stale_stores()
        self.store_name = f"{PREFIX}{os.getpid()}-{self.config.run_id}-{self.engine}"
        self.size = self.config.capacity or self.config.default_size()
        # Create it here, so that workers only attach and the fill sees a fresh segment.
        kv = shmkv.attach(self.store_name, size=self.size, engine=self.engine)
        kv.clear()
        kv.close()
        self._created = True

    def teardown(self) -> None:
        if getattr(self, "_created", False):
            import shmkv

            try:
                shmkv.unlink(self.store_name)
            except FileNotFoundError:
                pass
            self._created = False

    def describe(self) -> str:
        return f"segment {self.size // 1024**2} MiB, engine {self.engine}"

    def open(self) -> None:
        import shmkv

        kv = self._h_kv = shmkv.attach(self.store_name, size=self.size)
        # The store's own bound methods already keep the adapter contract: no wrappers --
        # except in an eviction run (a capacity), where a write refused with StoreFull is
        # counted and the run goes on, so the report can say how many there were. That
        # wrapper costs one Python call per put there (the peers pay a socket round trip).
        self._h_full = 0
        self.get = kv.get
        self.put = kv.put if self.config.capacity is None else self._counting(kv.put)
        self.delete = kv.delete
        self.get_many = kv.get_many
        self.put_many = kv.put_many if self.config.capacity is None else self._counting(kv.put_many)
        self.delete_many = kv.delete_many
        self.incr = kv.incr
        scan = kv.scan

        def scan_n(key: bytes, n: int) -> int:
            return sum(1 for _ in scan(key, limit=n))

        self.scan = scan_n

    def _counting(self, op: Any) -> Any:
        import shmkv

        def counted(*args: Any) -> Any:
            try:
                return op(*args)
            except shmkv.StoreFull:
                self._h_full += 1
                return None

        return counted

    def counters(self) -> dict[str, int]:
        return {"store_full": self._h_full} if self.config.capacity is not None else {}

    def stats(self) -> dict[str, Any]:
        """The store's ``stats()`` (REQUIRES: open)."""
        return dict(self._h_kv.stats())

    def close(self) -> None:
        kv = self.__dict__.pop("_h_kv", None)
        if kv is not None:
            kv.close()
        super().close()


class ShmkvBtreeAdapter(ShmkvAdapter):
    name = "shmkv-btree"
    label = "shmkv engine='btree': the hash table plus an ordered B+tree index in the segment"
    engine = "btree"
