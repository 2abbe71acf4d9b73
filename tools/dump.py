"""Print what a shmkv store holds on disk and in memory, file by file (LevelDB's ``leveldbutil dump``).

    python tools/dump.py wal DIR/wal-0000000000000002.log    # records, entries, how the log ends
    python tools/dump.py sst DIR/0000000000000005.sst        # footer, blocks, keys, bloom stats
    python tools/dump.py manifest DIR                        # generation, WAL gen, tables per level
    python tools/dump.py dir DIR                             # all of the above for every file in DIR
    python tools/dump.py segment NAME                        # a shared-memory segment's slab classes

Every file is decoded by the engine's own readers (``shmkv.lsm.format``, ``wal.parse``,
``sstable.TableReader``, ``manifest.Manifest.decode``): what this prints is what the store would
read. Nothing is written: files are opened read-only, and a segment is attached with
``create=False`` and only its ``stats()`` are read. Keys are printed as Python bytes literals;
values by length (``--values`` adds their first bytes). A damaged file is reported (the exit status
is 1 when anything was damaged), never repaired -- that is ``shmkv repair``.

(The file is not called inspect.py: run as a script, tools/ is first on sys.path, and a
tools/inspect.py would shadow the standard library's ``inspect`` for every script there.)
"""

from __future__ import annotations

import bisect
import os
import sys
from collections.abc import Iterator
from typing import Any

import click

from shmkv.errors import Corruption, Error
from shmkv.lsm import format as fmt
from shmkv.lsm import manifest as manifest_mod
from shmkv.lsm import wal as wal_mod
from shmkv.lsm.sstable import TableReader

PREVIEW = 16  # bytes of a value shown with --values

_KIND = {fmt.KIND_PUT: "put", fmt.KIND_DELETE: "delete"}


def _entry_line(kind: int, key: bytes, value: bytes, expire_ms: int, values: bool) -> str:
    name = _KIND.get(kind, f"kind {kind}?")
    if kind == fmt.KIND_DELETE:
        return f"{name} {key!r}"
    line = f"{name} {key!r} value {len(value)} B"
    if values:
        line += f" {value[:PREVIEW]!r}{'...' if len(value) > PREVIEW else ''}"
    if expire_ms:
        line += f" expire_at_ms {expire_ms}"
    return line


# ---------------------------------------------------------------------------- WAL


def dump_wal(path: str, *, keys: bool = True, values: bool = False) -> Iterator[str]:
    """Lines describing a WAL file; the last one says whether it ends clean, torn or corrupt."""
    with open(path, "rb") as f:
        data = f.read()
    hs = fmt.WAL_HEADER.size
    if len(data) < hs:
        raise Corruption(f"{path}: too short for a WAL header ({len(data)} bytes)")
    magic, version, _reserved, gen = fmt.WAL_HEADER.unpack_from(data, 0)
    if magic != fmt.WAL_MAGIC:
        raise Corruption(f"{path}: not a shmkv WAL (bad magic {magic!r})")
    yield f"wal {path}: generation {gen}, format {version}, {len(data)} bytes"
    rep = wal_mod.parse(data[hs:], hs, gen)
    puts = deletes = 0
    pos = hs
    for rtype, payload in rep.records:
        size = fmt.REC_HEAD.size + len(payload)
        if rtype == fmt.REC_SEAL:
            (nxt,) = fmt.U64.unpack_from(payload, 0)
            yield f"  record @{pos} seal -> generation {nxt}"
        else:
            entries = wal_mod.decode_batch(payload)
            yield f"  record @{pos} batch of {len(entries)} entries ({size} bytes)"
            for kind, key, value, exp in entries:
                puts += kind == fmt.KIND_PUT
                deletes += kind == fmt.KIND_DELETE
                if keys:
                    yield "    " + _entry_line(kind, key, value, exp, values)
        pos += size
    if rep.corrupt:
        end = f"corrupt at offset {rep.end}: {rep.corrupt}"
    elif rep.torn:
        end = f"torn tail: {rep.size - rep.end} bytes after offset {rep.end}"
    elif rep.sealed_to is not None:
        end = f"sealed (next generation {rep.sealed_to})"
    else:
        end = "clean (open for appends)"
    yield f"  records {len(rep.records)}, entries {puts + deletes} (puts {puts}, deletes {deletes})"
    yield f"  end: {end}"
    if rep.corrupt:
        raise Corruption(f"{path}: {rep.corrupt}")


