"""Write-ahead log: one append-only file per generation, shared by every process of a store.

Process safety (the contract db.py builds on):

- Appends happen only while holding the store's WAL lock (:meth:`WalFile.locked`: the robust
  process-shared mutex of ``_accel.SharedPage``, one per store). One record is one ``write(2)``;
  the lock makes records from different processes land whole and back to back.
- Under that lock the file holds only whole records, except for a *torn tail* left by a writer
  that died inside its write. Whoever next holds the lock and reads to EOF finds it
  (:attr:`Replay.torn`) and cuts it off (:meth:`WalFile.truncate_wal_locked`) before appending, so a torn
  record is never followed by a good one.
- A torn tail is a record *cut short by the end of the file*: a partial header, a payload the
  header says runs past EOF, or zeros to EOF where a header should be (a host crash extended the
  file but the bytes never landed). Nothing else is: a record whose bytes are all there but fail
  the data checksum is *corruption* (:attr:`Replay.corrupt`) even when it is the last one --
  a writer that died mid-``write(2)`` cannot leave a complete-length record, so that record
  was written whole, maybe fsynced and acknowledged, then damaged. (It was: "last record, bad
  checksum" counted as torn and an acknowledged put vanished without a word. RocksDB's
  kTolerateCorruptedTailRecords draws the same line: incomplete tail records are tolerated,
  checksum mismatches are errors.) What recovery does with corruption is db.py's
  ``wal_recovery`` choice; here it is only found and named.
- Readers catch up *without* the lock: in an append-only log a record that reads whole and
  passes its checksums is final. What a lock-free reader cannot judge is the end: a record
  still being written looks like a torn one. So any anomaly is read again under the lock,
  where it is definitive (version.py ``VersionSet.replay_handle_locked``). (It was: every replay under the lock --
  until a maintenance helper replaying megabytes held every writer up.)
- A WAL is *sealed* by appending a SEAL record naming the next generation (under the lock,
  after catching up). Nothing is appended after a seal; a writer that replays up to a seal moves
  on to the next file. This is how several processes switch WALs without a shared memory word.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from shmkv.errors import Corruption

from . import _accel
from . import format as fmt
from .errors import io_error
from .fileio import fsync_dir, pread_all, unlink_quiet, write_all

Entry = tuple[int, bytes, bytes, int]  # kind, key, value, expire_at_ms



def encode_record(rtype: int, payload: bytes | bytearray | memoryview) -> bytes:
    lt = fmt.REC_LEN_TYPE.pack(len(payload), rtype)
    head = fmt.REC_HEAD.pack(len(payload), rtype, zlib.crc32(lt), zlib.crc32(payload))
    return head + bytes(payload)


def encode_batch(entries: Iterable[Entry]) -> bytes:
    """Frame a batch of entries as WAL records (in C: ``_accel.encode_batch``).

    A batch larger than ``_CHUNK`` becomes several records written with one ``write(2)``: each
    record is atomic on replay; the batch as a whole is not (``put_many`` promises no atomicity).
    """
    return _accel.encode_batch(list(entries), _CHUNK)


def encode_put(kind: int, key: bytes, value: bytes, expire_at_ms: int) -> bytes:
    """``encode_batch([(kind, key, value, expire_at_ms)])``, the single-put fast path."""
    return _accel.encode_put(kind, key, value, expire_at_ms)


_CHUNK = 32 << 20


def decode_batch(payload: bytes | memoryview) -> list[Entry]:
    """REQUIRES: payload passed its data_crc. Raises ValueError if the structure is inconsistent."""
    return _accel.decode_batch(payload)


@dataclass
class Replay:
    """What reading a WAL from some offset found.

    ``end`` is the offset after the last whole, valid record; ``records`` are (type, payload).
    At most one of ``torn`` / ``corrupt`` is set; with either, ``end`` < file size.
    """

    records: list[tuple[int, bytes]] = field(default_factory=list)
    end: int = 0
    size: int = 0
    torn: bool = False
    corrupt: str | None = None
    sealed_to: int | None = None  # next gen, if a SEAL record was read


def parse(buf: bytes, base: int, gen: int | None = None) -> Replay:
    """Parse records in ``buf`` (file bytes starting at offset ``base``) up to the first anomaly.

    ``gen``: the generation of the file, when known: a SEAL must name a later one (a seal
    naming its own or an earlier generation would send every reader round a cycle)."""
    rep = Replay(end=base, size=base + len(buf))
    mv = memoryview(buf)
    pos = 0
    n = len(buf)
    hs = fmt.REC_HEAD.size
    while pos < n:  # terminates: every iteration consumes >= REC_HEAD bytes or breaks
        if rep.sealed_to is not None:
            rep.corrupt = f"data after the SEAL record at offset {base + pos}"
            break
        if n - pos < hs:
            rep.torn = True
            break
        length, rtype, hcrc, dcrc = fmt.REC_HEAD.unpack_from(mv, pos)
        if zlib.crc32(mv[pos : pos + 5]) != hcrc or rtype not in (fmt.REC_BATCH, fmt.REC_SEAL):
            if not any(mv[pos:]):  # zeros to EOF: size was extended but data never landed
                rep.torn = True
            else:
                rep.corrupt = f"bad record header at offset {base + pos}"
            break
        if length > fmt.MAX_RECORD:
            rep.corrupt = f"record length {length} at offset {base + pos} is implausible"
            break
        if n - pos - hs < length:
            rep.torn = True  # cut short by the end of the file: a writer died in write(2)
            break
        payload = mv[pos + hs : pos + hs + length]
        if zlib.crc32(payload) != dcrc:
            # Whole (the header's length fits the file) but damaged: corruption, wherever it
            # is -- see the module doc for why this is never taken for a torn tail.
            rep.corrupt = f"bad record checksum at offset {base + pos} ({hs + length} bytes)"
            break
        if rtype == fmt.REC_SEAL:
            if length != fmt.U64.size:
                rep.corrupt = f"malformed SEAL record at offset {base + pos}"
                break
            (nxt,) = fmt.U64.unpack_from(payload, 0)
            if gen is not None and nxt <= gen:
                rep.corrupt = (
                    f"SEAL record at offset {base + pos} names generation {nxt}, "
                    f"not one after {gen}"
                )
                break
            rep.sealed_to = nxt
        rep.records.append((rtype, bytes(payload)))
        pos += hs + length
        rep.end = base + pos
    return rep


@dataclass
class Salvage:
    """What :func:`salvage` kept of a damaged stretch of WAL and what it dropped."""

    records: list[bytes] = field(default_factory=list)  # whole framed records, in file order
    dropped: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) ranges
    sealed_to: int | None = None

    @property
    def dropped_bytes(self) -> int:
        return sum(n for _, n in self.dropped)


def salvage(buf: bytes, base: int, gen: int | None = None) -> Salvage:
    """Every intact record of ``buf`` (file bytes from offset ``base``), skipping bad ones.

    A record whose header is intact but whose payload fails its checksum is skipped by its own
    length; after a bad header (whose length cannot be trusted) the next valid record is found
    by ``_accel.find_record``. Nothing after a SEAL is kept (nothing may follow one). Terminates:
    every step moves ``pos`` forward by at least one byte."""
    out = Salvage()
    pos = 0
    n = len(buf)
    hs = fmt.REC_HEAD.size
    while pos < n:
        rep = parse(buf[pos:], base + pos, gen)
        start = pos
        for rtype, payload in rep.records:
            size = hs + len(payload)
            out.records.append(bytes(buf[start : start + size]))
            start += size
            if rtype == fmt.REC_SEAL:
                (out.sealed_to,) = fmt.U64.unpack(payload)
        pos = rep.end - base
        if out.sealed_to is not None:
            if pos < n:
                out.dropped.append((base + pos, n - pos))
            break
        if pos >= n:
            break
        # pos is at a bad or torn record: skip it by its own length if its header is sound,
        # else resynchronise on the next valid record.
        length, rtype, hcrc, _ = fmt.REC_HEAD.unpack_from(buf, pos) if n - pos >= hs else (0, 0, 0, 0)
        nxt = -1
        if (
            n - pos >= hs
            and rtype in (fmt.REC_BATCH, fmt.REC_SEAL)
            and zlib.crc32(buf[pos : pos + 5]) == hcrc
            and length <= n - pos - hs
        ):
            nxt = pos + hs + length
            if nxt < n:
                found = _accel.find_record(buf, nxt, fmt.MAX_RECORD)
                nxt = n if found < 0 else found
        else:
            found = _accel.find_record(buf, pos + 1, fmt.MAX_RECORD)
            nxt = n if found < 0 else found
        assert nxt > pos, "Invariant: salvage always moves forward"
        out.dropped.append((base + pos, nxt - pos))
        pos = nxt
    return out


class WalFile:
    """One open ``wal-<gen>.log``. Not thread-safe: callers serialise calls with the handle lock (db.py)."""

    def __init__(self, path: str, gen: int, fd: int, page: _accel.SharedPage) -> None:
        self.path = path
        self.gen = gen
        self.fd = fd
        self.page = page  # whose lock guards appends (and replays) of every WAL of the store
        # Writes appended but not yet committed (db.py commit(): an fsync outside the handle lock).
        # close() waits for the last: a closed fd number can be reused by another file at once,
        # and an fsync of *that* would be taken for this WAL's.
        self.pins = 0
        self._close_pending = False

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, dirpath: str, gen: int, page: _accel.SharedPage) -> WalFile:
        """Create ``wal-<gen>.log`` with its header, durably (file and directory fsynced).

        REQUIRES: nobody can be appending to this generation yet (the previous WAL is not
        sealed to it), so an existing file of that name is a leftover and is replaced.
        """
        path = os.path.join(dirpath, fmt.wal_name(gen))
        tmp = path + ".tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_all(fd, fmt.WAL_HEADER.pack(fmt.WAL_MAGIC, fmt.FORMAT_VERSION, 0, gen), tmp)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            os.replace(tmp, path)
            fsync_dir(dirpath)
        except OSError as e:
            unlink_quiet(tmp)
            raise io_error(e, tmp, "create WAL") from e
        return cls.open(dirpath, gen, page)

    @classmethod
    def open(cls, dirpath: str, gen: int, page: _accel.SharedPage) -> WalFile:
        """Open an existing WAL. FileNotFoundError propagates (the caller reloads the manifest)."""
        path = os.path.join(dirpath, fmt.wal_name(gen))
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise io_error(e, path, "open WAL") from e
        try:
            head = os.pread(fd, fmt.WAL_HEADER.size, 0)
            if len(head) < fmt.WAL_HEADER.size:
                raise Corruption(f"{path}: WAL header is truncated")
            magic, version, _, hgen = fmt.WAL_HEADER.unpack(head)
            if magic != fmt.WAL_MAGIC:
                raise Corruption(f"{path}: not a shmkv WAL (bad magic)")
            if version != fmt.FORMAT_VERSION:
                raise Corruption(
                    f"{path}: WAL format version {version}, expected {fmt.FORMAT_VERSION}"
                )
            if hgen != gen:
                raise Corruption(f"{path}: header says generation {hgen}")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, gen, fd, page)

    def close(self) -> None:
        """Close now, or when the last pin is released (:meth:`unpin`)."""
        if self.pins:
            self._close_pending = True
        elif self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def unpin(self) -> None:
        self.pins -= 1
        if not self.pins and self._close_pending:
            self.close()

    # -- locking -----------------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's WAL lock. Lock order: the LOCK file (maintenance) before it."""
        self.page.lock()
        try:
            yield
        finally:
            self.page.unlock()

    # -- reading -----------------------------------------------------------------------------------

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def read_from(self, offset: int) -> Replay:
        """Parse records from ``offset`` (0 means just after the header) to the current EOF."""
        offset = max(offset, fmt.WAL_HEADER.size)
        size = self.size()
        if size <= offset:
            return Replay(end=offset, size=size)
        return parse(self.read_bytes(offset, size), offset, self.gen)

    def read_bytes(self, offset: int, end: int) -> bytes:
        """The file's bytes in [offset, end) (fewer if it is shorter)."""
        try:
            return pread_all(self.fd, end - offset, offset)
        except OSError as e:
            raise io_error(e, self.path, "read WAL") from e

    # -- writing (REQUIRES: the WAL lock, self.locked(), and the caller has read to EOF) --------
    # The ``_wal_locked`` suffix names that lock: callers in version.py hold the handle lock too.

    def append_wal_locked(self, data: bytes, start: int | None = None, gen: int = 0) -> int:
        """Append whole records (``SharedPage.append_locked``: the change counter is bumped
        before and after); return the counter after. On failure nothing is left behind: a short
        or failed write is cut back to ``start`` and DiskFull/FileAccessError raised.

        ``start``: the current end of file, when the caller knows it (saves an fstat).
        ``gen``: this WAL's generation, to publish the new end for group commit (0: don't)."""
        if start is None:
            start = self.size()
        try:
            return self.page.append_locked(self.fd, data, start, gen)
        except OSError as e:
            raise io_error(e, self.path, "append to WAL") from e

    def truncate_wal_locked(self, offset: int) -> None:
        """Cut a torn tail. REQUIRES: the WAL lock, and ``offset`` is the end of the last good record."""
        try:
            os.ftruncate(self.fd, offset)
        except OSError as e:
            raise io_error(e, self.path, "truncate WAL") from e

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise io_error(e, self.path, "fsync WAL") from e
