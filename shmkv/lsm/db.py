"""The LSM class: a WAL + memtables + leveled SSTables, shared by every process that opens a path.

Durability modes (``durability=``)
----------------------------------
``"none"``
    A cache. Every put is appended to the WAL with ``write(2)`` before it returns but never
    fsynced, so it is in the OS page cache: it survives the *process* dying (even SIGKILL) but
    a host crash or power loss may lose the most recent writes. SSTables and the manifest are
    still fsynced when written, so a host crash loses a tail, never corrupts the store.
``"interval"``
    As ``"none"``, plus a background thread fsyncs the WAL at most every ``interval_ms`` if it
    was written (group commit: one fsync covers every put of the interval, from all threads of
    the process). A host crash loses at most about ``interval_ms`` of acknowledged writes.
``"fsync"`` (default)
    ``put``/``put_many``/``delete`` return only after the WAL record is fsynced (fdatasync):
    every acknowledged write survives SIGKILL and a host crash. ``put_many`` is one append and one
    fsync for the whole batch -- use it for bulk spills.

Several processes, one store
----------------------------
Any number of processes may open the same directory and read and write concurrently (threads
within a process are serialised by ``self._lock``). The design, and why:

* **One shared WAL, appended under one lock.** Every write appends a framed, checksummed record
  to the current ``wal-<gen>.log`` while holding the store's WAL lock, a robust process-shared
  mutex in the ``SHARED`` page (see wal.py and ``_accel.SharedPage``; it was a ``flock`` on the
  WAL, two system calls per put). Rejected:
  a WAL per process -- recovery and flush would have to merge logs whose relative order is
  unknown, so a put in A followed by a delete in B could resurrect.
* **Private memtables, materialised from the WAL.** Each process replays the shared WAL from
  the offset it last read. Before every operation it ``fstat``\\ s the WAL; if it grew, it takes
  the flock, replays the new records into its memtable, then serves the get. A write by A is
  thus visible to B's next get (read-your-writes across processes, linearisable per key because
  the WAL order is the one order every process applies). Rejected: a memtable in shared memory
  (that is the Cython tier's job; this engine must stand alone and be crash-simple).
* **Flush = seal + new generation.** A flusher takes the maintenance lock (``flock`` on
  ``LOCK``), creates ``wal-<gen+1>.log``, then appends a SEAL record to the current WAL under its
  flock. Nothing is appended after a seal: a writer that catches up to a seal moves to the next
  file, so writers never stop. The sealed generations are now immutable in every process; the
  flusher writes them to an L0 SSTable and replaces the manifest (``wal_gen = gen+1``), then
  unlinks the old WAL.
* **Noticing change.** Every WAL append or seal and every manifest replacement bumps a
  counter in ``SHARED``, a page every process maps shared (format.py). Before every operation a
  process loads it; while it equals the value loaded before the process's last full look,
  nothing changed and the operation costs no system call. Otherwise the process ``stat``\\ s
  ``MANIFEST`` -- a new identity makes it reload: open new tables, drop memtables of
  generations the manifest says are flushed, drop tables no longer named -- and ``fstat``\\ s
  its WALs to replay what others appended. Writers bump *before* appending as well as after,
  so a writer killed inside ``write(2)`` has bumped: its torn tail is never taken for the end
  of a clean log by a process that skipped looking. A process that misses the manifest still reads correctly:
  it keeps the sealed generations' memtables until it loads a manifest that covers them.
* **Compaction never breaks readers.** Files are unlinked only after a manifest that no longer
  names them is durable; a reader that has a table open keeps reading it (Linux keeps an
  unlinked inode alive while an fd is open); a reader that finds a named file already gone
  re-reads the manifest and retries. Readers are reference counted, so a running ``scan`` keeps
  its tables open across reloads.
* **Crash safety.** Every step of flush/compaction is ordered so that the manifest in force plus
  the WALs from its ``wal_gen`` on always hold every acknowledged write: new WAL durable before
  the seal, table durable before the manifest names it, old files deleted only after. A writer
  killed inside ``write(2)`` leaves a torn tail that the next WAL locker cuts off. Leftovers
  (tables no manifest names, ``.tmp`` files, unsealed WALs past the chain) are removed by the
  next maintenance.
* **fork()**: a handle must not cross a fork (flock is shared by the open file description, so
  parent and child would not exclude each other); using one in the child raises ``Error``. Open
  the store in each worker.

Lock order (outermost first): ``self._maint_mutex`` (maintenance, threads of this process) ->
``LOCK`` file flock (maintenance, processes) -> ``self._lock`` (all in-process state) -> the
WAL lock. Methods named ``_x_locked`` REQUIRE ``self._lock``; maintenance methods take it only for
short steps (seal, publish), so merges and table writes never block gets and puts.

Maintenance (flush, then compactions) runs in a background thread per handle, woken when the
WAL backlog reaches ``memtable_bytes``; whichever process gets the ``LOCK`` first does it for
everyone (the others skip: non-blocking). By default the thread hands each round to a helper
*child* process of the handle (helper.py): the work then runs on another core instead of taking
the writer's GIL. The helper is owned by its handle (started on first need, ended by close or
by the parent's death via EOF), so nobody has to supervise it. If the backlog reaches 4x
``memtable_bytes`` the writer does the work itself (a bounded write stall, as LevelDB's).
``background=False`` runs it inline in the put that crosses the threshold. Rejected: a
maintenance daemon shared by the store -- one more thing to supervise, and the store must work
from any set of worker processes with nobody in charge.
A failed automatic flush (e.g. disk full) does not fail the already-durable put; it is
recorded in ``stats()["last_maintenance_error"]`` and retried.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from shmkv.errors import (
    Corruption,
    Error,
    InvalidArgument,
    InvalidType,
    KeyTooLarge,
    StoreClosed,
    ValueTooLarge,
)

from . import _accel, compaction
from . import format as fmt
from . import manifest as mf
from . import wal as walmod
from .compaction import LevelOptions
from .helper import Helper
from .memtable import Memtable
from .sstable import COMPRESSIONS, BlockCache, TableMeta, TableReader, TableWriter, _decompress
from .wal import WalFile, io_error

DURABILITY = ("none", "interval", "fsync")
_RETRIES = 100  # manifest re-reads before a vanished file is declared corruption
_STALL_FACTOR = 4  # WAL backlog (x memtable_bytes) at which writers stop and flush themselves
_HELPER_GIVE_UP = 3  # helper deaths in a row (none answering a round) before maintaining in-thread


# Every open handle, so a forked child can drop its copies (see _after_fork_in_child).
_live: weakref.WeakSet[LSM] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """In a forked child, inherited handles are dead: their threads did not survive and their
    locks may be held forever. Close their fds *without* flock(LOCK_UN) -- the open file
    descriptions are shared with the parent, and unlocking would release the parent's locks."""
    for db in list(_live):
        db._abandon_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Gen:
    """One live WAL generation as this process sees it.

    Invariant: ``mem`` holds exactly the records of ``wal`` before ``offset``; ``sealed_to`` is
    set once the SEAL record has been applied, after which the generation never changes.
    """

    wal: WalFile
    mem: Memtable
    offset: int = fmt.WAL_HEADER.size
    sealed_to: int | None = None

    @property
    def gen(self) -> int:
        return self.wal.gen


