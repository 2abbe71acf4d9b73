"""The store façade: `shmkv.attach()` and the `Store` handle.

`Store` subclasses the extension type, so `kv.get`, `kv[k]`, `kv.put` are single C calls
with no Python frame in between (a Python wrapper method would cost more than the lookup).
This module adds what is not hot: attach arguments, codecs, iteration, stats, fork safety.

Process safety: any number of processes may attach the same store and call anything
concurrently; threads of one process may share a handle. A handle must not be closed while
another thread is using it (close() raises instead).
"""

from __future__ import annotations

import os
import pickle
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from . import _core, segment, snapshot
from .errors import CodecError, InvalidArgument
from .lsm import LSM
from .sizes import parse_size

DEFAULT_SIZE = "64MiB"
DEFAULT_MAX_KEY = 1024
DEFAULT_GROWTH = 1.08
DEFAULT_LOCK_STRIPES = 1024
# Pinned, and recorded in the header at creation: peers broke across Python versions by
# pickling with the highest protocol of whichever interpreter wrote first.
PICKLE_PROTOCOL = 5

_live: weakref.WeakSet[Store] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    segment.lock_files.after_fork()
    for store in list(_live):
        store._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Store(_core.Core):
    """A handle on a shared-memory store. Create with :func:`attach`.

    Keys are ``bytes`` or ``str`` (stored as UTF-8; scans return bytes); values are
    bytes-like and come back as ``bytes``.

    With a ``path``, memory is the hot tier of a persistent store: every write goes through
    to the LSM under ``path`` (durable as ``durability`` says) while the key's stripe lock is
    held, so memory never contradicts disk; a memory miss reads through the LSM and promotes
    the item; values too big for memory live on disk only; eviction just drops the memory copy.
    """

    codec = "raw"
    path: str | None = None
    _tier: LSM | None
    _tier_args: dict[str, Any] = {}

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap the segment and leave the process table (and close the disk tier);
        further use raises StoreClosed."""
        if not self.closed:
            super().close()
            segment.lock_files.release(self.name)
            if self._tier is not None:
                self._tier.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} items"
        return f"<shmkv.Store {self.name!r} ({self.codec}) {state}>"

    def keys(self) -> Iterator[bytes]:
        """Every key, weakly consistent: each stripe is copied under its lock, so a key
        present throughout the scan is returned exactly once; concurrent changes may or
        may not show. With a path: every live key on disk, in key order."""
        if self._tier is not None:
            return (k for k, _ in self._tier.scan())
        return self._scan(0)

    def __iter__(self) -> Iterator[bytes]:
        return self.keys()

    def items(self) -> Iterator[tuple[bytes, Any]]:
        """Every (key, value) pair, weakly consistent like :meth:`keys`."""
        if self._tier is not None:
            return self._tier.scan()
        return self._scan(1)

    def scan(self, start: bytes | str | None = None, stop: bytes | str | None = None) -> Iterator[tuple[bytes, Any]]:
        """(key, value) pairs with start <= key < stop, in key order. With a path this is a
        merge of the sorted runs on disk (which hold every item); memory-only stores sort
        a snapshot of their keys."""
        lo = start.encode() if isinstance(start, str) else start
        hi = stop.encode() if isinstance(stop, str) else stop
        if self._tier is not None:
            return self._tier.scan(lo, hi)
        pairs = sorted(p for p in self._scan(1) if (lo is None or p[0] >= lo) and (hi is None or p[0] < hi))
        return iter(pairs)

    def __len__(self) -> int:
        """Items in the store. Memory only: a counter (O(1)). With a path: live keys on disk,
        counted by a scan (O(n))."""
        if self._tier is not None:
            self._check_open()
            return sum(1 for _ in self._tier.scan())
        return super().__len__()

    def _check_open(self) -> None:
        if self.closed:
            from .errors import StoreClosed

            raise StoreClosed(f"store {self.name!r} is closed")

    def clear(self) -> None:
        """Remove every item (with a path: from disk too, by tombstones)."""
        if self._tier is not None:
            self._check_open()
            for k in list(self.keys()):
                self.delete(k)
        super().clear()

    def verify(self) -> list[str]:
        """Check every structure of memory (and disk, with a path); [] when clean."""
        problems = super().verify()
        if self._tier is not None:
            problems += [f"disk: {p}" for p in self._tier.verify()]
        return problems

    def dump(self, file: str | os.PathLike[str]) -> int:
        """Snapshot the memory tier to `file` (atomically replaced); returns the item count.
        Reload with :func:`shmkv.restore` or :meth:`load` for a warm restart."""
        self._check_open()
        return snapshot.dump(self, file)

    def load(self, file: str | os.PathLike[str]) -> int:
        """Put every unexpired item of a snapshot into this store; returns how many."""
        self._check_open()
        return snapshot.load(self, file)

    def _put_raw(self, key: bytes, value: bytes, ttl: float | None) -> None:
        _core.Core.put(self, key, value, ttl)

    def _after_fork(self) -> None:
        super()._after_fork()
        if self._tier is not None and self.path is not None:
            # an LSM handle must not cross a fork (its flocks would be shared): reopen
            self._tier = LSM(self.path, **self._tier_args)

    def values(self) -> Iterator[Any]:
        return (v for _, v in self.items())

    def stats(self) -> dict[str, Any]:
        """Counters (summed over every process that attached), memory use and geometry;
        with a path, "disk" holds the LSM's (disk bytes, files per level, bloom filter
        false positives, write amplification, compactions)."""
        out: dict[str, Any] = {"name": self.name, "codec": self.codec, "path": self.path}
        out.update(self._raw_stats())
        gets = out["gets"]
        out["hit_ratio"] = out["hits"] / gets if gets else None
        if self._tier is not None:
            out["disk"] = self._tier.stats()
        return out


class PickleStore(Store):
    """A store whose values are Python objects, pickled with the protocol pinned in the
    segment's header. Keys stay bytes or str."""

    codec = "pickle"

    def _encode(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
        except Exception as e:
            raise CodecError(f"cannot pickle {type(value).__name__}: {e}") from e

    @staticmethod
    def _decode(raw: bytes) -> Any:
        try:
            return pickle.loads(raw)
        except Exception as e:
            raise CodecError(f"stored value does not unpickle: {e}") from e

    _MISSING = object()

    def get(self, key: Any, default: Any = None) -> Any:
        raw = super().get(key, self._MISSING)
        return default if raw is self._MISSING else self._decode(raw)

    def __getitem__(self, key: Any) -> Any:
        return self._decode(super().__getitem__(key))

    def put(self, key: Any, value: Any, ttl: float | None = None) -> None:
        super().put(key, self._encode(value), ttl)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().put(key, self._encode(value))

    def add(self, key: Any, value: Any, ttl: float | None = None) -> bool:
        return super().add(key, self._encode(value), ttl)

    def get_many(self, keys: Iterable[Any]) -> dict[Any, Any]:
        return {k: self._decode(v) for k, v in super().get_many(keys).items()}

    def put_many(self, mapping: Mapping[Any, Any] | Iterable[tuple[Any, Any]], ttl: float | None = None) -> None:
        pairs = mapping.items() if isinstance(mapping, Mapping) else mapping
        super().put_many([(k, self._encode(v)) for k, v in pairs], ttl)

    def items(self) -> Iterator[tuple[bytes, Any]]:
        return ((k, self._decode(v)) for k, v in super().items())

    def scan(self, start: bytes | str | None = None, stop: bytes | str | None = None) -> Iterator[tuple[bytes, Any]]:
        return ((k, self._decode(v)) for k, v in super().scan(start, stop))

    def incr(self, key: Any, delta: int = 1) -> int:
        raise InvalidArgument("incr needs a raw store: counters are stored as decimal bytes")


def _default_max_item(size: int) -> int:
    """1 MiB, or size/64 (at least 64 KiB) for stores under 64 MiB: a page must hold the
    largest item, and a small store needs enough pages for every slab class in use."""
    limit = 1 << 20
    while limit > 64 << 10 and limit * 64 > size:
        limit //= 2
    return limit


_CODECS = {None: None, "raw": segment.CODEC_RAW, "pickle": segment.CODEC_PICKLE}


def attach(
    name: str,
    size: int | str | None = None,
    *,
    create: bool = True,
    codec: str | None = None,
    max_key: int | None = None,
    max_item: int | str | None = None,
    growth_factor: float = DEFAULT_GROWTH,
    lock_stripes: int = DEFAULT_LOCK_STRIPES,
    path: str | os.PathLike[str] | None = None,
    durability: str = "fsync",
    interval_ms: int = 50,
) -> Store:
    """Create-or-attach the store `name`, from any process, in any order.

    :param name: store name (A-Z a-z 0-9 _ . -); the segment is /dev/shm/shmkv.<name>.
    :param size: segment size (``"256MiB"``, ``"1GiB"`` or bytes). When the store exists it
        must match (else :class:`SegmentMismatch`); ``None`` attaches whatever exists and
        creates 64 MiB otherwise. The memory is reserved at creation.
    :param create: create the store if it does not exist (else :class:`StoreNotFound`).
    :param codec: ``"raw"`` (bytes values, the fast path) or ``"pickle"`` (any picklable
        object); fixed at creation. ``None`` takes the existing store's codec, raw when creating.
    :param max_key: longest key in bytes (default 1024, at most 65535).
    :param max_item: in-memory item limit: 36-byte header + key + value (default 1 MiB;
        size/64 for stores under 64 MiB, at least 64 KiB).
    :param growth_factor: ratio between successive slab chunk sizes (default 1.08; memcached
        uses 1.25, which wastes more memory per item).
    :param lock_stripes: number of bucket lock stripes (a power of two; default 1024).
    :param path: a directory for the disk tier (an LSM tree): memory becomes the hot tier of
        a persistent store. Every process attaching the store should pass the same path.
    :param durability: with a path: ``"fsync"`` (a write returns once it is on disk: it
        survives SIGKILL of every process, loss of the segment, and a host crash),
        ``"interval"`` (fsync every ``interval_ms``, group commit: a host crash loses at most
        that much), ``"none"`` (a cache: survives process crashes, not host crashes).
    :raises SegmentMismatch: the existing store differs (size, layout version, codec, limits).
    :raises StoreFull: the segment cannot be reserved (``/dev/shm`` too small).
    :raises InvalidArgument, InvalidType: bad arguments.
    """
    segment.check_name(name)
    if codec not in _CODECS:
        raise InvalidArgument(f"codec must be 'raw' or 'pickle', not {codec!r}")
    explicit = {f for f, v in (("max_key", max_key), ("max_item", max_item)) if v is not None}
    want_size = parse_size(size) if size is not None else None
    params_size = want_size if want_size is not None else parse_size(DEFAULT_SIZE)
    mk = DEFAULT_MAX_KEY if max_key is None else max_key
    if isinstance(mk, bool) or not isinstance(mk, int) or not 1 <= mk <= 65535:
        raise InvalidArgument(f"max_key must be an int in 1..65535, got {max_key!r}")
    mi = parse_size(max_item, "max_item") if max_item is not None else _default_max_item(params_size)
    if not 64 + mk <= mi <= 1 << 30:
        raise InvalidArgument(f"max_item must be between max_key + 64 bytes and 1 GiB, got {mi}")
    if not 1.01 <= float(growth_factor) <= 4.0:
        raise InvalidArgument(f"growth_factor must be in 1.01..4.0, got {growth_factor!r}")
    if isinstance(lock_stripes, bool) or not isinstance(lock_stripes, int) or not 1 <= lock_stripes <= 1 << 16:
        raise InvalidArgument(f"lock_stripes must be an int in 1..65536, got {lock_stripes!r}")
    codec_id = _CODECS[codec]
    params = segment.CreateParams(
        size=params_size,
        max_key=mk,
        max_item=(mi + 7) // 8 * 8,
        growth=float(growth_factor),
        lock_stripes=lock_stripes,
        codec=segment.CODEC_RAW if codec_id is None else codec_id,
        codec_arg=PICKLE_PROTOCOL,
    )
    # codec=None takes the existing store's codec; the header decides which class to use.
    cls = PickleStore if codec_id == segment.CODEC_PICKLE else Store
    for _ in range(2):
        store = cls()
        segment.open_segment(store, name, want_size, create, params, explicit, codec_id)
        actual = PickleStore if store.codec_id == segment.CODEC_PICKLE else Store
        if actual is cls:
            if path is not None:
                tier_args: dict[str, Any] = {"durability": durability, "interval_ms": interval_ms}
                try:
                    store._tier = LSM(path, **tier_args)
                except BaseException:
                    store.close()
                    raise
                store.path = os.fspath(path)
                store._tier_args = tier_args
            _live.add(store)
            return store
        store.close()
        cls = actual
    raise AssertionError("unreachable: the codec is fixed at creation")


def unlink(name: str) -> None:
    """Remove the store `name` (attached processes keep their mapping until they close)."""
    segment.unlink(name)


def restore(file: str | os.PathLike[str], name: str, size: int | str | None = None, **kwargs: Any) -> Store:
    """Attach (creating if needed) store `name` and load the snapshot `file` into it."""
    store = attach(name, size, **kwargs)
    try:
        store.load(file)
    except BaseException:
        store.close()
        raise
    return store


def list_stores() -> list[str]:
    """Names of the shmkv stores on this host."""
    return segment.list_stores()
