"""Write-ahead log: one append-only file per generation, shared by every process of a store.

Process safety (the contract db.py builds on):

- Appends happen only while holding the store's WAL lock (:meth:`WalFile.locked`: the robust
  process-shared mutex of ``_accel.SharedPage``, one per store). One record is one ``write(2)``;
  the lock makes records from different processes land whole and back to back.
- Under that lock the file holds only whole records, except for a *torn tail* left by a writer
  that died inside its write. Whoever next holds the lock and reads to EOF finds it
  (:attr:`Replay.torn`) and cuts it off (:meth:`WalFile.truncate`) before appending, so a torn
  record is never followed by a good one. A bad record that *is* followed by data is corruption
  (:attr:`Replay.corrupt`), reported, never skipped silently.
- Readers catch up *without* the lock: in an append-only log a record that reads whole and
  passes its checksums is final. What a lock-free reader cannot judge is the end: a record
  still being written looks like a torn one. So any anomaly is read again under the lock,
  where it is definitive (db.py ``_replay_unlocked``). (It was: every replay under the lock --
  until a maintenance helper replaying megabytes held every writer up.)
- A WAL is *sealed* by appending a SEAL record naming the next generation (under the lock,
  after catching up). Nothing is appended after a seal; a writer that replays up to a seal moves
  on to the next file. This is how several processes switch WALs without a shared memory word.
"""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from shmkv.errors import Corruption

from . import _accel
from . import format as fmt
from .errors import DiskFull, FileAccessError

Entry = tuple[int, bytes, bytes, int]  # kind, key, value, expire_at_ms

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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


def parse(buf: bytes, base: int) -> Replay:
    """Parse records in ``buf`` (file bytes starting at offset ``base``) up to the first anomaly."""
    rep = Replay(end=base, size=base + len(buf))
    mv = memoryview(buf)
    pos = 0
    n = len(buf)
    hs = fmt.REC_HEAD.size
    while pos < n:
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
            rep.torn = True
            break
        payload = mv[pos + hs : pos + hs + length]
        if zlib.crc32(payload) != dcrc:
            if pos + hs + length == n:
                rep.torn = True  # last record, head intact: a host crash lost its last page(s)
            else:
                rep.corrupt = f"bad record checksum at offset {base + pos}"
            break
        if rtype == fmt.REC_SEAL:
            if length != fmt.U64.size:
                rep.corrupt = f"malformed SEAL record at offset {base + pos}"
                break
            (rep.sealed_to,) = fmt.U64.unpack_from(payload, 0)
        rep.records.append((rtype, bytes(payload)))
        pos += hs + length
        rep.end = base + pos
    return rep


class WalFile:
    """One open ``wal-<gen>.log``. Not thread-safe: db.py serialises calls with its own lock."""

    def __init__(self, path: str, gen: int, fd: int, page: _accel.SharedPage) -> None:
        self.path = path
        self.gen = gen
        self.fd = fd
        self.page = page  # whose lock guards appends (and replays) of every WAL of the store

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
                _write_all(fd, fmt.WAL_HEADER.pack(fmt.WAL_MAGIC, fmt.FORMAT_VERSION, 0, gen), tmp)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
            os.replace(tmp, path)
            fsync_dir(dirpath)
        except OSError as e:
            _unlink_quiet(tmp)
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
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

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
        try:
            buf = _pread_all(self.fd, size - offset, offset)
        except OSError as e:
            raise io_error(e, self.path, "read WAL") from e
        return parse(buf, offset)

    # -- writing (REQUIRES: self.locked() held, and the caller has read to EOF) -------------------

    def append_locked(self, data: bytes, start: int | None = None) -> int:
        """Append whole records (``SharedPage.append_locked``: the change counter is bumped
        before and after); return the counter after. On failure nothing is left behind: a short
        or failed write is cut back to ``start`` and DiskFull/FileAccessError raised.

        ``start``: the current end of file, when the caller knows it (saves an fstat)."""
        if start is None:
            start = self.size()
        try:
            return self.page.append_locked(self.fd, data, start)
        except OSError as e:
            raise io_error(e, self.path, "append to WAL") from e

    def truncate_locked(self, offset: int) -> None:
        """Cut a torn tail. REQUIRES: the lock, and ``offset`` is the end of the last good record."""
        os.ftruncate(self.fd, offset)

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise io_error(e, self.path, "fsync WAL") from e


# -- small file helpers shared by the other modules --------------------------------------------


def _write_all(fd: int, data: bytes | memoryview, path: str) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        if n <= 0:  # pragma: no cover - write(2) reports ENOSPC instead of 0 on Linux
            raise OSError(errno.ENOSPC, "short write", path)
        mv = mv[n:]


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    buf = os.pread(fd, n, offset)
    if len(buf) == n:
        return buf
    parts = [buf]
    got = len(buf)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def fsync_dir(dirpath: str) -> None:
    fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def io_error(e: OSError, path: str, what: str) -> Exception:
    """Map an OSError to the error the LSM raises: DiskFull for ENOSPC, else FileAccessError."""
    if e.errno in _DISK_FULL:
        return DiskFull(f"disk full: cannot {what} {path}: {e.strerror}", e.errno, path)
    return FileAccessError(e.errno or 0, f"cannot {what}: {e.strerror or e}", path)


_accel.set_io_error(io_error)
