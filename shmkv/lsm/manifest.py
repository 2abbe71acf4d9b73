"""Manifest: the one file that says which SSTables and WAL generations make up the store.

Contracts:

- The manifest is never edited in place. A new one is written to ``MANIFEST.<pid>.tmp``,
  fsynced, renamed over ``MANIFEST``, and the directory fsynced (:func:`write`, through
  atomicfile.py). A reader opening ``MANIFEST`` therefore sees the old or the new file whole;
  a crash at any point leaves one of the two in force, plus at most a ``.tmp`` leftover that
  maintenance removes.
- Only a process holding the maintenance lock (the ``LOCK`` file) writes a manifest, and it
  re-reads the current one under that lock first, so there are no lost updates.
- ``generation`` increases by one with every write. Other processes notice a new manifest by
  ``stat`` (:func:`identity`: inode, ctime, size) before each operation -- a syscall, no read.
  Should an identity ever repeat (inode reuse within one ctime tick), correctness does not
  depend on it: a flush also seals the WAL, which every process sees while catching up, and a
  missed compaction only means the process keeps reading the (unlinked, still open) old files.
- Files named by the manifest exist; files not named by it are garbage once no maintenance is
  running (leftovers of a crash) -- except WALs from ``wal_gen`` on, which are live.
"""

from __future__ import annotations

import os
import stat
import zlib
from dataclasses import dataclass, field

import msgpack

from shmkv.errors import Corruption

from . import atomicfile
from . import format as fmt
from .errors import io_error
from .fileio import pread_all
from .sstable import TableMeta


@dataclass
class Manifest:
    generation: int = 0
    wal_gen: int = 1  # oldest WAL generation whose records are not yet in an SSTable
    next_file: int = 1  # next SSTable number to hand out
    tables: list[TableMeta] = field(default_factory=list)
    # Cumulative, store-wide: flushes, compactions, user_bytes, wal_bytes, flush_bytes,
    # compact_read_bytes, compact_write_bytes.
    counters: dict[str, int] = field(default_factory=dict)

    def levels(self, max_levels: int) -> list[list[TableMeta]]:
        """Tables per level; L0 newest first (by number), L1+ in key order."""
        out: list[list[TableMeta]] = [[] for _ in range(max_levels)]
        for t in self.tables:
            out[t.level].append(t)
        out[0].sort(key=lambda t: -t.number)
        for lv in out[1:]:
            lv.sort(key=lambda t: t.smallest)
        return out

    def encode(self) -> bytes:
        body: bytes = msgpack.packb(
            {
                "generation": self.generation,
                "wal_gen": self.wal_gen,
                "next_file": self.next_file,
                "tables": [t.to_list() for t in self.tables],
                "counters": self.counters,
            },
            use_bin_type=True,
        )
        head = fmt.MANIFEST_HEADER.pack(
            fmt.MANIFEST_MAGIC, fmt.FORMAT_VERSION, len(body), zlib.crc32(body)
        )
        return head + body

    @classmethod
    def decode(cls, data: bytes, path: str) -> Manifest:
        hs = fmt.MANIFEST_HEADER.size
        if len(data) < hs:
            raise Corruption(f"{path}: manifest is truncated ({len(data)} bytes)")
        magic, version, length, crc = fmt.MANIFEST_HEADER.unpack_from(data, 0)
        if magic != fmt.MANIFEST_MAGIC:
            raise Corruption(f"{path}: not a shmkv manifest (bad magic)")
        if version != fmt.FORMAT_VERSION:
            raise Corruption(
                f"{path}: manifest format version {version}, expected {fmt.FORMAT_VERSION}"
            )
        body = data[hs:]
        if len(body) != length or zlib.crc32(body) != crc:
            raise Corruption(f"{path}: manifest checksum mismatch")
        try:
            d = msgpack.unpackb(body, raw=False)
            return cls(
                generation=int(d["generation"]),
                wal_gen=int(d["wal_gen"]),
                next_file=int(d["next_file"]),
                tables=[TableMeta.from_list(r) for r in d["tables"]],
                counters={str(k): int(v) for k, v in d.get("counters", {}).items()},
            )
        except Exception as e:
            raise Corruption(f"{path}: manifest body malformed: {e}") from e


@dataclass
class Edit:
    """One change to the manifest, as maintenance makes it (LevelDB's ``VersionEdit``): tables
    added and removed, the new ``wal_gen`` and ``next_file``, and what to add to the store-wide
    counters. :meth:`apply` is the one place a new manifest is made from the one in force; the
    caller publishes it (``VersionSet.log_and_apply_handle_locked``).

    Invariant: ``base`` is the generation of the manifest the edit was made against; it is
    applied only to that one (the maintenance lock holder is the only publisher, so nothing
    else can have moved it)."""

    base: int
    next_file: int
    wal_gen: int | None = None  # None: unchanged
    added: list[TableMeta] = field(default_factory=list)
    removed: set[int] = field(default_factory=set)  # table numbers
    counters: dict[str, int] = field(default_factory=dict)  # increments

    def apply(self, m: Manifest) -> Manifest:
        assert m.generation == self.base, "Invariant: an edit applies to the manifest it was made against"
        c = dict(m.counters)
        for k, n in self.counters.items():
            c[k] = c.get(k, 0) + n
        return Manifest(
            generation=m.generation + 1,
            wal_gen=m.wal_gen if self.wal_gen is None else self.wal_gen,
            next_file=self.next_file,
            tables=[t for t in m.tables if t.number not in self.removed] + self.added,
            counters=c,
        )


Identity = tuple[int, int, int]


def identity(dirpath: str) -> Identity | None:
    """A cheap fingerprint of the current manifest file (None if there is none)."""
    try:
        st = os.stat(os.path.join(dirpath, fmt.MANIFEST))
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_ctime_ns, st.st_size)


def read(dirpath: str) -> tuple[Manifest, Identity] | None:
    """The current manifest and the identity of the file it came from; None if there is none."""
    path = os.path.join(dirpath, fmt.MANIFEST)
    try:  # O_NONBLOCK: a FIFO (or device) put in its place must not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise io_error(e, path, "open manifest") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Corruption(f"{path}: not a regular file")
        # Read the size fstat gave, no more: a manifest is never appended to (it is replaced
        # by rename), so a read loop "until EOF" only had a bound as long as nobody grew it.
        data = pread_all(fd, st.st_size, 0)
    except OSError as e:
        raise io_error(e, path, "read manifest") from e
    finally:
        os.close(fd)
    return Manifest.decode(data, path), (st.st_ino, st.st_ctime_ns, st.st_size)


def write(dirpath: str, m: Manifest) -> None:
    """Atomically replace MANIFEST with ``m``. REQUIRES: the maintenance lock.

    Raises DiskFull / FileAccessError; on failure the previous manifest stays in force.
    """
    path = os.path.join(dirpath, fmt.MANIFEST)
    try:
        atomicfile.replace(path, m.encode())
    except OSError as e:
        raise io_error(e, path, "write manifest") from e