# ---------------------------------------------------------------------------- SSTable


def dump_sst(path: str, *, keys: bool = True, values: bool = False) -> Iterator[str]:
    """Lines describing a table: footer, each block (offset, size, entries, last key), bloom
    filter (bits, k, bits per key, fill, expected false-positive rate), keys, verify()."""
    number = fmt.parse_sst_name(os.path.basename(path)) or 0
    t = TableReader(path, number)
    try:
        with open(path, "rb") as f:
            f.seek(t.file_size - fmt.FOOTER.size)
            f_off, f_len, i_off, i_len, count, version, _origin, _magic = fmt.FOOTER.unpack(
                f.read(fmt.FOOTER.size)
            )
        yield f"sst {path}: table {number}, format {version}, {t.file_size} bytes, {count} entries"
        yield (
            f"  footer: filter @{f_off} ({f_len} B), index @{i_off} ({i_len} B), "
            f"written at level {t.origin_level}, WAL stamp {t.origin_wal_stamp}"
        )
        per_block = [0] * len(t.handles)
        rows: list[str] = []
        puts = deletes = 0
        for key, kind, value, exp in t.iter_from():
            per_block[bisect.bisect_left(t.last_keys, key)] += 1
            puts += kind == fmt.KIND_PUT
            deletes += kind == fmt.KIND_DELETE
            if keys:
                rows.append("    " + _entry_line(kind, key, value, exp, values))
        yield f"  data blocks: {len(t.handles)}"
        for i, ((off, size), last) in enumerate(zip(t.handles, t.last_keys, strict=True)):
            yield f"    block {i} @{off} ({size} B): {per_block[i]} entries, last key {last!r}"
        bloom = t.bloom
        set_bits = sum(bin(b).count("1") for b in bytes(bloom.bits))
        fill = set_bits / bloom.nbits
        yield (
            f"  bloom: {bloom.nbits} bits, k={bloom.k}, {bloom.nbits / max(count, 1):.1f} bits/key, "
            f"{fill:.1%} set, expected false positives {fill**bloom.k:.2%}"
        )
        yield f"  entries: {puts + deletes} (puts {puts}, deletes {deletes})"
        yield from rows
        problems = t.verify()
        yield "  verify: ok" if not problems else f"  verify: {len(problems)} problems"
        for p in problems:
            yield f"    {p}"
        if problems:
            raise Corruption(problems[0])
    finally:
        t.unref()


# ---------------------------------------------------------------------------- manifest


