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
    fsync for the whole batch -- use it for bulk spills. **Group commit**: the fsync runs after
    every lock is released (``commit``), and one fdatasync covers every record appended before
    it, by any thread or process; a writer whose record another's fsync covered, or one in
    flight will cover, returns without its own (``stats()["group_commits"]``). The writers
    coordinate through three words of the ``SHARED`` page, not a lock, so a writer paused or
    killed in its fsync delays the others by at most about two fsyncs (the wait for a leader
    has a deadline), never for the length of its pause. Invariants in ext/lsm/group_commit.h.

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
  the offset it last read. Before every operation it loads the change counter of the ``SHARED``
  page (below); if it moved, the process ``fstat``\\ s the WAL and replays the records appended
  since (without the WAL lock: a record that reads whole and passes its checksum is final; an
  anomaly is looked at again holding the lock, wal.py), then serves the get. A write by A is
  thus visible to B's next get (read-your-writes across processes, linearisable per key because
  the WAL order is the one order every process applies). Rejected: a memtable in shared memory
  (that is the Cython tier's job; this engine must stand alone and be crash-simple).
* **Flush = seal + new generation.** A flusher takes the maintenance lock (``flock`` on
  ``LOCK``), creates ``wal-<gen+1>.log``, then appends a SEAL record to the current WAL holding the
  WAL lock. Nothing is appended after a seal: a writer that catches up to a seal moves to the next
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
  and whoever takes the WAL lock from a dead owner bumps again: a writer killed inside
  ``write(2)`` leaves the counter moved *after* its torn bytes, so its torn tail is never
  taken for the end of a clean log by a process that skipped looking. (Without that last
  bump a process that loaded the counter between the pre-write bump and the bytes would
  append after the garbage: the random-SIGKILL soak found exactly that.) A process that misses the manifest still reads correctly:
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
* **fork()**: a handle must not cross a fork (the ``LOCK`` flock is shared by the open file
  description, so parent and child would not exclude each other, and the handle's thread locks
  may be held by threads the child does not have); using one in the child raises ``Error``. Open
  the store in each worker.

The code, by job (LevelDB's split): this module is the API and the write path; the view of the
files each process keeps is version.py (LevelDB's ``VersionSet``); flush, compaction and the
background thread are maintenance.py; a change to the manifest is one ``manifest.Edit``
(``VersionEdit``).

Lock order (outermost first): the maintenance mutex (maintenance, threads of this process) ->
``LOCK`` file flock (maintenance, processes) -> ``self._lock``, the *handle lock* (all
in-process state) -> the WAL lock (``WalFile.locked()``). No lock is held across the fsync of
a write (``commit``): a WAL with commits in flight is pinned open (``WalFile.pins``) instead.
Methods named ``_x_handle_locked`` REQUIRE the handle lock, ``_x_wal_locked`` the WAL lock too;
maintenance takes the handle lock only for short steps (seal, publish), so merges and table
writes never block gets and puts.

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

import errno
import fcntl
import itertools
import os
import struct
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

from shmkv.errors import (
    Corruption,
    Error,
    InvalidArgument,
    InvalidType,
    KeyTooLarge,
    StoreClosed,
    StoreNotFound,
    ValueTooLarge,
    not_bytes_like,
)

from . import _accel
from . import format as fmt
from . import manifest as mf
from . import wal as walmod
from .compaction import LevelOptions
from .errors import StoreInUse, io_error
from .helper import Helper
from .maintenance import Maintainer, now_ms
from .sstable import COMPRESSIONS, BlockCache, TableReader
from .version import Counters, VersionSet
from .wal import WalFile

DURABILITY = ("none", "interval", "fsync")
WAL_RECOVERY = ("strict", "truncate", "skip")
# What commit() waits on: the WAL written to (pinned open) and the end of the record in it.
Ticket = tuple[WalFile, int]
_STALL_FACTOR = 4  # WAL backlog (x memtable_bytes) at which writers stop and flush themselves


# Every open handle, so a forked child can drop its copies (see _after_fork_in_child).
_live: weakref.WeakSet[LSM] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """In a forked child, inherited handles are dead: their threads did not survive and their
    locks may be held forever. Close their fds *without* flock(LOCK_UN) -- the open file
    descriptions are shared with the parent, and unlocking would release the parent's locks."""
    for db in list(_live):
        db._abandon_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class LSM:
    """A log-structured merge tree in directory ``path``. See the module docstring.

    :param path: directory (created if missing).
    :param durability: ``"none"``, ``"interval"`` or ``"fsync"`` (see module doc).
    :param interval_ms: fsync period for ``"interval"``.
    :param compression: SSTable block codec: ``"lz4"``, ``"zstd"`` or ``"none"``.
    :param memtable_bytes: WAL generation size that triggers a flush to L0.
    :param levels: compaction shape (:class:`~shmkv.lsm.compaction.LevelOptions`).
    :param block_cache_bytes: decompressed data blocks kept per process.
    :param wal_recovery: what to do with a *corrupted* WAL record (a whole record that fails its
        checksum, or a bad header with data after it; see wal.py): ``"strict"`` (default)
        raises :class:`Corruption` naming the file and offset, and drops nothing;
        ``"truncate"`` drops the log from that record to its end (point-in-time: every record
        before it is kept); ``"skip"`` drops only the bad records and keeps every intact
        record after them. Either way the dropped bytes are first copied into ``lost/``
        (which ``verify()`` reports until removed) and logged on the ``shmkv.lsm`` logger. A
        torn *tail* (a record cut short by the end of the file: a writer died inside its
        ``write(2)``, so it was never acknowledged) is cut in every mode, and logged.
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
    :param create: ``False``: open a store that exists, never make one -- the helper's way in
        (it may start just as its parent dies and the directory is removed; it must not
        leave a new empty store behind). :raises StoreNotFound: no directory, or no MANIFEST.
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
        create: bool = True,
    ) -> None:
        if durability not in DURABILITY:
            raise InvalidArgument(f"durability must be one of {DURABILITY}, not {durability!r}")
        if compression not in COMPRESSIONS:
            raise InvalidArgument(f"compression must be one of {sorted(COMPRESSIONS)}")
        if wal_recovery not in WAL_RECOVERY:
            raise InvalidArgument(
                f"wal_recovery must be one of {WAL_RECOVERY}, not {wal_recovery!r}"
            )
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
        self._create = create
        helper_proc: Helper | None = None
        if helper and background and auto_maintenance:
            helper_proc = Helper(
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
        # The handle lock. State below, down to the next comment, is protected by it (the
        # view's fields too); the write fast path (_accel.Tail) takes it itself.
        self._lock = threading.RLock()
        self._closed = False  # set once, by close() (or a fork), with _tail.open (the flag _open checks)
        self._page: _accel.SharedPage = None  # type: ignore[assignment]  # set first in the try below
        # What every put touches, with the put fast path (one C call: _accel.Tail). Its fields
        # are this handle's _gens, _seen and _dirty (properties below, and the view's).
        self._tail = _accel.Tail(self._lock, self._put_uncommitted_slow)
        self._tail.fsync = durability == "fsync"
        # ``with self._open:`` -- the handle lock, of an open handle (tail.open is the flag).
        self._open = _accel.OpenLock(self._lock, self._tail, self._check_open)
        self._seen = -1  # change counter loaded before our last full look; -1: never looked
        self._gens = []
        self._dirty = False  # WAL written since the last fsync ("interval")
        # Counters of stats(); the ones commit() and the put/delete paths bump after the lock is
        # released are approximate under threads (a lost increment, never a wrong value).
        self._c = Counters()
        self._view = VersionSet(
            self.path, self._page, self._tail, BlockCache(block_cache_bytes), self._c,
            self.opts.max_levels, wal_recovery,
        )
        # State below is not protected by the handle lock: set before the threads start, or
        # (Maintainer) guarded by the maintenance locks, see maintenance.py.
        self._cache = self._view.cache  # atomic under the GIL (BlockCache): no lock needed
        self._lock_fd = -1  # LOCK: the open lock (whole life) and the maintenance flock
        self._forked = False  # set only in a forked child, which has no other threads
        self._maint = Maintainer(
            self.path, self._lock, self._view, self.opts, compression, memtable_bytes, helper_proc
        )
        self._tail.limit = self._fast_limit()
        # LSM.put_uncommitted without a Python frame: what the memory tier calls (_core.pyx).
        self.fast_put = self._tail.put_uncommitted
        self._syncer: threading.Thread | None = None
        try:
            if not create:
                if not os.path.isdir(self.path):
                    raise StoreNotFound(f"{self.path}: no store there (opened with create=False)")
            else:
                try:
                    os.makedirs(self.path, exist_ok=True)
                except OSError as e:  # a file at (or above) path, a read-only file system...
                    raise io_error(e, self.path, "create the store directory") from e
            self._page = _open_page(os.path.join(self.path, fmt.SHARED))
            self._tail.page = self._view.page = self._page
            lock_path = os.path.join(self.path, fmt.LOCKFILE)
            try:
                self._lock_fd = self._maint.lock_fd = os.open(
                    lock_path, os.O_RDWR | os.O_CREAT, 0o644
                )
            except OSError as e:
                raise io_error(e, lock_path, "open lock file") from e
            hold_open_lock(self._lock_fd, lock_path, exclusive=False)
            with self._lock:
                self._bootstrap_handle_locked()
                self._view.refresh_handle_locked(force=True)
                self._view.catch_up_handle_locked()
                if self._maint.try_lock():
                    try:
                        self._maint.collect_garbage_handle_locked()
                    finally:
                        self._maint.unlock()
        except BaseException:
            self._release_all()
            raise
        if durability == "interval":
            self._syncer = threading.Thread(
                target=self._sync_loop, name="shmkv-lsm-sync", daemon=True
            )
            self._syncer.start()
        if background and auto_maintenance:
            self._maint.start_thread(self._lower_fast_limit)
        _live.add(self)

    @property
    def _helper(self) -> Helper | None:
        """The maintenance helper process (None: maintenance runs in this process)."""
        return self._maint.helper


    def _lower_fast_limit(self) -> None:
        self._tail.limit = self._fast_limit()  # writers past it ask again (_append)

    def _fast_limit(self) -> int:
        """The WAL backlog up to which puts take the fast path: past it the Python path asks
        for maintenance (at half a memtable it starts the helper, see _append)."""
        if not self.auto_maintenance:
            return 1 << 62
        h = self._helper
        return self.memtable_bytes >> 1 if h is not None and h.pid is None else self.memtable_bytes

    # Views of the fast path's fields (``self._tail``), which are the one copy.
    @property
    def _gens(self) -> list[_accel.Gen]:
        return self._tail.gens

    @_gens.setter
    def _gens(self, gens: list[_accel.Gen]) -> None:
        self._tail.gens = gens

    @property
    def _seen(self) -> int:
        return self._tail.seen

    @_seen.setter
    def _seen(self, e: int) -> None:
        self._tail.seen = e

    @property
    def _dirty(self) -> bool:
        return self._tail.dirty

    @_dirty.setter
    def _dirty(self, d: bool) -> None:
        self._tail.dirty = d

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
        if type(expire_at_ms) is not int or not 0 <= expire_at_ms <= fmt.MAX_EXPIRE_MS:
            expire_at_ms = _expire(expire_at_ms)
        self.put_checked(key, value, expire_at_ms)

    def put_checked(self, key: bytes, value: bytes, expire_at_ms: int) -> None:
        """:meth:`put` for a caller that has validated its arguments. REQUIRES: bytes key of
        1..MAX_KEY bytes, bytes value of at most MAX_VALUE bytes, int expire_at_ms >= 0."""
        self.commit(self._tail.put_uncommitted(key, value, expire_at_ms)[2])

    def put_uncommitted(
        self, key: bytes, value: bytes, expire_at_ms: int
    ) -> tuple[bytes, int, Ticket | None]:
        """See :meth:`_put_uncommitted_slow`; the common case is one C call (``fast_put``)."""
        return self._tail.put_uncommitted(key, value, expire_at_ms)

    def _put_uncommitted_slow(
        self, key: bytes, value: bytes, expire_at_ms: int
    ) -> tuple[bytes, int, Ticket | None]:
        """The first half of a put, for the memory tier (which runs it under the key's stripe
        lock, and needs it lean): append the record and apply it, but do not wait for it to be
        durable. Returns ``(value, expire_at_ms, ticket)``: the entry the memory tier caches,
        and what :meth:`commit` needs (None unless durability is "fsync"). The caller calls
        ``commit(ticket)`` *after* releasing its own locks: then no lock another writer needs is
        held across the fsync (a paused writer would stop everyone). Until committed the write
        is visible to readers but not acknowledged: it survives the death of any process (it is
        in the OS page cache), not a host crash -- which also loses memory, so memory never
        holds what disk contradicts. REQUIRES: as :meth:`put_checked`."""
        ticket = self._append(
            ((fmt.KIND_PUT, key, value, expire_at_ms),),
            walmod.encode_put(fmt.KIND_PUT, key, value, expire_at_ms),
        )
        self._c.puts += 1
        return value, expire_at_ms, ticket

    def delete_uncommitted(self, key: bytes) -> tuple[None, int, Ticket | None]:
        """:meth:`delete` without waiting for durability; ``(None, 0, ticket)`` as
        :meth:`put_uncommitted`."""
        entry = (fmt.KIND_DELETE, _key(key), b"", 0)
        ticket = self._append((entry,), walmod.encode_put(*entry))
        self._c.deletes += 1
        return None, 0, ticket

    def commit(self, ticket: Ticket | None) -> None:
        """Return once the write that returned ``ticket`` is durable (see :meth:`_append`):
        group commit, one fdatasync for every writer waiting, in any process. None: nothing to
        wait for. Holds no lock across the fsync.

        :raises DiskFull, FileAccessError: the fsync failed (the write may or may not be on
            disk; it was not acknowledged)."""
        if ticket is None:
            return
        wal, end = ticket
        try:
            here = self._page.sync_to(wal.fd, wal.gen, end)
        except OSError as e:
            raise io_error(e, wal.path, "fsync WAL") from e
        finally:
            with self._lock:
                wal.unpin()
        if here:
            self._c.wal_syncs += 1
        else:
            self._c.group_commits += 1

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
            ticket = self._append(entries, walmod.encode_batch(entries))
            self._c.puts += len(entries)
            self.commit(ticket)

    def delete(self, key: bytes) -> None:
        """Write a tombstone for ``key`` (absent keys too: they may be on disk)."""
        self.commit(self.delete_uncommitted(key)[2])

    def delete_many(self, keys: Iterable[bytes]) -> None:
        """Write a tombstone for every key with one WAL append and one fsync (as put_many)."""
        entries = [(fmt.KIND_DELETE, _key(k), b"", 0) for k in keys]
        if entries:
            ticket = self._append(entries, walmod.encode_batch(entries))
            self._c.deletes += len(entries)
            self.commit(ticket)

    def get(self, key: bytes) -> bytes | None:
        """The live value of ``key``, or None (absent, deleted or expired)."""
        e = self.get_entry(key)
        return None if e is None else e[0]

    def get_entry(self, key: bytes) -> tuple[bytes, int] | None:
        """``(value, expire_at_ms)`` of a live key, or None."""
        if type(key) is not bytes or not 0 < len(key) <= fmt.MAX_KEY:
            key = _key(key)
        with self._open:
            view = self._view
            if self._page.load() != self._seen:
                view.sync_handle_locked()
            self._c.gets += 1
            slot = view.lookup_handle_locked(key)
        if slot is None:
            return None
        kind, value, expire = slot
        if kind != fmt.KIND_PUT or (expire and expire <= now_ms()):
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
        with self._open:
            view = self._view
            view.sync_handle_locked()
            sources: list[Iterator[tuple[bytes, int, bytes, int]]] = []
            for g in reversed(self._gens):
                sources.append(iter(g.mem.items(start, stop)))
            held: list[TableReader] = []
            for t in view.levels[0]:
                r = view.readers[t.number]
                r.ref()
                held.append(r)
                sources.append(r.iter_from(start, stop))
            for lv in view.levels[1:]:
                rs = [
                    view.readers[t.number]
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
            yield from _accel.Merge(sources, now_ms())  # live (key, value) pairs, newest wins
        finally:
            for r in held:
                r.unref()

    def flush(self) -> None:
        """Write all memtables to an L0 table now (then run due compactions). Waits for any
        maintenance in progress, in this process or another."""
        self._check_open()
        self._maint.run(block=True, force_flush=True)

    def compact(self) -> None:
        """Flush, then merge every table into one sorted run at the deepest level (drops all
        tombstones and expired entries, reclaims space)."""
        self._check_open()
        self._maint.run(block=True, force_flush=True, full=True)

    def maintain(self) -> None:
        """Run one maintenance round now unless another is in progress (in this process or
        another): flush if the WAL backlog reached ``memtable_bytes``, then the due compactions.
        What the background thread and the helper process (helper_main.py) run."""
        self._check_open()
        self._maint.run(block=False)

    def sync(self) -> None:
        """fsync the WAL now (any durability mode)."""
        with self._open:
            self._gens[-1].wal.sync()
            self._dirty = False
            self._c.wal_syncs += 1

    def verify(self) -> list[str]:
        """Check manifest, every table block and every live WAL record; return problems found."""
        from .verify import verify_store

        with self._open:
            return verify_store(self.path, self.opts.max_levels, self._page)

    def stats(self) -> dict[str, Any]:
        """Counters and sizes. ``write_amplification`` = bytes written to disk (WAL + flushes +
        compactions) / key+value bytes put, store-wide. Bloom numbers are this process's."""
        with self._open:
            view = self._view
            view.sync_handle_locked()
            m = view.manifest
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
                + view.probe.negatives
                + sum(r.bloom_negatives for r in view.readers.values())
            )
            fp = self._c.bloom_false_positives + sum(
                r.bloom_false_positives for r in view.readers.values()
            )
            return {
                "disk_bytes": disk,
                "files_per_level": [len(lv) for lv in view.levels],
                "bytes_per_level": [sum(t.size for t in lv) for lv in view.levels],
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
                "puts": self._c.puts + self._tail.puts,
                "deletes": self._c.deletes,
                "wal_syncs": self._c.wal_syncs,
                "group_commits": self._c.group_commits,
                "wal_replayed_records": self._c.wal_replayed_records,
                "wal_torn_tails_dropped": self._c.wal_torn_tails_dropped,
                "wal_torn_bytes_dropped": self._c.wal_torn_bytes_dropped,
                "wal_corrupt_records_dropped": self._c.wal_corrupt_records_dropped,
                "wal_dropped_bytes": self._c.wal_dropped_bytes,
                "manifest_reloads": self._c.manifest_reloads,
                "last_maintenance_error": self._maint.last_error,
                "durability": self.durability,
            }

    def close(self) -> None:
        """Finish maintenance in progress, sync (unless durability is "none"), release every
        file. Idempotent."""
        if self._closed:
            return
        self._check_open()
        self._maint.stop.set()
        self._maint.wanted.set()
        for t in (self._syncer, self._maint.thread):
            if t is not None and t is not threading.current_thread():
                t.join()
        if self._maint.helper is not None:
            self._maint.helper.stop()
        with self._maint.exclusive(), self._lock:
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
                self._closed = self._maint.closed = True
                self._tail.open = False
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
        self._closed = self._maint.closed = True
        self._tail.open = False
        self._forked = True
        if self._maint.helper is not None:
            self._maint.helper.abandon_in_child()
        fds = [g.wal.fd for g in self._gens] + [r.fd for r in self._view.readers.values()]
        for fd in [*fds, self._lock_fd]:
            try:
                if fd >= 0:
                    os.close(fd)
            except OSError:
                pass

    def _release_all(self) -> None:
        self._view.release()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._page is not None:
            self._page.close()

    def _bootstrap_handle_locked(self) -> None:
        """Create an empty store (WAL 1 + manifest) if there is no manifest yet.

        A directory with data files but no manifest is refused, never "re-initialised": the
        next maintenance would garbage-collect every table. (A lone header-only wal-1 is the
        leftover of a bootstrap that died before its manifest, and is fine.)
        """
        if mf.identity(self.path) is not None:
            return
        if not self._create:
            raise StoreNotFound(f"{self.path}: no store there (no MANIFEST; opened with create=False)")
        self._maint.lock(block=True)
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
                            f"{self.path}: MANIFEST is missing but data files exist ({name}); "
                            f"`shmkv repair {self.path}` rebuilds it from them"
                        )
                WalFile.create(self.path, 1, self._page).close()
                mf.write(self.path, mf.Manifest(generation=1, wal_gen=1, next_file=1))
        finally:
            self._maint.unlock()

    # ------------------------------------------------------------------ writes

    def _append(
        self, entries: Sequence[tuple[int, bytes, bytes, int]], data: bytes
    ) -> Ticket | None:
        """Append ``data`` (the WAL records of ``entries``) and apply ``entries`` to our memtable.
        In durability "fsync", return the ticket :meth:`commit` waits on: the WAL (pinned open
        until committed) and the end of our record in it. The record is written (in the page
        cache, visible to every process) but not yet durable.

        Fast path: when the change counter still equals the value of our last full look (or of our own
        last append), nobody appended, sealed or replaced the manifest since, so the WAL ends
        exactly at ``g.offset``: no fstat, no replay -- one write under the WAL lock, in C.

        Rejected: fsync here, under ``self._lock`` (as before group commit): every other thread
        of the process then waited for it, and the memory tier calls this under a stripe lock,
        so a writer paused in its fsync stopped every process that touched that stripe."""
        page = self._page
        with self._open:
            view = self._view
            if page.load() != self._seen:
                view.sync_handle_locked()
            g = self._gens[-1]
            after = 0
            if g.sealed_to is None:
                try:  # 0: the counter moved since our last look; catch up below
                    after = page.append(g.wal.fd, data, g.offset, self._seen, g.gen)
                except OSError as e:
                    raise io_error(e, g.wal.path, "append to WAL") from e
            while not after:
                with g.wal.locked():
                    view.replay_wal_locked(g)  # someone appended (or died appending) meanwhile
                    if g.sealed_to is None:
                        after = g.wal.append_wal_locked(data, g.offset, g.gen)
                if not after:
                    view.catch_up_handle_locked()  # sealed under us: move to the next generation
                    g = self._gens[-1]
            if len(entries) == 1:
                kind, key, value, expire = entries[0]
                g.mem.apply(kind, key, value, expire)
            else:
                g.mem.apply_all(entries)
            g.offset += len(data)
            if after == self._seen + 2:
                self._seen = after  # the only change since our last look was this append
            ticket: Ticket | None = None
            if self.durability == "fsync":
                ticket = (g.wal, g.offset)
                g.wal.pins += 1  # closing it must wait for our commit (fd reuse: wrong file)
            else:
                self._dirty = True
            backlog = (
                g.offset - fmt.WAL_HEADER.size if len(self._gens) == 1 else view.wal_bytes_handle_locked()
            )
        if not self.auto_maintenance or backlog < self.memtable_bytes:
            h = self._helper
            if h is not None and h.pid is None and backlog >= self.memtable_bytes >> 1:
                h.ensure_started()  # never started yet: let it import while we fill up
                self._tail.limit = self.memtable_bytes  # the fast path may go on to a flush
            return ticket
        maint = self._maint
        if maint.thread is not None and backlog < _STALL_FACTOR * self.memtable_bytes:
            if not maint.wanted.is_set():
                # asked for: the fast path may go on up to the stall (the loop lowers it again)
                self._tail.limit = _STALL_FACTOR * self.memtable_bytes
                maint.wanted.set()
            return ticket
        # Inline mode, or the background thread cannot keep up: the writer does the work
        # (a write stall, as in LevelDB: memory stays bounded). The record is written already
        # (and is durable once committed), so a failure here is recorded, not raised.
        try:
            maint.run(block=maint.thread is not None)
        except (Error, OSError) as e:
            maint.last_error = f"{type(e).__name__}: {e}"
        return ticket

    def _sync_loop(self) -> None:
        while not self._maint.stop.wait(self.interval_ms / 1000):
            with self._lock:
                if self._closed or not self._dirty or not self._gens:
                    continue
                try:
                    self._gens[-1].wal.sync()
                    self._dirty = False
                    self._c.wal_syncs += 1
                except Exception as e:  # a thread must not die silently; surface it in stats
                    self._maint.last_error = f"background fsync: {e}"

# ---------------------------------------------------------------------- helpers


_OPEN_LOCK = struct.Struct("@hhqqi4x")  # struct flock on Linux: type, whence, start, len, pid


def hold_open_lock(fd: int, path: str, *, exclusive: bool) -> None:
    """The *open lock*: an OFD lock on byte 0 of the store's ``LOCK`` file, shared by every open
    handle (taken by :class:`LSM` for its lifetime, blocking), exclusive for ``shmkv repair``
    (non-blocking: :class:`StoreInUse` if any handle is open). Open-file-description locks
    (``F_OFD_SETLK``) live as long as the fd, are dropped by the kernel when the process
    dies, and are independent of the ``flock`` on the same file that guards maintenance.
    Rejected: ``flock(LOCK_SH)`` on ``LOCK`` (it would block every maintenance ``LOCK_EX``)
    and POSIX ``lockf`` (per process: closing one handle would drop every handle's lock)."""
    lk = _OPEN_LOCK.pack(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK, os.SEEK_SET, 0, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK if exclusive else fcntl.F_OFD_SETLKW, lk)
    except OSError as e:
        if exclusive and e.errno in (errno.EAGAIN, errno.EACCES):
            raise StoreInUse(
                f"{os.path.dirname(path)}: the store is open in another process "
                "(close every handle first)"
            ) from None
        raise io_error(e, path, "lock") from e


def _open_page(path: str) -> _accel.SharedPage:
    try:
        return _accel.SharedPage(path)
    except ValueError as e:
        raise Corruption(str(e)) from e
    except OSError as e:
        raise io_error(e, path, "map the shared page") from e


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
        raise not_bytes_like(value)
    value = bytes(value)
    if len(value) > fmt.MAX_VALUE:
        raise ValueTooLarge(f"value is {len(value)} bytes; the limit is {fmt.MAX_VALUE}")
    return value


def _expire(expire_at_ms: object) -> int:
    if isinstance(expire_at_ms, bool) or not isinstance(expire_at_ms, int) or expire_at_ms < 0:
        raise InvalidArgument("expire_at_ms must be a non-negative int (0 = never)")
    if expire_at_ms > fmt.MAX_EXPIRE_MS:
        raise InvalidArgument(
            f"expire_at_ms {expire_at_ms} does not fit the u64 of the entry format (at most {fmt.MAX_EXPIRE_MS})"
        )
    return expire_at_ms
