"""Each process's view of the store's files: LevelDB's ``VersionSet``.

A process sees the store through the manifest in force (the tables, by level, with their
readers open) and the live WAL generations from the manifest's ``wal_gen`` on (each replayed
into a private memtable). This module keeps that view current -- reload the manifest when it
changed, replay what other processes appended, follow seals to newer generations, cut torn
tails and recover damaged records -- and installs the manifests that maintenance writes
(:meth:`VersionSet.log_and_apply_handle_locked`, LevelDB's ``LogAndApply``). Why the design is
safe with many processes: db.py's module docstring.

Thread safety: every method REQUIRES the owning handle's lock (``LSM._lock``, the *handle
lock*); the names say so (``_handle_locked``). Methods named ``_wal_locked`` REQUIRE the WAL
lock as well (``WalFile.locked()``), taken inside the handle lock. Sealed generations are the
exception the maintainer relies on: they never change again, and only a manifest published by
the maintenance-lock holder drops them, so that holder reads them without the handle lock.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from shmkv.errors import Corruption

from . import _accel
from . import format as fmt
from . import lost as lostmod
from . import manifest as mf
from . import wal as walmod
from .memtable import Memtable
from .sstable import BlockCache, TableMeta, TableReader, _decompress
from .wal import WalFile

log = logging.getLogger("shmkv.lsm")
RETRIES = 100  # manifest re-reads before a vanished file is declared corruption

# One live WAL generation as this process sees it: wal, mem, offset, sealed_to (C, so the
# write fast path reads it directly). Invariant: ``mem`` holds exactly the records of ``wal``
# before ``offset``; ``sealed_to`` is set once the SEAL record has been applied, after which the
# generation never changes.
_Gen: TypeAlias = _accel.Gen


@dataclass
class Counters:
    """This handle's counters (``LSM.stats()``); store-wide ones are in the manifest."""

    gets: int = 0
    puts: int = 0
    deletes: int = 0
    wal_syncs: int = 0  # fdatasyncs of the WAL this process ran
    group_commits: int = 0  # "fsync" writes another process's (or thread's) fdatasync covered
    wal_replayed_records: int = 0
    wal_torn_tails_dropped: int = 0
    wal_torn_bytes_dropped: int = 0
    wal_corrupt_records_dropped: int = 0  # stretches of damaged records dropped by recovery
    wal_dropped_bytes: int = 0  # of damaged records (torn tails: wal_torn_bytes_dropped)
    manifest_reloads: int = 0
    bloom_negatives: int = 0  # of readers since closed
    bloom_false_positives: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class VersionSet:
    """The view of one handle. REQUIRES the handle lock for every method (module docstring).

    The live generations (``gens``) and the change counter of the last full look (``seen``) are
    fields of the write fast path (``_accel.Tail``), which reads them in C: the properties below
    are views of that one copy."""

    def __init__(
        self,
        path: str,
        page: _accel.SharedPage,
        tail: _accel.Tail,
        cache: BlockCache,
        counters: Counters,
        max_levels: int,
        wal_recovery: str,
    ) -> None:
        self.path = path
        self.page = page
        self.tail = tail
        self.cache = cache
        self.c = counters
        self.max_levels = max_levels
        self.wal_recovery = wal_recovery
        # State below is protected by the handle lock.
        self.readers: dict[int, TableReader] = {}  # by table number, one per table in force
        self.manifest = mf.Manifest()  # the manifest in force for this process
        self.mid: mf.Identity | None = None  # the stat identity it was read under
        self.levels: list[list[TableMeta]] = [[] for _ in range(max_levels)]
        self.probe = _accel.Probe([], [])  # the lookup path over memtables and tables (C)

    @property
    def gens(self) -> list[_Gen]:
        return self.tail.gens

    @gens.setter
    def gens(self, gens: list[_Gen]) -> None:
        self.tail.gens = gens

    @property
    def seen(self) -> int:
        return self.tail.seen

    @seen.setter
    def seen(self, e: int) -> None:
        self.tail.seen = e

    def wal_bytes_handle_locked(self) -> int:
        """The WAL backlog. Sealed-but-unflushed generations count: a failed flush must be
        retried soon."""
        return sum(g.offset - fmt.WAL_HEADER.size for g in self.gens)

    def sync_handle_locked(self) -> None:
        """Bring this process's view up to date unless the change counter says nothing did.

        The counter is loaded *before* looking, so a change made while we look bumps it past the
        value we remember and the next operation looks again."""
        assert self.page is not None
        e = self.page.load()
        if e == self.seen:
            return
        self.refresh_handle_locked()
        self.catch_up_handle_locked()
        self.seen = e

    def refresh_handle_locked(self, force: bool = False) -> None:
        """Load the manifest if it changed: tables opened/dropped, flushed generations dropped."""
        if not force and mf.identity(self.path) == self.mid:
            return
        for _ in range(RETRIES):
            got = mf.read(self.path)
            if got is None:
                raise Corruption(
                    f"{self.path}: MANIFEST is missing (`shmkv repair {self.path}` rebuilds it)"
                )
            m, ident = got
            if ident == self.mid and not force:
                return
            try:
                self.install_handle_locked(m, ident)
                return
            except FileNotFoundError as e:
                missing = e.filename
                again = mf.read(self.path)
                if again is not None and again[0].generation == m.generation:
                    # No newer manifest to explain it (the generation, not the stat identity,
                    # which a reused inode could repeat): the file is gone for good. (It was:
                    # read the same manifest 100 times, then not say which file.)
                    raise Corruption(
                        f"{missing}: named by the manifest but missing "
                        f"(`shmkv repair {self.path}` rebuilds the store from what remains)"
                    ) from None
                continue  # a named file vanished: a newer manifest exists; read it
        raise Corruption(f"{self.path}: the manifest names files that do not exist")

    def install_handle_locked(self, m: mf.Manifest, ident: mf.Identity | None) -> None:
        """Make ``m`` this process's view. Raises FileNotFoundError (view unchanged) if a file it
        names is gone."""
        opened: dict[int, TableReader] = {}
        try:
            for t in m.tables:
                if t.number not in self.readers:
                    opened[t.number] = TableReader(
                        os.path.join(self.path, fmt.sst_name(t.number)), t.number, self.cache
                    )
            keep = [g for g in self.gens if g.gen >= m.wal_gen]
            new_gen: _Gen | None = None
            if not keep:
                w = WalFile.open(self.path, m.wal_gen, self.page)
                new_gen = _Gen(w, Memtable(m.wal_gen))
            elif keep[0].gen != m.wal_gen:
                raise Corruption(f"{self.path}: WAL generation {m.wal_gen} is not in the chain")
        except BaseException:
            for r in opened.values():
                r.unref()
            raise
        for g in self.gens:
            if g.gen < m.wal_gen:
                g.wal.close()
        self.gens = keep if new_gen is None else [new_gen]
        names = {t.number for t in m.tables}
        for n in list(self.readers):
            if n not in names:
                r = self.readers.pop(n)
                self.c.bloom_negatives += r.bloom_negatives
                self.c.bloom_false_positives += r.bloom_false_positives
                r.unref()
        self.readers.update(opened)
        self.manifest = m
        self.mid = ident
        self.levels = m.levels(self.max_levels)
        self.c.bloom_negatives += self.probe.negatives
        rd = self.readers
        self.probe = _accel.Probe(
            [(t.smallest, t.largest, rd[t.number]) for t in self.levels[0]],
            [[(t.smallest, t.largest, rd[t.number]) for t in lv] for lv in self.levels[1:]],
        )
        self.c.manifest_reloads += 1

    def catch_up_handle_locked(self) -> None:
        """Apply WAL records written since we last looked, following seals to newer generations.

        Terminates: the chain only moves forward (a SEAL must name a later generation, wal.py),
        and a restart after a reload is taken only when the manifest has moved past the
        generation whose successor was missing; otherwise that file is missing for good and
        the store is corrupt. (It was: reload and restart unconditionally -- a WAL sealed to a
        file that does not exist spun the CPU forever inside ``attach()``.)"""
        i = 0
        restarts = 0
        while i < len(self.gens):
            g = self.gens[i]
            if g.sealed_to is None and g.wal.size() > g.offset:
                self.replay_handle_locked(g)
            if g.sealed_to is not None and i == len(self.gens) - 1:
                try:
                    w = WalFile.open(self.path, g.sealed_to, self.page)
                except FileNotFoundError:
                    # Flushed and deleted already, if the manifest has moved past it: reload,
                    # restart. If it has not, nobody will ever create that file.
                    missing = os.path.join(self.path, fmt.wal_name(g.sealed_to))
                    self.refresh_handle_locked(force=True)
                    restarts += 1
                    if self.manifest.wal_gen <= g.gen or restarts > RETRIES:
                        raise Corruption(
                            f"{missing}: missing, but {g.wal.path} is sealed to it "
                            f"(whatever was written to it is gone; `shmkv repair {self.path}` "
                            "rebuilds the store from the files that remain)"
                        ) from None
                    i = 0
                    continue
                self.gens.append(_Gen(w, Memtable(w.gen)))
            i += 1

    def replay_handle_locked(self, g: _Gen) -> None:
        """Apply the WAL's new whole records without taking the WAL lock (only the handle lock), so a reader catching
        up (the maintenance helper replays megabytes) never holds up writers.

        Safe because the WAL is append-only and every record is checksummed: a record that
        reads whole and valid is final. What a lock-free read cannot judge is its *end*: a
        record still being written looks exactly like a torn one. So any anomaly -- a torn
        tail or a bad record -- is looked at again under the lock, where it is definitive
        (:meth:`replay_wal_locked`)."""
        rep = g.wal.read_from(g.offset)
        self._apply(g, rep.records)
        g.offset = rep.end
        if rep.torn or rep.corrupt is not None:
            with g.wal.locked():
                self.replay_wal_locked(g)

    def replay_wal_locked(self, g: _Gen) -> None:
        """REQUIRES: g.wal.locked(). Apply records from g.offset to EOF; cut a torn tail;
        deal with a corrupted record as ``wal_recovery`` says (:meth:`recover_wal_locked`)."""
        rep = g.wal.read_from(g.offset)
        self._apply(g, rep.records)
        g.offset = rep.end
        if rep.torn:
            g.wal.truncate_wal_locked(rep.end)
            self.c.wal_torn_tails_dropped += 1
            self.c.wal_torn_bytes_dropped += rep.size - rep.end
            log.warning(
                "%s: cut a torn tail of %d bytes at offset %d (a writer died inside its "
                "write; that record was never acknowledged)",
                g.wal.path, rep.size - rep.end, rep.end,
            )
        elif rep.corrupt is not None:
            self.recover_wal_locked(g, rep)

    def recover_wal_locked(self, g: _Gen, rep: walmod.Replay) -> None:
        """REQUIRES: g.wal.locked(), and ``rep`` (read from g.offset) ended at a corrupted record.

        ``"strict"`` raises. Otherwise the bytes from the bad record to EOF are first copied
        into ``lost/`` (durably), then the log is cut at the bad record and what the mode keeps
        is appended again in its order: nothing (``"truncate"``) or every intact record after
        it (``"skip"``); plus a SEAL to the next generation when that one already holds
        records (the seal was among the damage, and the chain must go on). Rejected: leaving
        the bad bytes in place and skipping them on every read -- each process and each
        reopen would judge them again, and a "strict" process could not open the store. The
        rewrite happens under the WAL lock, so every process sees one clean log. A process
        killed inside it leaves the log cut at the bad record (or a torn tail after it, cut
        next time): the records it had not re-appended yet are then only in the ``lost/``
        copy, which ``verify()`` reports -- reported, not silently lost.

        Limitation: meant for opening a damaged store. A process that read the record while
        it was still intact (the damage came later, under a running store) keeps its copy
        in memory and an offset past the rewritten end; its next replay then meets a record
        boundary that is not one, which its own ``wal_recovery`` treats as corruption again
        -- loud (Corruption, or more bytes in ``lost/``), never silent. Rejected for now: a
        rewrite counter in the SHARED page that makes every process rebuild its view, which
        needs a check inside the locked append path."""
        w = g.wal
        where = f"{w.path}: {rep.corrupt}; {rep.size - rep.end} bytes from there to the end"
        if self.wal_recovery == "strict":
            raise Corruption(
                f"{where}. Nothing was dropped. Open with wal_recovery='skip' (drop only the bad "
                "records) or 'truncate' (drop the log from there), or run `shmkv repair`"
            )
        tail = w.read_bytes(rep.end, rep.size)
        if rep.sealed_to is not None:  # data after a SEAL: nothing there may be kept
            sv = walmod.Salvage(dropped=[(rep.end, len(tail))], sealed_to=rep.sealed_to)
        elif self.wal_recovery == "skip":
            sv = walmod.salvage(tail, rep.end, w.gen)
        else:
            sv = walmod.Salvage(dropped=[(rep.end, len(tail))])
            # A seal among the dropped bytes is still needed if the chain goes on past it.
            found = walmod.salvage(tail, rep.end, w.gen)
            if found.sealed_to is not None:
                sv.records = [found.records[-1]]
                sv.sealed_to = found.sealed_to
        if sv.sealed_to is None and rep.sealed_to is None and self._next_gen_used(w.gen):
            sv.records.append(walmod.encode_record(fmt.REC_SEAL, fmt.U64.pack(w.gen + 1)))
        kept = lostmod.keep_bytes(self.path, f"{fmt.wal_name(w.gen)}.at-{rep.end}.bad", tail)
        w.truncate_wal_locked(rep.end)
        self.page.forget_durable()  # group commit's positions past the cut mean nothing now
        if sv.records:
            w.append_wal_locked(b"".join(sv.records), rep.end)
        else:
            self.page.bump()  # the file changed: nobody may trust a view from before the cut
        w.sync()
        self.c.wal_corrupt_records_dropped += len(sv.dropped)
        self.c.wal_dropped_bytes += sv.dropped_bytes
        log.error(
            "%s (wal_recovery=%r): dropped %d bytes in %d stretch(es) at offsets %s, kept %d "
            "intact record(s) after them; the original bytes are in %s",
            where, self.wal_recovery, sv.dropped_bytes, len(sv.dropped),
            [off for off, _ in sv.dropped], len(sv.records), kept,
        )
        again = w.read_from(g.offset)
        if again.torn or again.corrupt is not None:  # pragma: no cover - we hold the lock
            raise Corruption(f"{w.path}: still damaged after recovery: {again.corrupt or 'torn'}")
        self._apply(g, again.records)
        g.offset = again.end

    def _next_gen_used(self, gen: int) -> bool:
        """Whether ``wal-<gen+1>.log`` holds records: only writers that followed a SEAL of
        ``gen`` append there, so then ``gen`` was sealed."""
        try:
            return os.path.getsize(os.path.join(self.path, fmt.wal_name(gen + 1))) > fmt.WAL_HEADER.size
        except OSError:
            return False

    def _apply(self, g: _Gen, records: list[tuple[int, bytes]]) -> None:
        for rtype, payload in records:
            self.c.wal_replayed_records += 1
            if rtype == fmt.REC_SEAL:
                (g.sealed_to,) = fmt.U64.unpack(payload)
                continue
            try:
                g.mem.apply_all(walmod.decode_batch(payload))
            except ValueError as e:  # checksum passed but structure is wrong: a writer bug
                raise Corruption(f"{g.wal.path}: malformed batch record: {e}") from e

    def lookup_handle_locked(self, key: bytes) -> tuple[int, bytes, int] | None:
        """Newest entry for key (tombstones included) across memtables and tables: one C call
        (range, bloom, index and block checks in ``_accel.Probe.lookup``)."""
        return self.probe.lookup(key, self.gens, _decompress)

    def log_and_apply_handle_locked(self, edit: mf.Edit) -> None:
        """Apply ``edit`` to the manifest in force, write the result durably, bump the change
        counter (others reload), make it our view. On failure the old manifest stays.
        REQUIRES: the maintenance lock as well -- only its holder publishes."""
        assert self.manifest.generation == edit.base, "Invariant: only the maintainer publishes"
        new = edit.apply(self.manifest)
        mf.write(self.path, new)
        self.page.bump()  # after the rename: others reload
        for _ in range(RETRIES):
            ident = mf.identity(self.path)
            try:
                self.install_handle_locked(new, ident)
                return
            except FileNotFoundError:  # pragma: no cover - we hold the lock; nobody deletes
                continue

    def release(self) -> None:
        """Close every WAL and table this view holds (close or a failed open)."""
        for g in self.gens:
            g.wal.close()
        self.gens = []
        for r in self.readers.values():
            r.unref()
        self.readers = {}
