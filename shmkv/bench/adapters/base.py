"""The contract every backend adapter keeps.

Life cycle, and which process runs each step::

    parent:  a = Adapter(config)      # nothing opened yet
             reason = a.unavailable()  # None, or a one-line reason to skip this backend
             a.setup()                # create the store: temp dir, server, segment, manager
             a.open(); fill; a.close()      # fill, for shared backends
             -- for each process count: pickle `a` to N spawned workers --
    worker:  a.open()                 # attach / connect from this process
             ... a.get(k) / a.put(k, v) / ... in the timed loop ...
             a.close()
    parent:  a.teardown()             # always, also after an error or Ctrl-C

The op attributes (``get``, ``put``, ...) are plain callables set by ``open()``. Where the
backend's own method already has the contract below they *are* that bound method, so the timed
loop pays no wrapper call for shmkv, dict or redis-py; a wrapper is used only where the peer
needs one (an LMDB transaction, a miss sentinel).

Op contracts (keys and values are bytes):

- ``get(key) -> bytes | None``; ``put(key, value) -> Any``; ``delete(key) -> Any``;
- ``get_many(keys) -> Mapping`` with at least the found keys (``len()`` counts hits);
- ``put_many(mapping)``; ``delete_many(keys)``;
- ``incr(key) -> int``: add 1 to a decimal counter, creating it at 1 if missing;
- ``scan(key, n) -> int``: read up to ``n`` (key, value) pairs in key order from ``key`` on,
  returning how many (only where ``scans`` is True: shmkv, shmkv-btree, LMDB).

An adapter is pickled to spawned workers: ``__getstate__`` keeps only the parameters that
``setup()`` chose (paths, ports, names), never an open handle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class BackendConfig:
    """What the runner tells every adapter about the store it should create.

    ``capacity``: bytes the store may hold (shmkv segment, memcached ``-m``, Redis
    ``maxmemory``, diskcache ``size_limit``); ``None`` = size it to hold every key.
    ``item_bytes``/``keys``: the workload's key+value bytes and key count, to size stores.
    """

    keys: int
    key_size: int
    item_bytes: int
    max_item_bytes: int
    capacity: int | None = None
    redis_url: str | None = None
    memcached_addr: str | None = None
    run_id: str = "0"

    def default_size(self, floor: int = 64 * 1024**2) -> int:
        """Bytes a store needs to hold every key with room to spare (2x + 256 B/item)."""
        return max(floor, 2 * self.keys * (self.item_bytes + 256))


Op1 = Callable[[bytes], Any]
OPS = ("get", "put", "delete", "get_many", "put_many", "delete_many", "incr", "scan")


def _unset(*_: Any) -> Any:
    raise RuntimeError("adapter is not open: call open() first")


class Adapter:
    """Base class: see the module docstring for the life cycle and op contracts."""

    name: ClassVar[str] = "?"
    # The table's one-line description of what is measured.
    label: ClassVar[str] = ""
    # False for in-process stores (dict): each worker has its own copy and fills it itself.
    shared: ClassVar[bool] = True
    # Largest process count that makes sense (dict: 1); None = any.
    max_procs: ClassVar[int | None] = None
    # False when the backend cannot bound its memory (dict, Manager, LMDB): with a capacity
    # set, such a backend is skipped with a reason instead of measured unfairly.
    evicts: ClassVar[bool] = True
    # True when the backend has an ordered scan (``scan``): a --mix with scan skips the others.
    scans: ClassVar[bool] = False

    get: Op1
    put: Callable[[bytes, bytes], Any]
    delete: Op1
    get_many: Callable[[list[bytes]], Mapping[bytes, bytes]]
    put_many: Callable[[dict[bytes, bytes]], Any]
    delete_many: Callable[[list[bytes]], Any]
    incr: Callable[[bytes], int]
    scan: Callable[[bytes, int], int]

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self._clear_ops()

    def _clear_ops(self) -> None:
        for op in OPS:
            setattr(self, op, _unset)

    # -- parent side -----------------------------------------------------------------------
    @staticmethod
    def missing_package(module: str, label: str | None = None) -> str | None:
        """A one-line reason when the optional client package `module` cannot be imported."""
        try:
            __import__(module)
        except ImportError:
            return f"{label or module} not installed (pip install 'shmkv[bench]')"
        return None

    def unavailable(self) -> str | None:
        """None if this backend can run here, else a one-line reason (missing package or
        binary, or a capacity the backend cannot honour). Must not raise."""
        if self.config.capacity is not None and not self.evicts:
            return f"{self.name} cannot bound its memory, so it cannot run a capacity (eviction) workload"
        return None

    def setup(self) -> None:
        """Create the store (parent, once per backend). REQUIRES: ``unavailable()`` is None."""

    def teardown(self) -> None:
        """Destroy what ``setup()`` created. Idempotent; safe after a failed ``setup()``."""

    def describe(self) -> str:
        """Facts for the report (server version, flags); empty if none."""
        return ""

    # -- any process -----------------------------------------------------------------------
    def open(self) -> None:
        """Attach/connect from this process and bind the op callables."""
        raise NotImplementedError

    def close(self) -> None:
        """Release this process's handle; the store itself stays (see ``teardown``)."""
        self._clear_ops()

    def counters(self) -> dict[str, int]:
        """Events this handle counted since ``open()`` that the report shows beside the
        throughput (shmkv: writes refused with StoreFull in an eviction run). REQUIRES: open."""
        return {}

    def __getstate__(self) -> dict[str, Any]:
        # Keep parameters only: open handles and bound ops are per process.
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_h")}
        for op in OPS:
            state.pop(op, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._clear_ops()

    def __enter__(self) -> Adapter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
