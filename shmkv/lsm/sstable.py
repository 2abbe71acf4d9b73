"""SSTables: immutable sorted files of entries (layout in format.py). Writer and reader.

Contracts:

- A table is written once, by one process holding the maintenance lock, fsynced, and only then
  named by a manifest. It is never modified; it is unlinked only after a manifest that no longer
  names it is in place. A process that has it open keeps reading it after the unlink (Linux keeps
  the inode alive while an fd is open), which is what lets readers run through a compaction.
- Every block read is checked (crc32 over contents + compression byte) before it is
  decompressed or parsed; a failure raises :class:`~shmkv.errors.Corruption` naming the file and
  the offset. Corrupt bytes are never returned as a value.
- Reads use ``os.pread`` on one fd: no shared file position, safe from several threads.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import lz4.block

from shmkv.errors import Corruption, Error

from . import _accel
from . import format as fmt
from .bloom import BloomFilter
from .errors import io_error
from .fileio import pread_all

try:  # zstandard is optional: "lz4" is the default codec
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None  # type: ignore[assignment,unused-ignore]  # (unused where zstandard is absent: Any)

Entry = tuple[bytes, int, bytes, int]  # key, kind, value, expire_at_ms

COMPRESSIONS = {"none": fmt.COMP_NONE, "lz4": fmt.COMP_LZ4, "zstd": fmt.COMP_ZSTD}


@dataclass(frozen=True)
class TableMeta:
    """What the manifest records about a table."""

    number: int
    level: int
    size: int
    entries: int
    smallest: bytes
    largest: bytes

    def to_list(self) -> list[object]:
        return [self.number, self.level, self.size, self.entries, self.smallest, self.largest]

    @classmethod
    def from_list(cls, row: list[object]) -> TableMeta:
        n, lvl, size, ent, lo, hi = row
        return cls(int(n), int(lvl), int(size), int(ent), bytes(lo), bytes(hi))  # type: ignore[call-overload]

    def overlaps(self, lo: bytes | None, hi: bytes | None) -> bool:
        """Whether [smallest, largest] meets [lo, hi] (inclusive; None = unbounded)."""
        return (hi is None or self.smallest <= hi) and (lo is None or self.largest >= lo)


def _compress(codec: int, raw: bytes) -> tuple[int, bytes]:
    if codec == fmt.COMP_LZ4:
        out = lz4.block.compress(raw, store_size=True)
    elif codec == fmt.COMP_ZSTD and zstandard is not None:
        out = zstandard.ZstdCompressor(level=3).compress(raw)
    else:
        return fmt.COMP_NONE, raw
    # Keep compression only when it pays (LevelDB's 12.5% rule): decompressing costs reads.
    if len(out) < len(raw) - (len(raw) >> 3):
        return codec, out
    return fmt.COMP_NONE, raw


def _decompress(codec: int, data: bytes) -> bytes:
    if codec == fmt.COMP_NONE:
        return data
    if codec == fmt.COMP_LZ4:
        return bytes(lz4.block.decompress(data))
    if codec == fmt.COMP_ZSTD:
        if zstandard is None:  # pragma: no cover
            raise ValueError("zstd block but the zstandard module is missing")
        return bytes(zstandard.ZstdDecompressor().decompress(data))
    raise ValueError(f"unknown compression code {codec}")


class TableWriter:
    """Writes one table. Add entries in strictly increasing key order, then :meth:`finish`.

    On any error call :meth:`abandon` (removes the partial file); a partial file is also harmless
    if left behind, since no manifest names it.
    """

    def __init__(
        self, path: str, compression: str = "lz4", block_size: int = fmt.BLOCK_SIZE
    ) -> None:
        self.path = path
        self.codec = COMPRESSIONS[compression]
        self.block_size = block_size
        try:
            self._f: BinaryIO | None = open(path, "wb", buffering=1 << 18)  # noqa: SIM115
        except OSError as e:
            raise io_error(e, path, "create table") from e
        self._offset = 0
        self._b = _accel.BlockBuilder(block_size)  # the open block, every key, the last key
        self._index: list[tuple[bytes, int, int]] = []
        self.bytes_written = 0

    def __len__(self) -> int:
        return len(self._b.keys)

    @property
    def smallest(self) -> bytes | None:
        return self._b.keys[0] if self._b.keys else None

    @property
    def approx_size(self) -> int:
        return self._offset + self._b.block_bytes

    def add(self, key: bytes, kind: int, value: bytes, expire_at_ms: int) -> None:
        """Add one entry; keys must be strictly increasing."""
        _accel.fill_table(self, self._b, ((key, kind, value, expire_at_ms),), 0)

    def add_from(self, entries: Iterable[Entry], max_bytes: int = 0) -> bool:
        """Add (key, kind, value, expire) entries in key order until they run out (True) or the
        table reaches ``max_bytes`` (False: the rest of ``entries`` is for the next table)."""
        return _accel.fill_table(self, self._b, entries, max_bytes)

    def _write_block(self, raw: bytes, codec: int) -> tuple[int, int]:
        assert self._f is not None
        codec, data = _compress(codec, raw)
        # crc32 over contents then the codec byte, chained so a 64 MiB block is not copied:
        crc = zlib.crc32(bytes((codec,)), zlib.crc32(data))
        trailer = fmt.BLOCK_TRAILER.pack(codec, crc)
        off = self._offset
        try:
            self._f.write(data)
            self._f.write(trailer)
        except OSError as e:
            raise io_error(e, self.path, "write table") from e
        size = len(data) + len(trailer)
        self._offset += size
        return off, size

    def _finish_block(self) -> None:
        taken = self._b.take()
        if taken is None:
            return
        raw, last = taken
        off, size = self._write_block(raw, self.codec)
        self._index.append((last, off, size))

    def finish(self, number: int = 0, level: int = 0, wal_stamp: int = 0) -> TableMeta:
        """Write filter, index and footer, fsync, close. Returns the table's metadata.

        ``level`` and ``wal_stamp`` (the manifest ``wal_gen`` the table is written for: it
        holds data of older WAL generations only) go into the footer's ``origin`` word
        (format.py) for ``shmkv repair``, which has no manifest to read them from."""
        assert self._f is not None
        keys = self._b.keys
        if not keys:
            raise ValueError("TableWriter.finish: an empty table is never written")
        try:
            self._finish_block()
            bloom = BloomFilter.build(keys, len(keys))
            f_off, f_len = self._write_block(bloom.encode(), fmt.COMP_NONE)
            index = b"".join(
                fmt.U32.pack(len(k)) + k + fmt.INDEX_ENTRY_TAIL.pack(o, s)
                for k, o, s in self._index
            )
            i_off, i_len = self._write_block(index, self.codec)
            self._f.write(
                fmt.FOOTER.pack(
                    f_off,
                    f_len,
                    i_off,
                    i_len,
                    len(keys),
                    fmt.FORMAT_VERSION,
                    fmt.pack_origin(level, wal_stamp),
                    fmt.SST_MAGIC,
                )
            )
            self._offset += fmt.FOOTER.size
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
        except BaseException as e:
            self.abandon()
            if isinstance(e, OSError) and not isinstance(e, Error):
                raise io_error(e, self.path, "write table") from e
            raise
        self.bytes_written = self._offset
        return TableMeta(number, level, self._offset, len(keys), keys[0], keys[-1])

    def abandon(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None
        try:
            os.unlink(self.path)
        except OSError:
            pass


# LRU of decompressed, verified data blocks keyed by (table number, offset); in C, where each
# method is atomic under the GIL, so threads share it without a lock.
BlockCache = _accel.BlockCache


class TableReader:
    """An open table. Holds one fd; reference-counted so a scan survives a manifest reload.

    Lifetime: the owner (db's current version) holds one reference; every running scan holds
    one. The fd is closed when the count drops to zero.
    """

    def __init__(self, path: str, number: int, cache: BlockCache | None = None) -> None:
        self.path = path
        self.number = number
        self.cache = cache
        self._refs = 1
        self._ref_lock = threading.Lock()
        # Observed bloom behaviour: a "positive" that then finds no key is a false positive.
        self.bloom_negatives = 0
        self.bloom_false_positives = 0
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise  # the caller re-reads the manifest: a compaction may have removed the file
        except OSError as e:
            raise io_error(e, path, "open table") from e
        try:
            self._load()
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def _corrupt(self, what: str) -> Corruption:
        return Corruption(f"{self.path}: {what}")

    def _load(self) -> None:
        try:
            self.file_size = os.fstat(self.fd).st_size
        except OSError as e:
            raise io_error(e, self.path, "stat table") from e
        if self.file_size < fmt.FOOTER.size:
            raise self._corrupt(f"too short to be a table ({self.file_size} bytes)")
        foot = self._pread(fmt.FOOTER.size, self.file_size - fmt.FOOTER.size)
        f_off, f_len, i_off, i_len, count, version, origin, magic = fmt.FOOTER.unpack(foot)
        if magic != fmt.SST_MAGIC:
            raise self._corrupt("bad magic in footer (not a table, or truncated)")
        if version != fmt.FORMAT_VERSION:
            raise self._corrupt(f"table format version {version}, expected {fmt.FORMAT_VERSION}")
        limit = self.file_size - fmt.FOOTER.size
        if f_off + f_len > limit or i_off + i_len > limit:
            raise self._corrupt("footer points past the end of the file")
        self.entry_count = count
        # Where the table was written (None: unknown, a table from before the field existed).
        self.origin_level, self.origin_wal_stamp = fmt.unpack_origin(origin)
        try:
            self.bloom = BloomFilter.decode(self._read_block(f_off, f_len))
        except ValueError as e:
            raise self._corrupt(f"filter block: {e}") from e
        index = self._read_block(i_off, i_len)
        last_keys: list[bytes] = []
        handles: list[tuple[int, int]] = []
        pos = 0
        try:
            while pos < len(index):
                (klen,) = fmt.U32.unpack_from(index, pos)
                pos += 4
                last_keys.append(index[pos : pos + klen])
                pos += klen
                handles.append(fmt.INDEX_ENTRY_TAIL.unpack_from(index, pos))
                pos += fmt.INDEX_ENTRY_TAIL.size
        except Exception as e:
            raise self._corrupt(f"index block malformed: {e}") from e
        if pos != len(index) or any(o + s > f_off for o, s in handles):
            raise self._corrupt("index block malformed")
        self.last_keys = last_keys
        self.handles = handles

    # -- reference counting --------------------------------------------------------------------

    def ref(self) -> None:
        with self._ref_lock:
            assert self._refs > 0, "Invariant: a reader is never revived after its last unref"
            self._refs += 1

    def unref(self) -> None:
        with self._ref_lock:
            self._refs -= 1
            if self._refs == 0 and self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    # -- blocks ---------------------------------------------------------------------------------

    def _pread(self, n: int, off: int) -> bytes:
        try:
            buf = pread_all(self.fd, n, off)
        except OSError as e:
            raise io_error(e, self.path, "read table") from e
        if len(buf) != n:
            raise self._corrupt(f"short read at offset {off} (file truncated?)")
        return buf

    def _read_block(self, off: int, size: int) -> bytes:
        """Read, check and decompress the block at (off, size). Raises Corruption on any mismatch."""
        try:
            return _accel.read_block(self.fd, off, size, _decompress)
        except ValueError as e:
            raise self._corrupt(str(e)) from e
        except OSError as e:
            raise io_error(e, self.path, "read table") from e

    def _data_block(self, i: int) -> bytes:
        try:
            return _accel.table_block(self, i, _decompress)
        except ValueError as e:
            raise self._corrupt(str(e)) from e
        except OSError as e:
            raise io_error(e, self.path, "read table") from e

    # -- lookups --------------------------------------------------------------------------------

    def get(
        self, key: bytes, hashes: tuple[int, int] | None = None
    ) -> tuple[int, bytes, int] | None:
        """(kind, value, expire) of ``key`` in this table, or None. Tombstones are returned.

        ``hashes``: ``bloom.key_hashes(key)``, computed once by a caller probing many tables."""
        if not self.bloom.may_contain(key, hashes):
            self.bloom_negatives += 1
            return None
        return self.find(key)

    def find(self, key: bytes) -> tuple[int, bytes, int] | None:
        """:meth:`get` for a caller that has checked the bloom filter already (``_accel.Probe``);
        a miss here is a bloom false positive and is counted as one."""
        try:
            found = _accel.table_find(self, key, _decompress)
        except ValueError as e:
            raise self._corrupt(str(e)) from e
        except OSError as e:
            raise io_error(e, self.path, "read table") from e
        if found is None:
            self.bloom_false_positives += 1
        return found

    def iter_from(self, start: bytes | None = None, stop: bytes | None = None) -> Iterator[Entry]:
        """Entries with start <= key < stop in key order (tombstones included); an iterator in
        C (``_accel.TableIter``) that reads one block at a time."""
        return _accel.TableIter(self, start, stop, _decompress)

    def verify(self) -> list[str]:
        """Read every block; report problems (checksums, order, counts, index, filter)."""
        problems: list[str] = []
        prev: bytes | None = None
        count = 0
        for bi, (off, _) in enumerate(self.handles):
            try:
                block = self._read_block(*self.handles[bi])
                entries = _accel.block_entries(block)
            except Corruption as e:
                problems.append(str(e))
                continue
            except ValueError as e:
                problems.append(f"{self.path}: data block at offset {off} is malformed: {e}")
                continue
            for k, _kind, _v, _e in entries:
                if prev is not None and k <= prev:
                    problems.append(f"{self.path}: keys out of order in block at offset {off}")
                if not self.bloom.may_contain(k):
                    problems.append(f"{self.path}: bloom filter misses a stored key")
                prev = k
                count += 1
            if entries and entries[-1][0] != self.last_keys[bi]:
                problems.append(f"{self.path}: index key of block at offset {off} does not match")
        if count != self.entry_count and not problems:
            problems.append(
                f"{self.path}: footer says {self.entry_count} entries, blocks hold {count}"
            )
        return problems
