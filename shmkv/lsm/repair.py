"""``shmkv repair PATH``: rebuild a store's MANIFEST from the tables and logs in its directory.

LevelDB's RepairDB (db/repair.cc) is the model: find the files, convert the logs to a table,
scan every table, write a new descriptor; a damaged file goes to ``lost/``, never deleted. What
differs, and why:

- **Order without sequence numbers.** LevelDB orders entries by sequence number; ours carry
  none: recency is the table's place (L0 newest first by number, then L1, L2...). So every
  table records in its footer the level it was written at and its *WAL stamp*, the manifest
  ``wal_gen`` it was written for (format.py, "origin"). Repair puts each table back at its
  level. Two tables that overlap at one level >= 1 can only be a compaction's output and its
  input left behind by a crash (the output has the higher number and is newer): repair merges
  them, newest first, into new tables of that level, so a compaction cut short keeps every key
  of its inputs. A table without a recorded level (written before the field existed) goes to
  L0, ordered by number, and the report says so.
- **Which logs are already in tables.** Every entry of a table comes from a WAL generation
  older than its stamp, so with W the highest stamp of any sound table, logs older than W were
  flushed (their leftovers are set aside in ``lost/``) and logs from W on are newer than every
  table: they are replayed in generation order, keeping every intact record ("skip" recovery),
  into one new L0 table, and a fresh WAL starts after them.
- **A store in use is refused** (the open lock, db.py ``hold_open_lock``): repairing under a
  live writer would race its appends.
- **Idempotent.** A store whose manifest reads and verifies clean is left exactly as it is
  (files in ``lost/`` are not problems of the store); after one repair the store is such a
  store, so a second run changes nothing.

Crash safety: the new table is fsynced before anything is moved, damaged logs are moved into
``lost/`` before the manifest that stops naming them is written, and sound logs that were
converted are removed only after it is durable. A repair killed at any step leaves a directory
the next repair finishes (its new table carries a stamp past the logs it holds).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from shmkv.errors import Error, InvalidArgument

from . import _accel, compaction
from . import format as fmt
from . import lost as lostmod
from . import manifest as mf
from . import wal as walmod
from .compaction import LevelOptions
from .db import hold_open_lock
from .errors import StoreInUse, io_error
from .fileio import unlink_quiet
from .memtable import Memtable
from .sstable import TableMeta, TableReader, TableWriter
from .verify import verify_store

log = logging.getLogger("shmkv.lsm")


@dataclass
class RepairReport:
    """What :func:`repair` found, kept and set aside. ``str(report)`` is the CLI's text."""

    path: str
    changed: bool = False
    manifest_rebuilt: bool = False
    tables_kept: list[str] = field(default_factory=list)
    tables_written: list[str] = field(default_factory=list)
    set_aside: list[tuple[str, str]] = field(default_factory=list)  # (path in lost/, why)
    removed: list[tuple[str, str]] = field(default_factory=list)  # (name, why it was safe)
    logs_replayed: list[tuple[str, int, int]] = field(default_factory=list)  # name, records, dropped
    entries_recovered: int = 0  # entries read back from logs into the new table
    bytes_dropped: int = 0  # WAL bytes that were not intact records
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if not self.changed:
            return [f"{self.path}: consistent; nothing changed", *self.notes]
        if not self.manifest_rebuilt:
            return [f"{self.path}: repaired",
                    *(f"set aside {p}: {why}" for p, why in self.set_aside), *self.notes]
        out = [f"{self.path}: " + ("MANIFEST rebuilt" if self.manifest_rebuilt else "repaired")]
        out += [f"kept table {n}" for n in self.tables_kept]
        out += [f"wrote table {n}" for n in self.tables_written]
        for name, records, dropped in self.logs_replayed:
            out.append(f"replayed log {name}: {records} records, {dropped} bytes dropped")
        out += [f"set aside {p}: {why}" for p, why in self.set_aside]
        out += [f"removed {n}: {why}" for n, why in self.removed]
        out.append(
            f"{self.entries_recovered} entries recovered from logs, "
            f"{self.bytes_dropped} damaged log bytes dropped (kept in lost/)"
        )
        return out + self.notes

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class _Found:
    meta: TableMeta
    level: int | None  # as recorded in the footer (None: unknown)
    stamp: int  # 0: unknown
    path: str


