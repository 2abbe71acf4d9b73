"""The store façade: `shmkv.attach()` and the `Store` handle.

`Store` subclasses the extension type, so `kv.get`, `kv[k]`, `kv.put` are single C calls
with no Python frame in between (a Python wrapper method would cost more than the lookup).
This module adds what is not hot: attach arguments, codecs, iteration, stats, fork safety.

Process safety: any number of processes may attach the same store and call anything
concurrently; threads of one process may share a handle. A handle must not be closed while
another thread is using it (close() raises instead).
"""

from __future__ import annotations

import itertools
import numbers
import os
import pickle
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType
from typing import Any

from . import segment, snapshot, tiered
from ._ext import _core
from .errors import CodecError, EngineMismatch, Error, InvalidArgument, InvalidType, SegmentMismatch
from .lsm import LSM, storemeta
from .lsm.db import WAL_RECOVERY
from .lsm.errors import FileAccessError
from .sizes import parse_size

DEFAULT_SIZE = "64MiB"
DEFAULT_MAX_KEY = 1024
DEFAULT_GROWTH = 1.08
DEFAULT_LOCK_STRIPES = 1024
# Pinned, and recorded in the header at creation: peers broke across Python versions by
# pickling with the highest protocol of whichever interpreter wrote first.
PICKLE_PROTOCOL = 5

