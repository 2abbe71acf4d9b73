"""Maintenance of one handle: flush (seal the WAL, write an L0 table) and compactions, the
background thread that runs them, and the helper process it hands them to.

Whichever process holds the ``LOCK`` file's flock (the *maintenance lock*) maintains for
everyone; the others skip (non-blocking) or wait (``flush()``/``compact()``). Every step is
ordered so that the manifest in force plus the WALs from its ``wal_gen`` on always hold every
acknowledged write (db.py's module docstring: "Crash safety").

Lock order (outermost first): ``Maintainer._mutex`` (threads of this process; flock cannot
tell them apart) -> the maintenance lock (processes) -> the handle lock (``LSM._lock``), which
maintenance takes only for short steps (seal, pick, publish): merging and writing tables run
without it, so other threads keep reading and writing. Methods here without a ``_locked``
suffix REQUIRE that the handle lock is NOT held.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable

from shmkv.errors import Corruption

from . import compaction
from . import format as fmt
from . import manifest as mf
from . import wal as walmod
from .compaction import LevelOptions
from .fileio import unlink_quiet
from .helper import Helper
from .sstable import TableMeta, TableWriter
from .version import VersionSet
from .wal import WalFile

_HELPER_GIVE_UP = 3  # helper deaths in a row (none answering a round) before maintaining in-thread


def now_ms() -> int:
    return int(time.time() * 1000)


class Maintainer:
    """Flush and compaction for the handle whose lock is ``lock`` and view is ``view``."""

    def __init__(
        self,
        path: str,
        lock: threading.RLock,
        view: VersionSet,
        opts: LevelOptions,
        compression: str,
        memtable_bytes: int,
        helper: Helper | None,
    ) -> None:
        self.path = path
        self.view = view
        self.opts = opts
        self.compression = compression
        self.memtable_bytes = memtable_bytes
        self._lock = lock  # the handle lock
        self.lock_fd = -1  # the LOCK file (the handle opens it: it carries the open lock too)
        self.closed = False  # set by the handle's close, under the handle lock
        # Guarded by the GIL (single assignments, read by stats()): the last failure of
        # automatic maintenance, None after a round that went fine.
        self.last_error: str | None = None
        self.helper = helper  # None once it proved unusable (the thread maintains itself)
        self._mutex = threading.Lock()  # outermost: one maintainer thread in this process
        self.wanted = threading.Event()  # a writer crossed the threshold: run a round
        self.stop = threading.Event()  # close(): the loop ends, compactions stop early
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the maintenance lock

    def try_lock(self) -> bool:
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def lock(self, block: bool) -> None:
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)

    def unlock(self) -> None:
        fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def exclusive(self) -> threading.Lock:
        """This process's maintenance mutex: ``close()`` holds it so no round is in flight."""
        return self._mutex

    # ------------------------------------------------------------------ rounds

    def run(self, *, block: bool, force_flush: bool = False, full: bool = False) -> None:
        """One round: flush (when due, or forced), then the due compactions (or one full
        compaction). The entry point of every maintenance: the background thread, a stalled
        writer, ``flush()``/``compact()`` and the helper process (``LSM.maintain``).

        Non-blocking (``block=False``) gives up at once if this process or another is already
        doing maintenance: that one will seal and flush our WAL as well.
        """
        if not self._mutex.acquire(blocking=block):
            return
        try:
            if block:
                self.lock(True)
            elif not self.try_lock():
                return
            try:
                if self.closed:
                    return
                self._flush(force_flush)
                if full:
                    with self._lock:
                        comp = compaction.pick_full(self.view.manifest, self.opts)
                    if comp is not None:
                        self._run_compaction(comp)
                    with self._lock:
                        self.collect_garbage_handle_locked()
                else:
                    self._compact_due()
            finally:
                self.unlock()
        finally:
            self._mutex.release()

    def _flush(self, force: bool) -> None:
        """REQUIRES: the maintenance lock. Seal the WAL, write the sealed generations to one L0
        table, install a manifest that starts at the new generation."""
        view = self.view
        with self._lock:
            view.refresh_handle_locked(force=True)
            view.catch_up_handle_locked()
            tail = view.gens[-1]
            if not force and view.wal_bytes_handle_locked() < self.memtable_bytes:
                return  # someone flushed while we waited
            if not any(g.mem.records for g in view.gens):
                return
            new_gen = tail.gen + 1
            WalFile.create(self.path, new_gen, view.page).close()
            with tail.wal.locked():
                view.replay_wal_locked(tail)
                if tail.sealed_to is not None:
                    raise Corruption(
                        f"{tail.wal.path}: sealed by someone not holding the maintenance lock"
                    )
                tail.wal.append_wal_locked(walmod.encode_record(fmt.REC_SEAL, fmt.U64.pack(new_gen)))
                tail.wal.sync()
                view.replay_wal_locked(tail)
            assert tail.sealed_to == new_gen, "Invariant: our own SEAL is the last record"
            view.catch_up_handle_locked()  # opens the new generation
            # Invariant: sealed generations never change again, and only a manifest written by
            # the maintenance-lock holder (us) can drop them: safe to read without the lock.
            flushed = [g for g in view.gens if g.sealed_to is not None]
            m = view.manifest
        number = m.next_file
        stream = compaction.drop_dead(
            compaction.merge([g.mem.iter_entries() for g in reversed(flushed)]),
            list(m.tables),
            now_ms(),
        )
        meta: TableMeta | None = None
        writer = TableWriter(self._sst_path(number), self.compression)
        try:
            writer.add_from(stream)
            if len(writer):
                meta = writer.finish(number, 0, wal_stamp=new_gen)
            else:
                writer.abandon()  # everything flushed was dead: no table
        except BaseException:
            writer.abandon()
            raise
        edit = mf.Edit(
            base=m.generation,
            wal_gen=new_gen,
            next_file=number + 1 if meta else number,
            added=[meta] if meta else [],
            counters={
                "flushes": 1,
                "user_bytes": sum(g.mem.user_bytes for g in flushed),
                "wal_bytes": sum(g.offset for g in flushed),
                "flush_bytes": meta.size if meta else 0,
            },
        )
        with self._lock:
            view.log_and_apply_handle_locked(edit)
        for g in flushed:
            unlink_quiet(g.wal.path)

    def _compact_due(self) -> None:
        """REQUIRES: the maintenance lock."""
        for _ in range(64):  # bounded: each round strictly reduces the most urgent score
            with self._lock:
                comp = compaction.pick(self.view.manifest, self.opts)
            if comp is None or self.stop.is_set():
                return
            self._run_compaction(comp)

    def _run_compaction(self, comp: compaction.Compaction) -> None:
        """REQUIRES: the maintenance lock. Merge without the handle lock; publish under it."""
        view = self.view
        with self._lock:
            m = view.manifest
            readers = {t.number: view.readers[t.number] for t in comp.inputs}
            for r in readers.values():
                r.ref()  # a reload in another thread must not close them under the merge
        try:
            next_file = [m.next_file]

            def new_writer() -> tuple[int, TableWriter]:
                n = next_file[0]
                next_file[0] += 1
                return n, TableWriter(self._sst_path(n), self.compression)

            outputs = compaction.run(comp, m, readers, self.opts, new_writer, now_ms())
            inputs = {t.number for t in comp.inputs}
            edit = mf.Edit(
                base=m.generation,
                next_file=next_file[0],
                added=outputs,
                removed=inputs,
                counters={
                    "compactions": 1,
                    "compact_read_bytes": sum(t.size for t in comp.inputs),
                    "compact_write_bytes": sum(t.size for t in outputs),
                },
            )
            with self._lock:
                view.log_and_apply_handle_locked(edit)
        finally:
            for r in readers.values():
                r.unref()
        for n in inputs:
            unlink_quiet(self._sst_path(n))

    def collect_garbage_handle_locked(self) -> None:
        """REQUIRES: the maintenance lock and the handle lock. Remove files no manifest or live
        WAL chain needs."""
        view = self.view
        view.refresh_handle_locked(force=True)
        view.catch_up_handle_locked()
        live_tables = {t.number for t in view.manifest.tables}
        first, last = view.gens[0].gen, view.gens[-1].gen
        try:
            names = os.listdir(self.path)
        except OSError:
            return
        for name in names:
            p = os.path.join(self.path, name)
            if name.endswith(".tmp"):
                unlink_quiet(p)
            elif (n := fmt.parse_sst_name(name)) is not None and n not in live_tables:
                unlink_quiet(p)
            elif (w := fmt.parse_wal_name(name)) is not None and not first <= w <= last:
                unlink_quiet(p)

    def _sst_path(self, number: int) -> str:
        return os.path.join(self.path, fmt.sst_name(number))

    # ------------------------------------------------------------------ the background thread

    def start_thread(self, on_wake: Callable[[], None]) -> None:
        """Start the background loop; ``on_wake`` runs at each wake-up (the handle lowers its
        fast path's limit there, so writers past it ask again)."""
        self.thread = threading.Thread(
            target=self._loop, args=(on_wake,), name="shmkv-lsm-maintenance", daemon=True
        )
        self.thread.start()

    def _loop(self, on_wake: Callable[[], None]) -> None:
        """Background maintenance: woken by writers crossing ``memtable_bytes``, and once a
        second to catch work that is due for other reasons (a failed flush, another process's
        writes)."""
        while not self.stop.is_set():
            woken = self.wanted.wait(1.0)
            self.wanted.clear()
            on_wake()
            if self.stop.is_set():
                return
            try:
                if not woken:
                    with self._lock:
                        if self.closed:
                            return
                        due = self.view.wal_bytes_handle_locked() >= self.memtable_bytes or (
                            compaction.pick(self.view.manifest, self.opts) is not None
                        )
                    if not due:
                        continue
                if self.helper is not None:
                    self.last_error = self.helper.round()
                    if self.helper.exits >= _HELPER_GIVE_UP:
                        # It cannot run here (say sys.executable is not a Python, as under
                        # some embedding servers): maintain in this thread from now on.
                        self.helper.stop()
                        self.helper = None
                        self.last_error = f"maintenance helper unusable: {self.last_error}"
                        self.run(block=False)
                else:
                    self.run(block=False)
                    self.last_error = None
            except Exception as e:  # a thread must not die silently; surface it in stats
                self.last_error = f"background maintenance: {type(e).__name__}: {e}"