def repair(path: str | os.PathLike[str], *, compression: str = "lz4",
           levels: LevelOptions | None = None) -> RepairReport:
    """Rebuild the manifest of the store at ``path`` from its files; see the module doc.

    :raises StoreInUse: another process (or handle) has the store open.
    :raises InvalidArgument: ``path`` is not a directory.
    :raises DiskFull, FileAccessError: a file cannot be written or moved (the store is then as
        a repair killed at that step would leave it: run repair again).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise InvalidArgument(f"{path}: not a directory")
    opts = levels or LevelOptions()
    lock_path = os.path.join(path, fmt.LOCKFILE)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise io_error(e, lock_path, "open lock file") from e
    try:
        hold_open_lock(fd, lock_path, exclusive=True)  # held until close(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreInUse(f"{path}: maintenance is running in another process") from None
        shared = os.path.join(path, fmt.SHARED)
        aside: list[tuple[str, str]] = []
        try:
            page = _accel.SharedPage(shared)
        except ValueError as e:  # not a shared page: nobody can map it, so set it aside
            aside.append((lostmod.move(path, shared), f"not a shared page: {e}"))
            page = _accel.SharedPage(shared)
        try:
            rep = _repair_locked(path, page, compression, opts, force=bool(aside))
            rep.set_aside[:0] = aside
            return rep
        finally:
            page.bump()  # nobody has it open, but a view from before must never be trusted
            page.close()
    finally:
        os.close(fd)  # drops the open lock and the flock


def _repair_locked(path: str, page: _accel.SharedPage, compression: str,
                   opts: LevelOptions, force: bool) -> RepairReport:
    rep = RepairReport(path)
    if mf.identity(path) is not None and not verify_store(
        path, opts.max_levels, page, include_lost=False
    ):
        rep.changed = force  # only the shared page was replaced
        if force:
            rep.notes.append("the files were consistent; only the shared page was replaced")
        return rep
    rep.changed = rep.manifest_rebuilt = True
    old: mf.Manifest | None = None
    try:
        got = mf.read(path)
        old = got[0] if got else None
    except Error as e:
        rep.notes.append(f"old MANIFEST unreadable: {e}")
    old_levels = {t.number: t.level for t in old.tables} if old else {}

    names = sorted(os.listdir(path))
    numbers = [n for name in names if (n := fmt.parse_sst_name(name)) is not None]
    lost_numbers = [
        n for p, _ in lostmod.listing(path)
        if (n := fmt.parse_sst_name(os.path.basename(p).split(".sst")[0] + ".sst")) is not None
    ]
    next_number = max([*numbers, *lost_numbers, (old.next_file - 1) if old else 0, 0]) + 1

    def new_writer() -> tuple[int, TableWriter]:
        nonlocal next_number
        n = next_number
        next_number += 1
        return n, TableWriter(os.path.join(path, fmt.sst_name(n)), compression)

    # (a) every table: scanned whole; a damaged one goes to lost/.
    found: list[_Found] = []
    for n in numbers:
        p = os.path.join(path, fmt.sst_name(n))
        f = _scan_table(p, n)
        if isinstance(f, str):
            rep.set_aside.append((lostmod.move(path, p), f"damaged table: {f}"))
            continue
        if f.level is None and n in old_levels:
            f.level = old_levels[n]
        found.append(f)
    stamp = max((f.stamp for f in found), default=0)

    # (b) levels: L0 as recorded; overlaps within a level >= 1 are merged (newest first).
    tables: list[TableMeta] = []
    retired: list[str] = []  # table files merged into new ones (moved to lost/ at the end)
    unknown = [f for f in found if f.level is None or not 0 <= f.level < opts.max_levels]
    if unknown:
        rep.notes.append(
            f"{len(unknown)} table(s) carry no level (written before tables recorded it): "
            "placed in L0 by number, which is right unless a compaction had moved older "
            "data past newer"
        )
    for f in found:
        if f in unknown or f.level == 0:
            tables.append(replace_level(f.meta, 0))
    for lv in range(1, opts.max_levels):
        at = sorted((f for f in found if f.level == lv and f not in unknown),
                    key=lambda f: f.meta.smallest)
        for group in _overlapping_groups(at):
            if len(group) == 1:
                tables.append(group[0].meta)
                continue
            newest_first = sorted(group, key=lambda f: -f.meta.number)
            readers = [TableReader(f.path, f.meta.number) for f in newest_first]
            try:
                outs = _merge_tables(readers, lv, max(f.stamp for f in group), new_writer,
                                     opts.target_file_bytes, path)
            finally:
                for r in readers:
                    r.unref()
            tables += outs
            rep.tables_written += [fmt.sst_name(t.number) for t in outs]
            retired += [f.path for f in group]
            rep.notes.append(
                f"L{lv}: tables {[f.meta.number for f in newest_first]} overlapped (a "
                f"compaction cut short by a crash); merged newest first into "
                f"{[t.number for t in outs]}"
            )

    # (c) logs: older than the tables' stamp are in tables already; the rest are replayed.
    mem = Memtable(0)
    gens = sorted(g for name in names if (g := fmt.parse_wal_name(name)) is not None)
    replayed: list[tuple[str, bool]] = []  # (path, had damage)
    for g in gens:
        p = os.path.join(path, fmt.wal_name(g))
        if g < stamp:
            rep.set_aside.append((lostmod.move(path, p),
                                  f"log {g} is older than the tables' WAL stamp {stamp}: "
                                  "its records are in tables already"))
            continue
        records, dropped, why = _replay_log(p, g, mem)
        rep.entries_recovered += records[1]
        rep.bytes_dropped += dropped
        if why is not None:
            rep.notes.append(f"{fmt.wal_name(g)}: {why}")
        rep.logs_replayed.append((fmt.wal_name(g), records[0], dropped))
        replayed.append((p, dropped > 0 or why is not None))
    new_gen = max([stamp, *(g + 1 for g in gens), 1])
    if len(mem):
        n, w = new_writer()
        try:
            w.add_from(mem.iter_entries())
            meta = w.finish(n, 0, wal_stamp=new_gen)
        except BaseException:
            w.abandon()
            raise
        tables.append(meta)
        rep.tables_written.append(fmt.sst_name(n))

    # (d) set aside what the new manifest drops, then write it; then clean up.
    for p, damaged in replayed:
        if damaged and os.path.exists(p):
            rep.set_aside.append((lostmod.move(path, p), "log with damaged records (converted)"))
    for p in retired:
        rep.set_aside.append((lostmod.move(path, p), "merged into the new tables above"))
    if old is not None and mf.identity(path) is not None:
        rep.notes.append(f"old manifest (generation {old.generation}) replaced")
    elif mf.identity(path) is not None:
        rep.set_aside.append((lostmod.move(path, os.path.join(path, fmt.MANIFEST)),
                              "unreadable manifest"))
    walmod.WalFile.create(path, new_gen, page).close()
    kept = {t.number for t in tables}
    rep.tables_kept = [fmt.sst_name(f.meta.number) for f in found if f.meta.number in kept]
    mf.write(path, mf.Manifest(
        generation=(old.generation + 1) if old else 1,
        wal_gen=new_gen,
        next_file=next_number,
        tables=tables,
        counters=dict(old.counters) if old else {},
    ))
    for p, damaged in replayed:
        if not damaged and os.path.exists(p):
            os.unlink(p)
            rep.removed.append((os.path.basename(p), "every record is in the new table"))
    for name in names:
        if name.endswith(".tmp"):
            unlink_quiet(os.path.join(path, name))
    # Warning when something was taken out of the store, else info: both name every file.
    lvl = logging.WARNING if rep.set_aside or rep.bytes_dropped else logging.INFO
    log.log(lvl, "repair of %s:\n%s", path, rep)
    return rep


def replace_level(t: TableMeta, level: int) -> TableMeta:
    return TableMeta(t.number, level, t.size, t.entries, t.smallest, t.largest)


def _scan_table(p: str, n: int) -> _Found | str:
    """The table's metadata from a full scan, or why it cannot be used."""
    try:
        r = TableReader(p, n)
    except Error as e:
        return str(e)
    except FileNotFoundError:
        return "vanished"
    try:
        problems = r.verify()
        if problems:
            return problems[0]
        if not r.last_keys:
            return "holds no entries"
        first = next(r.iter_from())[0]
        meta = TableMeta(n, r.origin_level or 0, r.file_size, r.entry_count, first,
                         r.last_keys[-1])
        return _Found(meta, r.origin_level, r.origin_wal_stamp or 0, p)
    except Error as e:
        return str(e)
    finally:
        r.unref()