_live: weakref.WeakSet[Store] = weakref.WeakSet()
_BTREE = segment.ENGINE_BTREE


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
    path: str | None = None  # the disk tier's directory (absolute), None: memory only
    durability: str | None = None  # the store's, with a path
    _tier: LSM | None
    _tiering: ModuleType | None  # shmkv.tiered beside a disk tier: what add/incr/cas do there
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
        # Never reads the disk tier: len() there is a scan of every table, and a repr (a
        # debugger, a log line) must neither take O(n) nor raise Corruption.
        if self.closed:
            state = "closed"
        elif self._tier is not None:
            state = f"path={self.path!r}"
        else:
            state = f"{len(self)} items"
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

    @property
    def engine(self) -> str:
        """``"hash"`` or ``"btree"``: the in-memory engine, fixed at creation (README "Engines")."""
        return segment.ENGINE_NAMES.get(self.engine_id, "hash")

    def scan(
        self,
        start: bytes | str | None = None,
        stop: bytes | str | None = None,
        *,
        prefix: bytes | str | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> Iterator[tuple[bytes, Any]]:
        """(key, value) pairs with start <= key < stop (``prefix``: the keys that start with
        it), in key order (``reverse``: descending), at most ``limit`` of them; lazy.

        Engine ``"btree"``, memory only: read from the ordered index in batches, without a
        lock; each batch resumes strictly after the last key returned, so a key live during
        the whole scan is returned exactly once, in order, whatever other processes write
        meanwhile (keys written or deleted during the scan may or may not show). Expired keys
        are never returned. With a path (either engine) this is the merge of the sorted runs
        on disk, which hold every item (writes go through to disk), a snapshot at the first
        ``next()``; ``reverse`` there reads the range first. Engine ``"hash"``, memory only:
        a sorted snapshot of the stripes, O(n log n) -- pick ``"btree"`` for range queries.

        :raises InvalidType: a bound or prefix that is not bytes/str, a ``limit`` not an int.
        :raises InvalidArgument: ``start > stop``, ``prefix`` with ``start``/``stop``,
            ``limit <= 0``.
        """
        # (bytes bounds and an int limit are checked inline: a short scan is ~1 us in all)
        lo = start if start is None or type(start) is bytes else _scan_bound(start, "start")
        hi = stop if stop is None or type(stop) is bytes else _scan_bound(stop, "stop")
        if prefix is not None:
            if lo is not None or hi is not None:
                raise InvalidArgument("scan takes either prefix= or start/stop bounds, not both")
            p = _scan_bound(prefix, "prefix")
            assert p is not None
            lo, hi = p, _prefix_end(p)
        if lo is not None and hi is not None and lo > hi:
            raise InvalidArgument(f"scan start {lo!r} is greater than stop {hi!r}")
        if limit is not None:
            if type(limit) is not int and (isinstance(limit, bool) or not isinstance(limit, int)):
                raise InvalidType(f"scan limit must be an int or None, not {type(limit).__name__}")
            if limit <= 0:
                raise InvalidArgument(f"scan limit must be > 0 (or None for no limit), got {limit}")
        return self._ordered(lo, True, hi, False, bool(reverse), limit)

    def first(self) -> tuple[bytes, Any] | None:
        """The (key, value) of the smallest live key, None when empty."""
        return next(self._ordered(None, True, None, False, False, 1), None)

    def last(self) -> tuple[bytes, Any] | None:
        """The (key, value) of the largest live key, None when empty."""
        return next(self._ordered(None, True, None, False, True, 1), None)

    def floor(self, key: bytes | str) -> tuple[bytes, Any] | None:
        """The (key, value) of the largest live key <= `key`, None if there is none."""
        k = _scan_bound(key, "key")
        if k is None:
            raise InvalidType("floor() needs a key, not None")
        return next(self._ordered(None, True, k, True, True, 1), None)

    def ceiling(self, key: bytes | str) -> tuple[bytes, Any] | None:
        """The (key, value) of the smallest live key >= `key`, None if there is none."""
        k = _scan_bound(key, "key")
        if k is None:
            raise InvalidType("ceiling() needs a key, not None")
        return next(self._ordered(k, True, None, False, False, 1), None)

    def _ordered(self, lo: bytes | None, lo_incl: bool, hi: bytes | None, hi_incl: bool,
                 reverse: bool, limit: int | None) -> Iterator[tuple[bytes, Any]]:
        """Live (key, stored value) pairs between the bounds (each inclusive or not), in key
        order or reversed, at most `limit`: the one ordered read under scan, first, last,
        floor and ceiling."""
        if self._tier is None and self.engine_id == _BTREE:  # (engine_id raises StoreClosed)
            # batches copied in C, pairs made one by one in C (ext/_core.pyx: _TreeScan)
            return self._tree_scan(lo, lo_incl, hi, hi_incl, reverse, limit)
        self._check_open()
        # Half-open [lo, hi) for the sorted-run merge: "> k" is ">= k + b'\0'" in bytes order.
        if lo is not None and not lo_incl:
            lo += b"\0"
        if hi is not None and hi_incl:
            hi += b"\0"
        if self._tier is not None:
            pairs: Iterator[tuple[bytes, Any]] = self._tier.scan(lo, hi)
        else:
            pairs = iter(sorted(p for p in self._scan(1)
                                if (lo is None or p[0] >= lo) and (hi is None or p[0] < hi)))
        if reverse:
            pairs = reversed(list(pairs))
        return pairs if limit is None else itertools.islice(pairs, limit)

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

    _CLEAR_BATCH = 65536  # keys per tombstone batch: one WAL append + one fsync each

    def clear(self) -> None:
        """Remove every item (with a path: from disk too, by tombstones, written in batches
        of one WAL append and one fsync each, as delete_many)."""
        if self._tier is not None:
            self._check_open()
            keys = list(self.keys())  # a snapshot: the scan must not see its own tombstones
            for i in range(0, len(keys), self._CLEAR_BATCH):
                self.delete_many(keys[i : i + self._CLEAR_BATCH])
        super().clear()

    def verify(self) -> list[str]:
        """Check every structure of memory (and disk, with a path); [] when clean."""
        problems = super().verify()
        if self._tier is not None:
            problems += [f"disk: {p}" for p in self._tier.verify()]
        return problems

    def dump(self, file: str | os.PathLike[str]) -> int:
        """Snapshot the memory tier, with the store's codec and limits, to `file` (atomically
        replaced); returns the item count. Reload with :func:`shmkv.restore` or :meth:`load`
        for a warm restart.

        :raises DiskFull, FileAccessError: `file` cannot be written (a directory, a missing
            directory, a full disk); no temporary file is left behind.
        """
        self._check_open()
        meta = {"codec": self.codec_id, "codec_arg": PICKLE_PROTOCOL, "max_key": self.max_key,
                "max_item": self.max_item}
        return snapshot.dump(file, meta, self._scan(2))

    def load(self, file: str | os.PathLike[str]) -> int:
        """Put every unexpired item of a snapshot into this store; returns how many. The
        snapshot is checked whole first (checksum, codec, every key and item against this
        store's limits): one that does not fit raises and loads nothing.

        :raises Corruption: a damaged file. :raises SegmentMismatch: another codec, or an item
            over this store's limits.
        """
        self._check_open()
        return self._load_snapshot(snapshot.read(file))

    def _load_snapshot(self, snap: snapshot.Snapshot) -> int:
        """Store every unexpired item of `snap` (read and verified whole), after checking
        that each one fits (snapshot.plan_load: a mismatch loads nothing); returns how many.
        Values go in as stored bytes, past the codec (Core.put), whatever this class is."""
        target = snapshot.Target(self.name, self.codec_id, self.max_key, self.max_item,
                                 on_disk=self._tier is not None)
        items = snapshot.plan_load(snap, target)
        for key, value, ttl in items:
            _core.Core.put(self, key, value, ttl)
        return len(items)

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
        out: dict[str, Any] = {"name": self.name, "codec": self.codec, "path": self.path,
                               "durability": self.durability}
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

    _MISSING: Any = object()  # Any: get(key, _MISSING) then is bytes | Any

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
        try:
            pairs = list(mapping.items() if isinstance(mapping, Mapping) else mapping)
        except TypeError:
            raise InvalidType(
                f"put_many takes a mapping or an iterable of (key, value) pairs, not {type(mapping).__name__}"
            ) from None
        for pair in pairs:  # the same check as the raw store's, before anything is pickled
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidType(f"put_many: each item must be a (key, value) pair, got {pair!r:.80}")
        super().put_many([(k, self._encode(v)) for k, v in pairs], ttl)

    def items(self) -> Iterator[tuple[bytes, Any]]:
        return ((k, self._decode(v)) for k, v in super().items())

    def _ordered(self, lo: bytes | None, lo_incl: bool, hi: bytes | None, hi_incl: bool,
                 reverse: bool, limit: int | None) -> Iterator[tuple[bytes, Any]]:
        return ((k, self._decode(v)) for k, v in super()._ordered(lo, lo_incl, hi, hi_incl, reverse, limit))

    def incr(self, key: Any, delta: int = 1) -> int:
        raise InvalidArgument("incr needs a raw store: counters are stored as decimal bytes")

    def cas(self, key: Any, expected: Any, new: Any, ttl: float | None = None) -> bool:
        # Rejected: comparing pickles -- equal objects need not pickle to equal bytes.
        raise InvalidArgument("cas needs a raw store: it compares stored bytes, and equal objects "
                              "need not pickle to equal bytes")


def _prefix_end(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key that starts with `prefix` (None: no bound,
    the prefix is empty or all 0xff bytes)."""
    p = prefix.rstrip(b"\xff")
    return p[:-1] + bytes([p[-1] + 1]) if p else None


def _scan_bound(bound: bytes | str | None, what: str) -> bytes | None:
    if bound is None or type(bound) is bytes:
        return bound
    if isinstance(bound, str):
        try:
            return bound.encode()
        except UnicodeEncodeError as e:
            raise InvalidArgument(f"scan {what} {bound!r} has no UTF-8 encoding ({e.reason})") from None
    if isinstance(bound, (bytes, bytearray, memoryview)):
        return bytes(bound)
    raise InvalidType(f"scan {what} must be bytes, str or None, not {type(bound).__name__}")


def _check_path(path: str | os.PathLike[str]) -> str:
    """`path` as a str, when it can be (or is) a disk tier's directory. Checked before the
    segment is touched, so a bad path leaves nothing behind in /dev/shm."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise InvalidType(f"path must be a str or os.PathLike, not {type(path).__name__}")
    p = os.fspath(path)
    if not isinstance(p, str) or not p:
        raise InvalidArgument(f"path must be a non-empty directory name, got {path!r}")
    if os.path.exists(p) and not os.path.isdir(p):
        raise InvalidArgument(f"path {p!r} is a file, not a directory: the disk tier needs a directory")
    # the nearest existing ancestor decides whether the directory can be made and written
    probe = os.path.abspath(p)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InvalidArgument(f"path {p!r} is under {probe!r}, which is a file, not a directory")
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise FileAccessError(30, f"path {p!r}: {probe!r} is on a read-only file system", p)  # EROFS
    return p


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
    durability: str | None = None,
    interval_ms: int | None = None,
    wal_recovery: str = "strict",
    engine: str | None = None,
) -> Store:
    """Create-or-attach the store `name`, from any process, in any order.

    :param name: store name (A-Z a-z 0-9 _ . -); the segment is /dev/shm/shmkv.<name>.
    :param size: segment size (``"256MiB"``, ``"1GiB"`` or bytes). When the store exists it
        must match (else :class:`SegmentMismatch`); ``None`` attaches whatever exists and
        creates 64 MiB otherwise (with a path: the size the directory records).
    :param create: create the store if it does not exist (else :class:`StoreNotFound`).
    :param codec: ``"raw"`` (bytes values, the fast path) or ``"pickle"`` (any picklable
        object); fixed at creation. ``None`` takes the existing store's codec (with a path:
        the one the directory records), raw when creating.
    :param max_key: longest key in bytes (default 1024, at most 65535).
    :param max_item: in-memory item limit: 36-byte header + key + value (default 1 MiB;
        size/64 for stores under 64 MiB, at least 64 KiB).
    :param growth_factor: ratio between successive slab chunk sizes (default 1.08; memcached
        uses 1.25, which wastes more memory per item).
    :param lock_stripes: number of bucket lock stripes (a power of two; default 1024).
    :param path: a directory for the disk tier (an LSM tree): memory becomes the hot tier of
        a persistent store. Resolved to an absolute path once, here, and recorded in the
        segment: every later attach without a path opens this directory, one with another
        path is refused. The directory records the codec and limits (its ``STORE`` file), so
        a segment re-created after a reboot comes back as it was.
    :param durability: a setting of the store, fixed when its segment is created: ``"fsync"``
        (the default: a write returns once it is on disk: it survives SIGKILL of every
        process, loss of the segment, and a host crash), ``"interval"`` (fsync every
        ``interval_ms``, group commit: a host crash loses at most that much), ``"none"`` (a
        cache: survives process crashes, not host crashes). ``None`` takes the store's.
    :param interval_ms: the fsync period of ``"interval"`` (default 50), fixed like durability.
    :param wal_recovery: with a path: what opening does with a damaged record in the disk
        tier's write-ahead log (a setting of this open, not of the store): ``"strict"``
        (default: raise :class:`Corruption`, drop nothing), ``"truncate"`` (drop the log from
        that record on) or ``"skip"`` (drop only the damaged records). Dropped bytes are kept
        in ``<path>/lost/``, logged, and reported by :meth:`Store.verify`. See the README,
        "A persistent store".
    :param engine: the in-memory engine, fixed at creation: ``"hash"`` (point lookups; the
        default) or ``"btree"`` (a hash table plus an ordered B+tree index in the segment:
        ``scan``, ``first``, ``last``, ``floor``, ``ceiling`` at memory speed; README
        "Engines"). ``None`` takes the existing store's (with a path: the directory's
        record), ``"hash"`` when creating.
    :raises EngineMismatch: the existing store has another engine (a SegmentMismatch).
    :raises SegmentMismatch: the existing store (or the directory's record) differs: size,
        layout version, codec, limits, path, durability; the message names both.
    :raises StoreFull: the segment cannot be reserved (``/dev/shm`` too small).
    :raises InvalidArgument, InvalidType: bad arguments (``durability`` without a path).
    """
    return _attach(name, size, create=create, codec=codec, max_key=max_key, max_item=max_item,
                   growth_factor=growth_factor, lock_stripes=lock_stripes, path=path,
                   durability=durability, interval_ms=interval_ms, wal_recovery=wal_recovery,
                   engine=engine)


def resolve_path(path: str | os.PathLike[str]) -> str:
    """The absolute, canonical form of a disk tier directory. Resolved once, at attach:
    kept relative, a forked worker that reopens the tier after an ``os.chdir`` would open
    (and write into) a new, empty store somewhere else."""
    return os.path.realpath(os.fspath(path))


def _record_mismatch(name: str, dirpath: str, rec: dict[str, Any], want: dict[str, Any], what: str) -> None:
    """Refuse an attach whose codec or limits contradict the directory's record."""
    if rec.get("name") != name:
        raise SegmentMismatch(
            f"{dirpath!r} holds the disk tier of store {rec.get('name')!r}; {what} store "
            f"{name!r}: a directory serves one store (two segments over it would each keep "
            f"values in memory that the other changed on disk)"
        )
    for field in ("codec", "max_key", "max_item", "engine"):
        if field == "engine" and want.get(field) is not None and rec.get(field, 0) != want[field]:
            raise EngineMismatch(
                f"store {name!r} was created with engine "
                f"{segment.ENGINE_NAMES.get(rec.get(field, 0), rec.get(field))!r} (recorded in "
                f"{dirpath}/STORE); {what} engine {segment.ENGINE_NAMES.get(want[field], want[field])!r}"
            )
        if want.get(field) is not None and rec.get(field) != want[field]:
            have: Any = rec.get(field)
            asked: Any = want[field]
            if field == "codec":
                have, asked = repr(segment.CODEC_NAMES.get(have, have)), repr(segment.CODEC_NAMES.get(asked, asked))
            raise SegmentMismatch(
                f"store {name!r} was created with {field}={have} (recorded in "
                f"{dirpath}/STORE); {what} {field}={asked}"
            )


def _attach(
    name: str,
    size: int | str | None,
    *,
    create: bool,
    codec: str | None,
    max_key: int | None,
    max_item: int | str | None,
    growth_factor: float,
    lock_stripes: int,
    path: str | os.PathLike[str] | None,
    durability: str | None,
    interval_ms: int | None,
    wal_recovery: str = "strict",
    defaults: Mapping[str, Any] | None = None,
    engine: str | None = None,
) -> Store:
    """attach(); `defaults` (codec id, max_key, max_item: a snapshot's) shape a segment this
    call creates where neither the caller nor the directory's record says otherwise."""
    segment.check_name(name)
    if codec not in _CODECS:
        raise InvalidArgument(f"codec must be 'raw' or 'pickle', not {codec!r}")
    if engine is not None and engine not in segment.ENGINE_CODES:
        raise InvalidArgument(
            f"engine must be one of {tuple(segment.ENGINE_CODES)} (or None: the store's), not {engine!r}")
    engine_id = segment.ENGINE_CODES[engine] if engine is not None else None
    if durability is not None and durability not in segment.DURABILITY_CODES:
        raise InvalidArgument(
            f"durability must be one of {tuple(segment.DURABILITY_CODES)} (or None: the store's), "
            f"not {durability!r}"
        )
    if wal_recovery not in WAL_RECOVERY:
        raise InvalidArgument(f"wal_recovery must be one of {WAL_RECOVERY}, not {wal_recovery!r}")
    if interval_ms is not None and (isinstance(interval_ms, bool) or not isinstance(interval_ms, int)
                                    or not 0 < interval_ms < 1 << 31):
        raise InvalidArgument(f"interval_ms must be a positive int, got {interval_ms!r}")
    defaults = defaults or {}
    tier_path = resolve_path(_check_path(path)) if path is not None else None
    record = storemeta.read(tier_path) if tier_path is not None else None
    codec_id = _CODECS[codec]
    want_size = parse_size(size) if size is not None else None
    if max_key is not None and (isinstance(max_key, bool) or not isinstance(max_key, int)
                                or not 1 <= max_key <= 65535):
        raise InvalidArgument(f"max_key must be an int in 1..65535, got {max_key!r}")
    mi_given = parse_size(max_item, "max_item") if max_item is not None else None
    mi_asked = (mi_given + 7) // 8 * 8 if mi_given is not None else None  # as the header keeps it
    if record is not None and tier_path is not None:
        _record_mismatch(name, tier_path, record,
                         {"codec": codec_id, "max_key": max_key, "max_item": mi_asked,
                          "engine": engine_id}, "attach asked for")
    # What a segment created here is: the caller's word, else the directory's record (a
    # restart must not change the codec or the limits under the data), else `defaults`.
    shape: dict[str, Any] = {**{k: v for k, v in defaults.items() if v is not None},
                             **{k: record[k] for k in ("codec", "max_key", "max_item", "size")
                                if record is not None and k in record}}
    params_size = want_size or shape.get("size") or parse_size(DEFAULT_SIZE)
    mk = max_key if max_key is not None else shape.get("max_key", DEFAULT_MAX_KEY)
    mi = mi_given if mi_given is not None else shape.get("max_item", _default_max_item(params_size))
    if not 64 + mk <= mi <= 1 << 30:
        raise InvalidArgument(f"max_item must be between max_key + 64 bytes and 1 GiB, got {mi}")
    if isinstance(growth_factor, bool) or not isinstance(growth_factor, numbers.Real):
        raise InvalidType(f"growth_factor must be a number, not {type(growth_factor).__name__}")
    if not 1.01 <= float(growth_factor) <= 4.0:
        raise InvalidArgument(f"growth_factor must be in 1.01..4.0, got {growth_factor!r}")
    if isinstance(lock_stripes, bool) or not isinstance(lock_stripes, int) or not 1 <= lock_stripes <= 1 << 16:
        raise InvalidArgument(f"lock_stripes must be an int in 1..65536, got {lock_stripes!r}")
    if lock_stripes & (lock_stripes - 1):
        # rejected, not rounded: stats() would report a count the caller never asked for
        raise InvalidArgument(f"lock_stripes must be a power of two (1, 2, 4 ... 65536), got {lock_stripes}")
    explicit = {f for f, v in (("max_key", max_key), ("max_item", max_item)) if v is not None}
    new_codec = codec_id if codec_id is not None else shape.get("codec", segment.CODEC_RAW)
    params = segment.CreateParams(
        size=params_size,
        max_key=mk,
        max_item=(mi + 7) // 8 * 8,
        growth=float(growth_factor),
        lock_stripes=lock_stripes,
        codec=new_codec,
        codec_arg=PICKLE_PROTOCOL,
        engine=engine_id if engine_id is not None else (
            record.get("engine", segment.ENGINE_HASH) if record is not None else segment.ENGINE_HASH),
    )
    tier = segment.TierSpec(
        path=tier_path,
        durability=None if durability is None else segment.DURABILITY_CODES[durability],
        interval_ms=interval_ms,
    )

    def record_store(p: segment.CreateParams) -> None:
        """Under the creation flock, before the segment exists: the directory's record."""
        assert tier_path is not None
        fields = {"name": name, "codec": p.codec, "codec_arg": p.codec_arg, "max_key": p.max_key,
                  "max_item": p.max_item, "size": p.size, "engine": p.engine,
                  "created_ms": int(time.time() * 1000)}
        rec = storemeta.create(tier_path, fields)
        _record_mismatch(name, tier_path, rec, fields, "creating")

    # codec=None takes the existing store's codec; the header decides which class to use.
    cls = PickleStore if new_codec == segment.CODEC_PICKLE else Store
    for _ in range(2):
        store = cls()
        hdr = segment.open_segment(store, name, want_size, create, params, explicit, codec_id, tier,
                                   record_store, engine_id)
        actual = PickleStore if store.codec_id == segment.CODEC_PICKLE else Store
        if actual is cls:
            try:
                if hdr["tier"] != segment.TIER_NONE:
                    try:
                        _open_tier(store, name, hdr, wal_recovery)
                    except OSError as e:
                        if isinstance(e, Error):
                            raise
                        where = os.fsdecode(hdr["tier_path"])
                        raise FileAccessError(e.errno or 0, f"cannot open the disk tier at {where!r}: "
                                              f"{e.strerror or e}", where) from e
            except BaseException:
                if hdr["created"]:
                    segment.discard_new(store, name)  # a failed attach leaves no segment
                store.close()
                raise
            _live.add(store)
            return store
        store.close()
        cls = actual
    raise AssertionError("unreachable: the codec is fixed at creation")


def _open_tier(store: Store, name: str, hdr: dict[str, Any], wal_recovery: str = "strict") -> None:
    """Open the disk tier the segment records, after checking the directory still holds this
    store (a removed or replaced directory would silently start empty)."""
    dirpath = os.fsdecode(hdr["tier_path"])
    rec = storemeta.read(dirpath)
    if rec is None:
        raise SegmentMismatch(
            f"store {name!r} keeps its disk tier in {dirpath!r}, but that directory holds no "
            f"store record (STORE): it was removed or replaced. Restore it, or drop the segment "
            f"(`shmkv rm {name}`) to start the store anew"
        )
    _record_mismatch(name, dirpath, rec, {f: hdr[f] for f in ("codec", "max_key", "max_item")},
                     "the segment says")
    durability = segment.DURABILITY_NAMES[hdr["tier"]]
    tier_args: dict[str, Any] = {"durability": durability, "interval_ms": hdr["tier_interval_ms"],
                                 "wal_recovery": wal_recovery}
    store._tier = LSM(dirpath, **tier_args)
    store._tiering = tiered
    store.path = dirpath
    store.durability = durability
    store._tier_args = tier_args


def unlink(name: str) -> None:
    """Remove the store `name` (attached processes keep their mapping until they close)."""
    segment.unlink(name)


def restore(file: str | os.PathLike[str], name: str, size: int | str | None = None, **kwargs: Any) -> Store:
    """Attach (creating if needed) store `name` and load the snapshot `file` into it.

    A store created here takes the snapshot's codec and limits unless `kwargs` say otherwise.
    The whole snapshot is read and checked (checksum, codec, every key and item against the
    store's limits) before the first item is stored: a snapshot that does not fit loads nothing.

    :raises Corruption: the file is damaged. :raises SegmentMismatch: the store's codec or
        limits cannot hold the snapshot.
    """
    return restore_counted(file, name, size, **kwargs)[0]


def restore_counted(file: str | os.PathLike[str], name: str, size: int | str | None = None,
                    **kwargs: Any) -> tuple[Store, int]:
    """:func:`restore`, also returning how many items were loaded."""
    snap = snapshot.read(file)
    args: dict[str, Any] = {"create": True, "codec": None, "max_key": None, "max_item": None,
                            "growth_factor": DEFAULT_GROWTH, "lock_stripes": DEFAULT_LOCK_STRIPES,
                            "path": None, "durability": None, "interval_ms": None,
                            "wal_recovery": "strict"}
    unknown = set(kwargs) - set(args)
    if unknown:
        raise InvalidArgument(f"restore() got unexpected arguments: {sorted(unknown)}")
    args.update(kwargs)
    store = _attach(name, size, defaults=snap.shape(), **args)
    try:
        n = store._load_snapshot(snap)
    except BaseException:
        store.close()
        raise
    return store, n


def list_stores() -> list[str]:
    """Names of the shmkv stores on this host."""
    return segment.list_stores()