def dump_manifest(path: str) -> Iterator[str]:
    """Lines describing a MANIFEST (given as the file or its directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, fmt.MANIFEST)
    with open(path, "rb") as f:
        m = manifest_mod.Manifest.decode(f.read(), path)
    yield (
        f"manifest {path}: generation {m.generation} (+1 per edit), "
        f"oldest live WAL generation {m.wal_gen}, next file number {m.next_file}"
    )
    yield f"  tables: {len(m.tables)}, entries {sum(t.entries for t in m.tables)}"
    levels = max((t.level for t in m.tables), default=-1) + 1
    for lv, tables in enumerate(m.levels(levels)):
        yield f"  level {lv}: {len(tables)} tables, {sum(t.size for t in tables)} bytes"
        for t in tables:
            yield (
                f"    {fmt.sst_name(t.number)}: {t.size} B, {t.entries} entries, "
                f"{t.smallest!r} .. {t.largest!r}"
            )
    if m.counters:
        yield "  counters: " + ", ".join(f"{k} {v}" for k, v in sorted(m.counters.items()))


# ---------------------------------------------------------------------------- a directory


def dump_dir(path: str, *, keys: bool = True, values: bool = False) -> Iterator[str]:
    """The manifest, then every WAL and table of the directory (live or not), oldest first."""
    names = sorted(os.listdir(path))
    live: set[str] = set()
    if fmt.MANIFEST in names:
        with open(os.path.join(path, fmt.MANIFEST), "rb") as f:
            m = manifest_mod.Manifest.decode(f.read(), path)
        live = {fmt.sst_name(t.number) for t in m.tables}
        yield from dump_manifest(path)
    else:
        yield f"{path}: no MANIFEST (nothing flushed yet, or not a store directory)"
    for name in names:
        full = os.path.join(path, name)
        if fmt.parse_wal_name(name) is not None:
            yield ""
            yield from dump_wal(full, keys=keys, values=values)
        elif fmt.parse_sst_name(name) is not None:
            yield ""
            if name not in live:
                yield f"({name} is not named by the manifest: a leftover maintenance removes)"
            yield from dump_sst(full, keys=keys, values=values)


# ---------------------------------------------------------------------------- segment


def dump_segment(name: str) -> Iterator[str]:
    """Lines describing a shared-memory segment: geometry, counters and its slab classes,
    from ``Store.stats()`` of a ``create=False`` attach (read-only: nothing is written)."""
    import shmkv

    kv = shmkv.attach(name, create=False)
    try:
        s: dict[str, Any] = kv.stats()
    finally:
        kv.close()
    yield (
        f"segment {s['name']}: {s['segment_bytes']} bytes, layout {s['layout_version']}, "
        f"codec {s['codec']}, {s['items']} items, pages {s['pages_used']}/{s['pages_total']} "
        f"of {s['page_size']} B, {s['buckets']} buckets, {s['lock_stripes']} lock stripes"
    )
    if s.get("path"):
        yield f"  disk tier: {s['path']} (durability {s['durability']})"
    yield (
        f"  counters: gets {s['gets']}, hits {s['hits']}, puts {s['puts']}, deletes "
        f"{s['deletes']}, evictions {s['evictions']}, expired {s['expired']}"
    )
    classes = s["classes"]
    yield f"  slab classes: {len(classes)}"
    yield "    chunk B  pages   used   free  evictions"  # classes in use, smallest chunk first
    for c in classes:
        yield (
            f"    {c['chunk_size']:>7} {c['pages']:>6} {c['used']:>6} {c['free']:>6} "
            f"{c['evictions']:>10}"
        )


# ---------------------------------------------------------------------------- CLI


def _emit(lines: Iterator[str]) -> None:
    """Print the lines; a damaged file or missing store ends with a message and status 1."""
    try:
        for line in lines:
            click.echo(line)
    except (Error, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


_keys = click.option(
    "--keys/--no-keys", default=True, help="list every entry (default) or only counts"
)
_values = click.option(
    "--values", is_flag=True, help=f"show the first {PREVIEW} bytes of each value"
)


@click.group()
def main() -> None:
    """Print a shmkv WAL, table, manifest, store directory or segment."""


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@_keys
@_values
def wal(path: str, keys: bool, values: bool) -> None:
    """A WAL file: its records and their entries, and how the log ends."""
    _emit(dump_wal(path, keys=keys, values=values))


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@_keys
@_values
def sst(path: str, keys: bool, values: bool) -> None:
    """An SSTable: footer, blocks, bloom filter, keys, and its own verify()."""
    _emit(dump_sst(path, keys=keys, values=values))


@main.command()
@click.argument("path", type=click.Path(exists=True))
def manifest(path: str) -> None:
    """A MANIFEST (the file, or the store directory holding it)."""
    _emit(dump_manifest(path))


@main.command("dir")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@_keys
@_values
def dir_(path: str, keys: bool, values: bool) -> None:
    """A store directory: its manifest, then every WAL and table in it."""
    _emit(dump_dir(path, keys=keys, values=values))


@main.command()
@click.argument("name")
def segment(name: str) -> None:
    """A shared-memory segment (the store NAME): geometry, counters, slab classes."""
    _emit(dump_segment(name))


if __name__ == "__main__":
    main()