def _overlapping_groups(at: list[_Found]) -> list[list[_Found]]:
    """Tables sorted by smallest key, grouped into runs whose key ranges chain-overlap."""
    groups: list[list[_Found]] = []
    hi: bytes | None = None
    for f in at:
        if groups and hi is not None and f.meta.smallest <= hi:
            groups[-1].append(f)
            hi = max(hi, f.meta.largest)
        else:
            groups.append([f])
            hi = f.meta.largest
    return groups


def _merge_tables(readers: list[TableReader], level: int, stamp: int,
                  new_writer: Callable[[], tuple[int, TableWriter]], target: int,
                  path: str) -> list[TableMeta]:
    """Merge ``readers`` (newest first; tombstones kept) into new tables at ``level``."""
    stream = compaction.merge([r.iter_from() for r in readers])
    outs: list[TableMeta] = []
    done = False
    while not done:  # terminates: add_from adds at least one entry before returning False
        number, w = new_writer()
        try:
            done = w.add_from(stream, target)
            if len(w):
                outs.append(w.finish(number, level, wal_stamp=stamp))
            else:
                w.abandon()
        except BaseException:
            w.abandon()
            for t in outs:
                unlink_quiet(os.path.join(path, fmt.sst_name(t.number)))
            raise
    return outs