@dataclass
class _Counters:
    gets: int = 0
    puts: int = 0
    deletes: int = 0
    wal_syncs: int = 0
    wal_replayed_records: int = 0
    wal_torn_tails_dropped: int = 0
    wal_dropped_bytes: int = 0
    manifest_reloads: int = 0
    bloom_negatives: int = 0  # of readers since closed
    bloom_false_positives: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class LSM:
    """A log-structured merge tree in directory ``path``. See the module docstring.

    :param path: directory (created if missing).
    :param durability: ``"none"``, ``"interval"`` or ``"fsync"`` (see module doc).
    :param interval_ms: fsync period for ``"interval"``.
    :param compression: SSTable block codec: ``"lz4"``, ``"zstd"`` or ``"none"``.
    :param memtable_bytes: WAL generation size that triggers a flush to L0.
    :param levels: compaction shape (:class:`~shmkv.lsm.compaction.LevelOptions`).
    :param block_cache_bytes: decompressed data blocks kept per process.
    :param wal_recovery: ``"strict"`` raises :class:`Corruption` on a corrupted WAL record that
        is followed by more data; ``"truncate"`` drops the log from that record on (counted in
        ``stats()["wal_dropped_bytes"]``). A torn *tail* is always dropped silently: it was
        never acknowledged.
    :param auto_maintenance: flush/compact automatically when ``memtable_bytes`` is reached.
    :param background: do that automatic maintenance in a background thread (default), so a
        put never waits for a compaction -- unless the WAL backlog reaches 4x
        ``memtable_bytes`` (the thread cannot keep up), when the writer does the work itself
        (a write stall that bounds memory). ``False``: inline, in the put that crosses the
        threshold.
    :param helper: with background maintenance, the thread hands each round to a helper
        process (``shmkv.lsm.helper``, started on first need, ended by close) so flushes and
        compactions run on another core instead of taking this process's GIL from its
        writers. ``False``: the thread does the work itself.
    :raises Corruption: a file of the store fails its checks.
    :raises FileAccessError: a file cannot be opened or read.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        durability: str = "fsync",
        interval_ms: int = 50,
        compression: str = "lz4",
        memtable_bytes: int = 4 << 20,
        *,
        levels: LevelOptions | None = None,
        block_cache_bytes: int = 8 << 20,
        wal_recovery: str = "strict",
        auto_maintenance: bool = True,
        background: bool = True,
        helper: bool = True,
    ) -> None:
        if durability not in DURABILITY:
            raise InvalidArgument(f"durability must be one of {DURABILITY}, not {durability!r}")
        if compression not in COMPRESSIONS:
            raise InvalidArgument(f"compression must be one of {sorted(COMPRESSIONS)}")
        if wal_recovery not in ("strict", "truncate"):
            raise InvalidArgument("wal_recovery must be 'strict' or 'truncate'")
        if interval_ms <= 0 or memtable_bytes <= 0:
            raise InvalidArgument("interval_ms and memtable_bytes must be positive")
        self.path = os.fspath(path)
        self.durability = durability
        self.interval_ms = interval_ms
        self.compression = compression
        self.memtable_bytes = memtable_bytes
        self.opts = levels or LevelOptions()
        self.wal_recovery = wal_recovery
        self.auto_maintenance = auto_maintenance
        self._helper: Helper | None = None
        if helper and background and auto_maintenance:
            self._helper = Helper(
                self.path,
                {
                    "durability": "none",  # the helper never acknowledges writes
                    "compression": compression,
                    "memtable_bytes": memtable_bytes,
                    "block_cache_bytes": 1 << 20,
                    "wal_recovery": wal_recovery,
                    "levels": asdict(self.opts),
                },
            )
        self._lock = threading.RLock()
        self._closed = False
        self._forked = False
        self._page: _accel.SharedPage = None  # type: ignore[assignment]  # set first in the try below
        self._seen = -1  # change counter loaded before our last full look; -1: never looked
        self._cache = BlockCache(block_cache_bytes)
        self._c = _Counters()
        self._gens: list[_Gen] = []
        self._readers: dict[int, TableReader] = {}
        self._manifest = mf.Manifest()
        self._mid: mf.Identity | None = None
        self._levels: list[list[TableMeta]] = [[] for _ in range(self.opts.max_levels)]
        self._probe = _accel.Probe([], [])
        self._dirty = False  # WAL written since the last fsync ("interval")
        self._last_error: str | None = None
        self._lock_fd = -1
        self._maint_mutex = threading.Lock()
        self._maint_wanted = threading.Event()
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._maint_thread: threading.Thread | None = None
        try:
            os.makedirs(self.path, exist_ok=True)
            self._page = _open_page(os.path.join(self.path, fmt.SHARED))
            lock_path = os.path.join(self.path, fmt.LOCKFILE)
            try:
                self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise io_error(e, lock_path, "open lock file") from e
            with self._lock:
                self._bootstrap_locked()
                self._refresh_locked(force=True)
                self._catch_up_locked()
                if self._try_maintenance_lock():
                    try:
                        self._collect_garbage_locked()
                    finally:
                        self._maintenance_unlock()
        except BaseException:
            self._release_all()
            raise
        if durability == "interval":
            self._syncer = threading.Thread(
                target=self._sync_loop, name="shmkv-lsm-sync", daemon=True
            )
            self._syncer.start()
        if background and auto_maintenance:
            self._maint_thread = threading.Thread(
                target=self._maint_loop, name="shmkv-lsm-maintenance", daemon=True
            )
            self._maint_thread.start()
        _live.add(self)

    # ------------------------------------------------------------------ public API

    def put(self, key: bytes, value: bytes, expire_at_ms: int = 0) -> None:
        """Store ``value`` under ``key``; ``expire_at_ms`` is absolute ms since the epoch (0 = never).

        :raises KeyTooLarge, ValueTooLarge, InvalidType, InvalidArgument: bad arguments.
        :raises DiskFull: no space for the WAL record (nothing was stored).
        """
        if type(key) is not bytes or not 0 < len(key) <= fmt.MAX_KEY:
            key = _key(key)
        if type(value) is not bytes or len(value) > fmt.MAX_VALUE:
            value = _value(value)
        if type(expire_at_ms) is not int or expire_at_ms < 0:
            expire_at_ms = _expire(expire_at_ms)
        self.put_checked(key, value, expire_at_ms)

    def put_checked(self, key: bytes, value: bytes, expire_at_ms: int) -> tuple[bytes, int]:
        """:meth:`put` for a caller that has validated its arguments (the memory tier, which
        runs this under a stripe lock and needs it lean); returns ``(value, expire_at_ms)``,
        the entry the memory tier then caches. REQUIRES: bytes key of 1..MAX_KEY bytes, bytes
        value of at most MAX_VALUE bytes, int expire_at_ms >= 0."""
        self._write(
            ((fmt.KIND_PUT, key, value, expire_at_ms),),
            walmod.encode_put(fmt.KIND_PUT, key, value, expire_at_ms),
        )
        self._c.puts += 1
        return value, expire_at_ms

    def put_many(self, items: Iterable[tuple[bytes, bytes, int] | tuple[bytes, bytes]]) -> None:
        """Store many items with one WAL append and one fsync. Not atomic as a whole."""
        entries = []
        for it in items:
            if len(it) == 2:
                k, v = it
                e = 0
            else:
                k, v, e = it
            entries.append((fmt.KIND_PUT, _key(k), _value(v), _expire(e)))
        if entries:
            self._write(entries, walmod.encode_batch(entries))
            self._c.puts += len(entries)

    def delete(self, key: bytes) -> None:
        """Write a tombstone for ``key`` (absent keys too: they may be on disk)."""
        entry = (fmt.KIND_DELETE, _key(key), b"", 0)
        self._write((entry,), walmod.encode_put(*entry))
        self._c.deletes += 1

    def get(self, key: bytes) -> bytes | None:
        """The live value of ``key``, or None (absent, deleted or expired)."""
        e = self.get_entry(key)
        return None if e is None else e[0]

    def get_entry(self, key: bytes) -> tuple[bytes, int] | None:
        """``(value, expire_at_ms)`` of a live key, or None."""
        if type(key) is not bytes or not 0 < len(key) <= fmt.MAX_KEY:
            key = _key(key)
        if self._closed:
            self._check_open()  # before the lock: after a fork it may be held by a dead thread
        with self._lock:
            if self._closed:
                self._check_open()  # close() ran while we waited
            if self._page.load() != self._seen:
                self._sync_view_locked()
            self._c.gets += 1
            slot = self._lookup_locked(key)
        if slot is None:
            return None
        kind, value, expire = slot
        if kind != fmt.KIND_PUT or (expire and expire <= _now_ms()):
            return None
        return value, expire

    def __contains__(self, key: bytes) -> bool:
        return self.get_entry(key) is not None

    def scan(
        self, start: bytes | None = None, stop: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        """Live ``(key, value)`` pairs with ``start <= key < stop`` in key order.

        A consistent snapshot taken at the first ``next()``; writes after that are not seen.
        Tables stay open (by reference) until the iterator is exhausted or closed.
        """
        self._check_open()  # before the lock: fork safety
        with self._lock:
            self._check_open()  # again: close() may have run while we waited
            self._sync_view_locked()
            sources: list[Iterator[tuple[bytes, int, bytes, int]]] = []
            for g in reversed(self._gens):
                sources.append(iter(g.mem.items(start, stop)))
            held: list[TableReader] = []
            for t in self._levels[0]:
                r = self._readers[t.number]
                r.ref()
                held.append(r)
                sources.append(r.iter_from(start, stop))
            for lv in self._levels[1:]:
                rs = [
                    self._readers[t.number]
                    for t in lv
                    if t.overlaps(start, None if stop is None else stop)
                ]
                for r in rs:
                    r.ref()
                    held.append(r)
                if rs:
                    sources.append(
                        itertools.chain.from_iterable(r.iter_from(start, stop) for r in rs)
                    )
        try:
            yield from _accel.Merge(sources, _now_ms())  # live (key, value) pairs, newest wins
        finally:
            for r in held:
                r.unref()

    def flush(self) -> None:
        """Write all memtables to an L0 table now (then run due compactions). Waits for any
        maintenance in progress, in this process or another."""
        self._check_open()
        self._maintain(block=True, force_flush=True)

    def compact(self) -> None:
        """Flush, then merge every table into one sorted run at the deepest level (drops all
        tombstones and expired entries, reclaims space)."""
        self._check_open()
        self._maintain(block=True, force_flush=True, full=True)

    def sync(self) -> None:
        """fsync the WAL now (any durability mode)."""
        self._check_open()  # before the lock: fork safety
        with self._lock:
            self._check_open()  # again: close() may have run while we waited
            self._gens[-1].wal.sync()
            self._dirty = False
            self._c.wal_syncs += 1

    def verify(self) -> list[str]:
        """Check manifest, every table block and every live WAL record; return problems found."""
        from .verify import verify_store

        self._check_open()  # before the lock: fork safety
        with self._lock:
            self._check_open()  # again: close() may have run while we waited
            return verify_store(self.path, self.opts.max_levels, self._page)

    def stats(self) -> dict[str, Any]:
        """Counters and sizes. ``write_amplification`` = bytes written to disk (WAL + flushes +
        compactions) / key+value bytes put, store-wide. Bloom numbers are this process's."""
        self._check_open()  # before the lock: fork safety
        with self._lock:
            self._check_open()  # again: close() may have run while we waited
            self._sync_view_locked()
            m = self._manifest
            c = dict(m.counters)
            disk = 0
            try:
                with os.scandir(self.path) as it:
                    for de in it:
                        if de.is_file(follow_symlinks=False):
                            disk += de.stat(follow_symlinks=False).st_size
            except OSError:
                pass
            live_wal = sum(g.offset for g in self._gens)
            live_user = sum(g.mem.user_bytes for g in self._gens)
            user = c.get("user_bytes", 0) + live_user
            written = (
                c.get("wal_bytes", 0)
                + live_wal
                + c.get("flush_bytes", 0)
                + c.get("compact_write_bytes", 0)
            )
            neg = (
                self._c.bloom_negatives
                + self._probe.negatives
                + sum(r.bloom_negatives for r in self._readers.values())
            )
            fp = self._c.bloom_false_positives + sum(
                r.bloom_false_positives for r in self._readers.values()
            )
            return {
                "disk_bytes": disk,
                "files_per_level": [len(lv) for lv in self._levels],
                "bytes_per_level": [sum(t.size for t in lv) for lv in self._levels],
                "entries_on_disk": sum(t.entries for t in m.tables),
                "memtable_entries": sum(len(g.mem) for g in self._gens),
                "memtable_bytes": sum(g.mem.approx_bytes for g in self._gens),
                "wal_generations": [g.gen for g in self._gens],
                "wal_bytes": live_wal,
                "manifest_generation": m.generation,
                "flushes": c.get("flushes", 0),
                "compactions": c.get("compactions", 0),
                "compact_read_bytes": c.get("compact_read_bytes", 0),
                "compact_write_bytes": c.get("compact_write_bytes", 0),
                "user_bytes": user,
                "write_amplification": (written / user) if user else 0.0,
                "bloom_negatives": neg,
                "bloom_false_positives": fp,
                "bloom_false_positive_rate": fp / (fp + neg) if fp + neg else 0.0,
                "block_cache_hits": self._cache.hits,
                "block_cache_misses": self._cache.misses,
                "gets": self._c.gets,
                "puts": self._c.puts,
                "deletes": self._c.deletes,
                "wal_syncs": self._c.wal_syncs,
                "wal_replayed_records": self._c.wal_replayed_records,
                "wal_torn_tails_dropped": self._c.wal_torn_tails_dropped,
                "wal_dropped_bytes": self._c.wal_dropped_bytes,
                "manifest_reloads": self._c.manifest_reloads,
                "last_maintenance_error": self._last_error,
                "durability": self.durability,
            }

    def close(self) -> None:
        """Finish maintenance in progress, sync (unless durability is "none"), release every
        file. Idempotent."""
        if self._closed:
            return
        self._check_open()
        self._stop.set()
        self._maint_wanted.set()
        for t in (self._syncer, self._maint_thread):
            if t is not None and t is not threading.current_thread():
                t.join()
        if self._helper is not None:
            self._helper.stop()
        with self._maint_mutex, self._lock:
            if self._closed:
                return
            try:
                if (
                    self._dirty
                    and self.durability != "none"
                    and self._gens
                    and not self._forked
                ):
                    self._gens[-1].wal.sync()
            finally:
                self._closed = True
                self._release_all()

    def __enter__(self) -> LSM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ open / view

    def _check_open(self) -> None:
        """Call before taking self._lock: after a fork it may be held by a thread that is gone."""
        if self._forked:
            raise Error("an LSM handle cannot be used across fork(); open the store in the child")
        if self._closed:
            raise StoreClosed(f"LSM {self.path} is closed")

    def _abandon_in_child(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._forked = True
        if self._helper is not None:
            self._helper.abandon_in_child()
        fds = [g.wal.fd for g in self._gens] + [r.fd for r in self._readers.values()]
        for fd in [*fds, self._lock_fd]:
            try:
                if fd >= 0:
                    os.close(fd)
            except OSError:
                pass

    def _release_all(self) -> None:
        for g in self._gens:
            g.wal.close()
        self._gens = []
        for r in self._readers.values():
            r.unref()
        self._readers = {}
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._page is not None:
            self._page.close()

    def _bootstrap_locked(self) -> None:
        """Create an empty store (WAL 1 + manifest) if there is no manifest yet.

        A directory with data files but no manifest is refused, never "re-initialised": the
        next maintenance would garbage-collect every table. (A lone header-only wal-1 is the
        leftover of a bootstrap that died before its manifest, and is fine.)
        """
        if mf.identity(self.path) is not None:
            return
        self._lock_maintenance(block=True)
        try:
            if mf.identity(self.path) is None:
                for name in os.listdir(self.path):
                    gen = fmt.parse_wal_name(name)
                    p = os.path.join(self.path, name)
                    if (
                        fmt.parse_sst_name(name) is not None
                        or (gen is not None and gen != 1)
                        or (gen == 1 and os.path.getsize(p) > fmt.WAL_HEADER.size)
                    ):
                        raise Corruption(
                            f"{self.path}: MANIFEST is missing but data files exist ({name})"
                        )
                WalFile.create(self.path, 1, self._page).close()
                mf.write(self.path, mf.Manifest(generation=1, wal_gen=1, next_file=1))
        finally:
            self._maintenance_unlock()

    def _sync_view_locked(self) -> None:
        """Bring this process's view up to date unless the change counter says nothing did.

        The counter is loaded *before* looking, so a change made while we look bumps it past the
        value we remember and the next operation looks again."""
        assert self._page is not None
        e = self._page.load()
        if e == self._seen:
            return
        self._refresh_locked()
        self._catch_up_locked()
        self._seen = e

    def _refresh_locked(self, force: bool = False) -> None:
        """Load the manifest if it changed: tables opened/dropped, flushed generations dropped."""
        if not force and mf.identity(self.path) == self._mid:
            return
        for _ in range(_RETRIES):
            got = mf.read(self.path)
            if got is None:
                raise Corruption(f"{self.path}: MANIFEST is missing")
            m, ident = got
            if ident == self._mid and not force:
                return
            try:
                self._install_locked(m, ident)
                return
            except FileNotFoundError:
                continue  # a named file vanished: a newer manifest exists; read it
        raise Corruption(f"{self.path}: the manifest names files that do not exist")

    def _install_locked(self, m: mf.Manifest, ident: mf.Identity | None) -> None:
        """Make ``m`` this process's view. Raises FileNotFoundError (view unchanged) if a file it
        names is gone."""
        opened: dict[int, TableReader] = {}
        try:
            for t in m.tables:
                if t.number not in self._readers:
                    opened[t.number] = TableReader(
                        os.path.join(self.path, fmt.sst_name(t.number)), t.number, self._cache
                    )
            keep = [g for g in self._gens if g.gen >= m.wal_gen]
            new_gen: _Gen | None = None
            if not keep:
                w = WalFile.open(self.path, m.wal_gen, self._page)
                new_gen = _Gen(w, Memtable(m.wal_gen))
            elif keep[0].gen != m.wal_gen:
                raise Corruption(f"{self.path}: WAL generation {m.wal_gen} is not in the chain")
        except BaseException:
            for r in opened.values():
                r.unref()
            raise
        for g in self._gens:
            if g.gen < m.wal_gen:
                g.wal.close()
        self._gens = keep if new_gen is None else [new_gen]
        names = {t.number for t in m.tables}
        for n in list(self._readers):
            if n not in names:
                r = self._readers.pop(n)
                self._c.bloom_negatives += r.bloom_negatives
                self._c.bloom_false_positives += r.bloom_false_positives
                r.unref()
        self._readers.update(opened)
        self._manifest = m
        self._mid = ident
        self._levels = m.levels(self.opts.max_levels)
        self._c.bloom_negatives += self._probe.negatives
        rd = self._readers
        self._probe = _accel.Probe(
            [(t.smallest, t.largest, rd[t.number]) for t in self._levels[0]],
            [[(t.smallest, t.largest, rd[t.number]) for t in lv] for lv in self._levels[1:]],
        )
        self._c.manifest_reloads += 1

    def _catch_up_locked(self) -> None:
        """Apply WAL records written since we last looked, following seals to newer generations."""
        i = 0
        while i < len(self._gens):
            g = self._gens[i]
            if g.sealed_to is None and g.wal.size() > g.offset:
                self._replay_unlocked(g)
            if g.sealed_to is not None and i == len(self._gens) - 1:
                try:
                    w = WalFile.open(self.path, g.sealed_to, self._page)
                except FileNotFoundError:
                    # Flushed and deleted already: the manifest has moved past it. Reload, restart.
                    self._refresh_locked(force=True)
                    i = 0
                    continue
                self._gens.append(_Gen(w, Memtable(w.gen)))
            i += 1

    def _replay_unlocked(self, g: _Gen) -> None:
        """Apply the WAL's new whole records without taking the WAL lock, so a reader catching
        up (the maintenance helper replays megabytes) never holds up writers.

        Safe because the WAL is append-only and every record is checksummed: a record that
        reads whole and valid is final. What a lock-free read cannot judge is its *end*: a
        record still being written looks exactly like a torn one. So any anomaly -- a torn
        tail or a bad record -- is looked at again under the lock, where it is definitive
        (:meth:`_replay_locked`)."""
        rep = g.wal.read_from(g.offset)
        self._apply(g, rep.records)
        g.offset = rep.end
        if rep.torn or rep.corrupt is not None:
            with g.wal.locked():
                self._replay_locked(g)

    def _replay_locked(self, g: _Gen) -> None:
        """REQUIRES: g.wal.locked(). Apply records from g.offset to EOF; cut a torn tail."""
        rep = g.wal.read_from(g.offset)
        self._apply(g, rep.records)
        g.offset = rep.end
        if rep.torn:
            g.wal.truncate_locked(rep.end)
            self._c.wal_torn_tails_dropped += 1
        elif rep.corrupt is not None:
            if self.wal_recovery == "strict":
                raise Corruption(
                    f"{g.wal.path}: {rep.corrupt}; {rep.size - rep.end} bytes follow "
                    "(open with wal_recovery='truncate' to drop them)"
                )
            g.wal.truncate_locked(rep.end)
            self._c.wal_dropped_bytes += rep.size - rep.end

    def _apply(self, g: _Gen, records: list[tuple[int, bytes]]) -> None:
        for rtype, payload in records:
            self._c.wal_replayed_records += 1
            if rtype == fmt.REC_SEAL:
                (g.sealed_to,) = fmt.U64.unpack(payload)
                continue
            try:
                g.mem.apply_all(walmod.decode_batch(payload))
            except ValueError as e:  # checksum passed but structure is wrong: a writer bug
                raise Corruption(f"{g.wal.path}: malformed batch record: {e}") from e

    def _lookup_locked(self, key: bytes) -> tuple[int, bytes, int] | None:
        """Newest entry for key (tombstones included) across memtables and tables: one C call
        (range, bloom, index and block checks in ``_accel.Probe.lookup``)."""
        return self._probe.lookup(key, self._gens, _decompress)

    # ------------------------------------------------------------------ writes

    def _write(self, entries: Sequence[tuple[int, bytes, bytes, int]], data: bytes) -> None:
        """Append ``data`` (the WAL records of ``entries``) and apply ``entries`` to our memtable.

        Fast path: when the change counter still equals the value of our last full look (or of our own
        last append), nobody appended, sealed or replaced the manifest since, so the WAL ends
        exactly at ``g.offset``: no fstat, no replay -- one write under the WAL lock, in C."""
        if self._closed:
            self._check_open()  # before the lock: after a fork it may be held by a dead thread
        page = self._page
        with self._lock:
            if self._closed:
                self._check_open()  # close() ran while we waited
            if page.load() != self._seen:
                self._sync_view_locked()
            g = self._gens[-1]
            after = 0
            if g.sealed_to is None:
                try:  # 0: the counter moved since our last look; catch up below
                    after = page.append(g.wal.fd, data, g.offset, self._seen)
                except OSError as e:
                    raise io_error(e, g.wal.path, "append to WAL") from e
            while not after:
                with g.wal.locked():
                    self._replay_locked(g)  # someone appended (or died appending) meanwhile
                    if g.sealed_to is None:
                        after = g.wal.append_locked(data, g.offset)
                if not after:
                    self._catch_up_locked()  # sealed under us: move to the next generation
                    g = self._gens[-1]
            if len(entries) == 1:
                kind, key, value, expire = entries[0]
                g.mem.apply(kind, key, value, expire)
            else:
                g.mem.apply_all(entries)
            g.offset += len(data)
            if after == self._seen + 2:
                self._seen = after  # the only change since our last look was this append
            if self.durability == "fsync":
                g.wal.sync()
                self._c.wal_syncs += 1
            else:
                self._dirty = True
            backlog = (
                g.offset - fmt.WAL_HEADER.size if len(self._gens) == 1 else self._wal_bytes_locked()
            )
        if not self.auto_maintenance or backlog < self.memtable_bytes:
            h = self._helper
            if h is not None and h.pid is None and backlog >= self.memtable_bytes >> 1:
                h.ensure_started()  # never started yet: let it import while we fill up
            return
        if self._maint_thread is not None and backlog < _STALL_FACTOR * self.memtable_bytes:
            if not self._maint_wanted.is_set():
                self._maint_wanted.set()
            return
        # Inline mode, or the background thread cannot keep up: the writer does the work
        # (a write stall, as in LevelDB: memory stays bounded). The put itself is durable
        # already, so a failure here is recorded, not raised.
        try:
            self._maintain(block=self._maint_thread is not None)
        except (Error, OSError) as e:
            self._last_error = f"{type(e).__name__}: {e}"

    def _wal_bytes_locked(self) -> int:
        # Sealed-but-unflushed generations count: a failed flush must be retried soon.
        return sum(g.offset - fmt.WAL_HEADER.size for g in self._gens)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.interval_ms / 1000):
            with self._lock:
                if self._closed or not self._dirty or not self._gens:
                    continue
                try:
                    self._gens[-1].wal.sync()
                    self._dirty = False
                    self._c.wal_syncs += 1
                except Exception as e:  # a thread must not die silently; surface it in stats
                    self._last_error = f"background fsync: {e}"

    def _maint_loop(self) -> None:
        """Background maintenance: woken by writers crossing ``memtable_bytes``, and once a
        second to catch work that is due for other reasons (a failed flush, another process's
        writes)."""
        while not self._stop.is_set():
            woken = self._maint_wanted.wait(1.0)
            self._maint_wanted.clear()
            if self._stop.is_set():
                return
            try:
                if not woken:
                    with self._lock:
                        if self._closed:
                            return
                        due = self._wal_bytes_locked() >= self.memtable_bytes or (
                            compaction.pick(self._manifest, self.opts) is not None
                        )
                    if not due:
                        continue
                if self._helper is not None:
                    self._last_error = self._helper.round()
                    if self._helper.exits >= _HELPER_GIVE_UP:
                        # It cannot run here (say sys.executable is not a Python, as under
                        # some embedding servers): maintain in this thread from now on.
                        self._helper.stop()
                        self._helper = None
                        self._last_error = f"maintenance helper unusable: {self._last_error}"
                        self._maintain(block=False)
                else:
                    self._maintain(block=False)
                    self._last_error = None
            except Exception as e:  # a thread must not die silently; surface it in stats
                self._last_error = f"background maintenance: {type(e).__name__}: {e}"

    # ------------------------------------------------------------------ maintenance
    #
    # Lock order: self._maint_mutex (threads of this process; flock cannot tell them apart)
    # -> LOCK flock (processes) -> self._lock, which maintenance takes only for short steps:
    # merging and writing tables run without it, so other threads keep reading and writing.
    # Methods below without the _locked suffix REQUIRE that self._lock is NOT held.

    def _try_maintenance_lock(self) -> bool:
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _lock_maintenance(self, block: bool) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _maintenance_unlock(self) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _maintain(self, *, block: bool, force_flush: bool = False, full: bool = False) -> None:
        """Flush (when due, or forced), then the due compactions (or one full compaction).

        Non-blocking (``block=False``) gives up at once if this process or another is already
        doing maintenance: that one will seal and flush our WAL as well.
        """
        if not self._maint_mutex.acquire(blocking=block):
            return
        try:
            if block:
                self._lock_maintenance(True)
            elif not self._try_maintenance_lock():
                return
            try:
                if self._closed:
                    return
                self._flush(force_flush)
                if full:
                    with self._lock:
                        comp = compaction.pick_full(self._manifest, self.opts)
                    if comp is not None:
                        self._run_compaction(comp)
                    with self._lock:
                        self._collect_garbage_locked()
                else:
                    self._compact_due()
            finally:
                self._maintenance_unlock()
        finally:
            self._maint_mutex.release()

    def _flush(self, force: bool) -> None:
        """REQUIRES: the maintenance lock. Seal the WAL, write the sealed generations to one L0
        table, install a manifest that starts at the new generation."""
        with self._lock:
            self._refresh_locked(force=True)
            self._catch_up_locked()
            tail = self._gens[-1]
            if not force and self._wal_bytes_locked() < self.memtable_bytes:
                return  # someone flushed while we waited
            if not any(g.mem.records for g in self._gens):
                return
            new_gen = tail.gen + 1
            WalFile.create(self.path, new_gen, self._page).close()
            with tail.wal.locked():
                self._replay_locked(tail)
                if tail.sealed_to is not None:
                    raise Corruption(
                        f"{tail.wal.path}: sealed by someone not holding the maintenance lock"
                    )
                tail.wal.append_locked(walmod.encode_record(fmt.REC_SEAL, fmt.U64.pack(new_gen)))
                tail.wal.sync()
                self._replay_locked(tail)
            assert tail.sealed_to == new_gen, "Invariant: our own SEAL is the last record"
            self._catch_up_locked()  # opens the new generation
            # Invariant: sealed generations never change again, and only a manifest written by
            # the maintenance-lock holder (us) can drop them: safe to read without self._lock.
            flushed = [g for g in self._gens if g.sealed_to is not None]
            m = self._manifest
        number = m.next_file
        stream = compaction.drop_dead(
            compaction.merge([g.mem.iter_entries() for g in reversed(flushed)]),
            list(m.tables),
            _now_ms(),
        )
        meta: TableMeta | None = None
        writer = TableWriter(self._sst_path(number), self.compression)
        try:
            writer.add_from(stream)
            if len(writer):
                meta = writer.finish(number, 0)
            else:
                writer.abandon()  # everything flushed was dead: no table
        except BaseException:
            writer.abandon()
            raise
        c = dict(m.counters)
        c["flushes"] = c.get("flushes", 0) + 1
        c["user_bytes"] = c.get("user_bytes", 0) + sum(g.mem.user_bytes for g in flushed)
        c["wal_bytes"] = c.get("wal_bytes", 0) + sum(g.offset for g in flushed)
        c["flush_bytes"] = c.get("flush_bytes", 0) + (meta.size if meta else 0)
        new = replace(
            m,
            generation=m.generation + 1,
            wal_gen=new_gen,
            next_file=number + 1 if meta else number,
            tables=m.tables + ([meta] if meta else []),
            counters=c,
        )
        with self._lock:
            assert self._manifest.generation == m.generation, "Invariant: only we publish"
            self._publish_locked(new)
        for g in flushed:
            _unlink_quiet(g.wal.path)

    def _compact_due(self) -> None:
        """REQUIRES: the maintenance lock."""
        for _ in range(64):  # bounded: each round strictly reduces the most urgent score
            with self._lock:
                comp = compaction.pick(self._manifest, self.opts)
            if comp is None or self._stop.is_set():
                return
            self._run_compaction(comp)

    def _run_compaction(self, comp: compaction.Compaction) -> None:
        """REQUIRES: the maintenance lock. Merge without self._lock; publish under it."""
        with self._lock:
            m = self._manifest
            readers = {t.number: self._readers[t.number] for t in comp.inputs}
            for r in readers.values():
                r.ref()  # a reload in another thread must not close them under the merge
        try:
            next_file = [m.next_file]

            def new_writer() -> tuple[int, TableWriter]:
                n = next_file[0]
                next_file[0] += 1
                return n, TableWriter(self._sst_path(n), self.compression)

            outputs = compaction.run(comp, m, readers, self.opts, new_writer, _now_ms())
            inputs = {t.number for t in comp.inputs}
            c = dict(m.counters)
            c["compactions"] = c.get("compactions", 0) + 1
            c["compact_read_bytes"] = c.get("compact_read_bytes", 0) + sum(
                t.size for t in comp.inputs
            )
            c["compact_write_bytes"] = c.get("compact_write_bytes", 0) + sum(
                t.size for t in outputs
            )
            new = replace(
                m,
                generation=m.generation + 1,
                next_file=next_file[0],
                tables=[t for t in m.tables if t.number not in inputs] + outputs,
                counters=c,
            )
            with self._lock:
                assert self._manifest.generation == m.generation, "Invariant: only we publish"
                self._publish_locked(new)
        finally:
            for r in readers.values():
                r.unref()
        for n in inputs:
            _unlink_quiet(self._sst_path(n))

    def _publish_locked(self, new: mf.Manifest) -> None:
        """Write ``new`` durably, then make it our view. On failure the old manifest stays."""
        mf.write(self.path, new)
        self._page.bump()  # after the rename: others reload
        for _ in range(_RETRIES):
            ident = mf.identity(self.path)
            try:
                self._install_locked(new, ident)
                return
            except FileNotFoundError:  # pragma: no cover - we hold the lock; nobody deletes
                continue

    def _collect_garbage_locked(self) -> None:
        """REQUIRES: the maintenance lock. Remove files no manifest or live WAL chain needs."""
        self._refresh_locked(force=True)
        self._catch_up_locked()
        live_tables = {t.number for t in self._manifest.tables}
        first, last = self._gens[0].gen, self._gens[-1].gen
        try:
            names = os.listdir(self.path)
        except OSError:
            return
        for name in names:
            p = os.path.join(self.path, name)
            if name.endswith(".tmp"):
                _unlink_quiet(p)
            elif (n := fmt.parse_sst_name(name)) is not None and n not in live_tables:
                _unlink_quiet(p)
            elif (w := fmt.parse_wal_name(name)) is not None and not first <= w <= last:
                _unlink_quiet(p)

    def _sst_path(self, number: int) -> str:
        return os.path.join(self.path, fmt.sst_name(number))


# ---------------------------------------------------------------------- helpers


def _open_page(path: str) -> _accel.SharedPage:
    try:
        return _accel.SharedPage(path)
    except ValueError as e:
        raise Corruption(str(e)) from e
    except OSError as e:
        raise io_error(e, path, "map the shared page") from e


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _key(key: object) -> bytes:
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise InvalidType(f"key must be bytes or str, not {type(key).__name__}")
    key = bytes(key)
    if not key:
        raise KeyTooLarge("key is empty")
    if len(key) > fmt.MAX_KEY:
        raise KeyTooLarge(f"key is {len(key)} bytes; the limit is {fmt.MAX_KEY}")
    return key


def _value(value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidType(f"value must be bytes-like, not {type(value).__name__}")
    value = bytes(value)
    if len(value) > fmt.MAX_VALUE:
        raise ValueTooLarge(f"value is {len(value)} bytes; the limit is {fmt.MAX_VALUE}")
    return value


def _expire(expire_at_ms: object) -> int:
    if not isinstance(expire_at_ms, int) or expire_at_ms < 0:
        raise InvalidArgument("expire_at_ms must be a non-negative int (0 = never)")
    return expire_at_ms
