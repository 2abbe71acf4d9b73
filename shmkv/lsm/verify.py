"""Offline-style consistency check of a store directory: ``LSM.verify()`` and tests.

Reads everything, changes nothing, reports each problem as one string naming the file:
manifest readable; every named table present, of the recorded size, every block's checksum,
key order, entry count, bloom filter, recorded key range; levels >= 1 non-overlapping; the live
WAL chain parses to its end (a torn tail is reported: the next writer cuts it off); and every
file in ``lost/`` (bytes WAL recovery dropped, tables repair set aside: reported until an
operator removes them, so a drop is never only a counter).

Safe while other processes use the store: WALs are parsed holding the store's WAL lock (the robust
mutex of the ``SHARED`` page, :meth:`WalFile.locked`: so an append in flight is never mistaken for a torn tail), and a table unlinked by a concurrent compaction is
reported only if it is still named by the manifest after a re-read.
"""

from __future__ import annotations

import os

from shmkv.errors import Error

from . import _accel
from . import format as fmt
from . import lost as lostmod
from . import manifest as mf
from .sstable import TableReader
from .wal import WalFile


def verify_store(
    path: str,
    max_levels: int = 7,
    page: _accel.SharedPage | None = None,
    *,
    include_lost: bool = True,
) -> list[str]:
    """Problems found in the store at ``path`` ([] when clean). ``page``: the store's shared page
    if the caller has it open (its WAL lock is taken to read each live WAL). ``include_lost``:
    also one line per file in ``lost/`` (repair leaves them out: they are not the store's)."""
    if page is None:
        page = _accel.SharedPage(os.path.join(path, fmt.SHARED))
        try:
            return verify_store(path, max_levels, page, include_lost=include_lost)
        finally:
            page.close()
    extra = lost_problems if include_lost else lambda _: []
    for _ in range(20):
        try:
            got = mf.read(path)
        except Error as e:
            return [str(e)]
        if got is None:
            return [f"{path}: MANIFEST is missing (`shmkv repair` rebuilds it)"]
        m, ident = got
        problems = _verify_tables(path, m, max_levels) + _verify_wals(path, m, page)
        if not problems or mf.identity(path) == ident:
            return problems + extra(path)
        # The manifest changed under us (flush/compaction elsewhere): check the new one.
    return problems + extra(path)


def lost_problems(path: str) -> list[str]:
    """One line per file in ``lost/`` (see lost.py)."""
    try:
        found = lostmod.listing(path)
    except Error as e:
        return [str(e)]
    return [
        f"{p}: {size} bytes taken out of the store by WAL recovery or repair and kept here "
        "(inspect, then remove the file)"
        for p, size in found
    ]


def _verify_tables(path: str, m: mf.Manifest, max_levels: int) -> list[str]:
    problems: list[str] = []
    seen: set[int] = set()
    for t in m.tables:
        name = os.path.join(path, fmt.sst_name(t.number))
        if t.number in seen:
            problems.append(f"{name}: named twice by the manifest")
        seen.add(t.number)
        if not 0 <= t.level < max_levels:
            problems.append(f"{name}: level {t.level} out of range")
        if t.number >= m.next_file:
            problems.append(f"{name}: number >= manifest next_file {m.next_file}")
        try:
            r = TableReader(name, t.number)
        except FileNotFoundError:
            problems.append(f"{name}: named by the manifest but missing")
            continue
        except Error as e:
            problems.append(str(e))
            continue
        try:
            if r.file_size != t.size:
                problems.append(f"{name}: size {r.file_size}, manifest says {t.size}")
            if r.entry_count != t.entries:
                problems.append(f"{name}: {r.entry_count} entries, manifest says {t.entries}")
            found = r.verify()
            problems += found
            if not found and r.last_keys:
                first = next(r.iter_from())[0]
                if first != t.smallest or r.last_keys[-1] != t.largest:
                    problems.append(f"{name}: key range differs from the manifest's")
        finally:
            r.unref()
    for lv in range(1, max_levels):
        tables = sorted((t for t in m.tables if t.level == lv), key=lambda t: t.smallest)
        for a, b in zip(tables, tables[1:], strict=False):
            if a.largest >= b.smallest:
                problems.append(f"{path}: L{lv} tables {a.number} and {b.number} overlap")
    return problems


def _verify_wals(path: str, m: mf.Manifest, page: _accel.SharedPage) -> list[str]:
    problems: list[str] = []
    gen: int | None = m.wal_gen
    # Terminates: a SEAL must name a later generation (wal.parse reports one that does not as
    # corruption, and sealed_to is then None), and each step needs an existing file.
    while gen is not None:
        try:
            w = WalFile.open(path, gen, page)
        except FileNotFoundError:
            problems.append(f"{os.path.join(path, fmt.wal_name(gen))}: live WAL is missing")
            break
        except Error as e:
            problems.append(str(e))
            break
        try:
            with w.locked():
                rep = w.read_from(0)
        finally:
            w.close()
        if rep.corrupt:
            problems.append(f"{w.path}: {rep.corrupt}")
        elif rep.torn:
            problems.append(f"{w.path}: torn tail at offset {rep.end} (dropped by the next writer)")
        gen = rep.sealed_to
    return problems