def _replay_log(p: str, gen: int, mem: Memtable) -> tuple[tuple[int, int], int, str | None]:
    """Apply every intact record of log ``p`` to ``mem``: ((records, entries), bytes dropped,
    a note or None). A log whose header is bad is dropped whole (bytes counted)."""
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise io_error(e, p, "read WAL") from e
    hs = fmt.WAL_HEADER.size
    if len(data) < hs:
        return (0, 0), len(data), "header truncated" if data else None
    magic, version, _, hgen = fmt.WAL_HEADER.unpack_from(data, 0)
    if magic != fmt.WAL_MAGIC or version != fmt.FORMAT_VERSION or hgen != gen:
        return (0, 0), len(data), "bad header (magic, version or generation)"
    sv = walmod.salvage(data[hs:], hs, gen)
    records = entries = 0
    dropped = sv.dropped_bytes
    for raw in sv.records:
        rtype, payload = walmod.parse(raw, 0).records[0]
        records += 1
        if rtype != fmt.REC_BATCH:
            continue
        try:
            batch = walmod.decode_batch(payload)
        except ValueError:
            dropped += len(raw)
            continue
        mem.apply_all(batch)
        entries += len(batch)
    return (records, entries), dropped, None


__all__ = ["RepairReport", "repair"]
