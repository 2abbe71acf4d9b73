"""Raft's durable state on disk: the log, the hard state (term, vote, commit) and the snapshot.

One directory per node::

    <dir>/log        header, then one record per entry, appended; fsynced before persist()
                     returns (so before any message acknowledging the entries is sent)
    <dir>/hardstate  one small checksummed file, replaced atomically (tmp, fsync, rename)
    <dir>/snapshot   likewise: index, term, voters, state machine bytes

Layouts (little-endian; DO NOT CHANGE: stored layout -- bump VERSION instead)::

    log header (16 B):  magic "SHMKVRFT" | version u32 | reserved u32
    record:             length u32 | type u8 | head_crc u32 (of length+type) | data_crc u32
                        | payload[length]
    ENTRY payload:      term u64 | index u64 | kind u8 | data
    hardstate/snapshot: magic 8 B | version u32 | length u32 | crc32 u32 | payload[length]
    hardstate payload:  term u64 | commit u64 | vote_len u16 | vote
    snapshot payload:   index u64 | term u64 | n_voters u16 | (len u16, name)* | data

Recovery draws the line the LSM WAL draws (shmkv/lsm/wal.py): a record *cut short by the end
of the file* (a partial header, a payload past EOF, zeros where a header should be) is a torn
tail -- a write that never completed, so never fsynced, so never acknowledged -- and is cut off.
A record whose bytes are all there but fail their checksum is :class:`~shmkv.errors.Corruption`
naming the file and offset: it was written whole, maybe acknowledged, then damaged; dropping it
could silently forget a vote or a committed entry. Entries must be contiguous; a gap or a step
back is corruption too.

Order of writes in :meth:`DurableLog.persist` (each step durable before the next, so a crash
leaves a prefix of them): snapshot, log (truncation of a conflicting suffix fsynced before the
new records are written, so the old suffix can never reappear behind them), hard state. The
hard state goes last because its commit index may refer to the entries just written.

Rejected: hard state as records in the log file. Truncating a conflicting suffix would cut
the hard-state records behind it, and a vote cut that way and re-appended after the cut is
lost if the process dies in between -- a double vote. A separate file replaced atomically has
no such window; it is rewritten only when the term, vote or commit change.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from typing import TypedDict

from ...errors import Corruption
from .types import Entry, EntryKind, HardState, Ready, Snapshot

log = logging.getLogger("shmkv.cluster.raft")

VERSION = 1
LOG_MAGIC = b"SHMKVRFT"
HS_MAGIC = b"SHMKVRHS"
SNAP_MAGIC = b"SHMKVRSN"
LOG_HEADER = struct.Struct("<8sII")
REC_HEAD = struct.Struct("<IBII")  # length, type, head_crc, data_crc
REC_LEN_TYPE = struct.Struct("<IB")
ENTRY_HEAD = struct.Struct("<QQB")  # term, index, kind
FILE_HEAD = struct.Struct("<8sIII")  # magic, version, length, crc32
U16 = struct.Struct("<H")
U64x2 = struct.Struct("<QQ")
REC_ENTRY = 1  # DO NOT CHANGE: stored layout
MAX_RECORD = 256 << 20


class Restored(TypedDict):
    """What :meth:`DurableLog.restore` hands to ``RaftNode(id, config, **restored)``."""

    hard_state: HardState
    snapshot: Snapshot
    entries: list[Entry]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, magic: bytes, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    data = FILE_HEAD.pack(magic, VERSION, len(payload), zlib.crc32(payload)) + payload
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_atomic(path: Path, magic: bytes) -> bytes | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < FILE_HEAD.size:
        raise Corruption(f"{path}: {len(data)} bytes, shorter than its header")
    m, version, length, crc = FILE_HEAD.unpack_from(data)
    if m != magic:
        raise Corruption(f"{path}: not a Raft {magic.decode()} file (magic {m!r})")
    if version != VERSION:
        raise Corruption(f"{path}: layout version {version}, this build reads {VERSION}")
    payload = data[FILE_HEAD.size :]
    # Written whole and renamed into place: a short or damaged file is damage, never a tear.
    if len(payload) != length or zlib.crc32(payload) != crc:
        raise Corruption(f"{path}: checksum mismatch ({len(payload)} of {length} bytes)")
    return payload


def _encode_str(s: str) -> bytes:
    b = s.encode()
    return U16.pack(len(b)) + b


def _decode_str(buf: bytes, pos: int) -> tuple[str, int]:
    (n,) = U16.unpack_from(buf, pos)
    return buf[pos + 2 : pos + 2 + n].decode(), pos + 2 + n


def encode_hard_state(hs: HardState) -> bytes:
    return U64x2.pack(hs.term, hs.commit) + _encode_str(hs.vote)


def decode_hard_state(buf: bytes) -> HardState:
    term, commit = U64x2.unpack_from(buf)
    vote, _ = _decode_str(buf, U64x2.size)
    return HardState(term, vote, commit)


def encode_snapshot(s: Snapshot) -> bytes:
    parts = [U64x2.pack(s.index, s.term), U16.pack(len(s.voters))]
    parts += [_encode_str(v) for v in s.voters]
    parts.append(s.data)
    return b"".join(parts)


def decode_snapshot(buf: bytes) -> Snapshot:
    index, term = U64x2.unpack_from(buf)
    (n,) = U16.unpack_from(buf, U64x2.size)
    pos = U64x2.size + U16.size
    voters = []
    for _ in range(n):
        v, pos = _decode_str(buf, pos)
        voters.append(v)
    return Snapshot(index, term, tuple(voters), bytes(buf[pos:]))


def encode_entry(e: Entry) -> bytes:
    payload = ENTRY_HEAD.pack(e.term, e.index, int(e.kind)) + e.data
    lt = REC_LEN_TYPE.pack(len(payload), REC_ENTRY)
    return REC_HEAD.pack(len(payload), REC_ENTRY, zlib.crc32(lt), zlib.crc32(payload)) + payload


def parse_log(path: Path, buf: bytes) -> tuple[list[Entry], list[int], int, bool]:
    """(entries, their offsets, end of the last whole record, torn tail?) of a log file's
    bytes. Raises Corruption naming the file and offset for anything but a torn tail."""
    if len(buf) < LOG_HEADER.size:
        return [], [], 0, len(buf) > 0  # a header never completed: nothing was ever acked
    magic, version, _ = LOG_HEADER.unpack_from(buf)
    if magic != LOG_MAGIC:
        raise Corruption(f"{path}: not a Raft log (magic {magic!r})")
    if version != VERSION:
        raise Corruption(f"{path}: layout version {version}, this build reads {VERSION}")
    entries: list[Entry] = []
    offsets: list[int] = []
    pos, n, hs = LOG_HEADER.size, len(buf), REC_HEAD.size
    mv = memoryview(buf)
    while pos < n:  # terminates: each pass consumes >= REC_HEAD bytes or breaks
        if n - pos < hs:
            return entries, offsets, pos, True
        length, rtype, hcrc, dcrc = REC_HEAD.unpack_from(mv, pos)
        if zlib.crc32(mv[pos : pos + REC_LEN_TYPE.size]) != hcrc or rtype != REC_ENTRY:
            if not any(mv[pos:]):  # zeros to EOF: the size grew, the data never landed
                return entries, offsets, pos, True
            raise Corruption(f"{path}: bad record header at offset {pos}")
        if length > MAX_RECORD or length < ENTRY_HEAD.size:
            raise Corruption(f"{path}: implausible record length {length} at offset {pos}")
        if n - pos - hs < length:
            return entries, offsets, pos, True  # cut short by EOF: the writer died in write(2)
        payload = mv[pos + hs : pos + hs + length]
        if zlib.crc32(payload) != dcrc:
            raise Corruption(f"{path}: bad record checksum at offset {pos} ({hs + length} bytes)")
        term, index, kind = ENTRY_HEAD.unpack_from(payload)
        if entries and index != entries[-1].index + 1:
            raise Corruption(
                f"{path}: entry {index} at offset {pos} follows entry {entries[-1].index}"
            )
        try:
            ekind = EntryKind(kind)
        except ValueError:
            raise Corruption(f"{path}: unknown entry kind {kind} at offset {pos}") from None
        entries.append(Entry(term, index, ekind, bytes(payload[ENTRY_HEAD.size :])))
        offsets.append(pos)
        pos += hs + length
    return entries, offsets, pos, False


class DurableLog:
    """A node's Raft state in a directory; see the module docstring.

    Not process-safe: one node (one process) owns the directory.

    Invariants (between calls): ``entries`` is exactly what the log file holds after the
    snapshot, contiguous, ``entries[0].index == snapshot.index + 1`` when not empty;
    ``_offsets[i]`` is the file offset of ``entries[i]``; ``_end`` the file size.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open (or create) the directory and recover: cut a torn tail, drop log entries a
        snapshot covers. Raises Corruption naming the file for damage."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._log_path = self.path / "log"
        hs = _read_atomic(self.path / "hardstate", HS_MAGIC)
        self.hard_state = decode_hard_state(hs) if hs is not None else HardState()
        sn = _read_atomic(self.path / "snapshot", SNAP_MAGIC)
        self.snapshot = decode_snapshot(sn) if sn is not None else Snapshot()
        self.torn_bytes_dropped = 0
        try:
            buf = self._log_path.read_bytes()
        except FileNotFoundError:
            buf = b""
        entries, offsets, end, torn = parse_log(self._log_path, buf)
        if end == 0:  # no header yet (new, or the header itself was torn)
            self._rewrite([])
        else:
            self.entries, self._offsets, self._end = entries, offsets, end
            self._f = open(self._log_path, "r+b")  # noqa: SIM115 (held open for appends)
            if torn:
                self.torn_bytes_dropped = len(buf) - end
                log.warning(
                    "%s: dropping a torn tail of %d bytes at offset %d",
                    self._log_path,
                    len(buf) - end,
                    end,
                )
                self._truncate_file(end)
            self._fit_snapshot(self.snapshot, keep_matching=True)

    # -- reading ----------------------------------------------------------------------------

    def restore(self) -> Restored:
        """Keyword arguments for :class:`~shmkv.cluster.raft.core.RaftNode`. The caller also
        restores its state machine from ``snapshot.data``; the node then hands out the
        committed entries after the snapshot again, in Ready."""
        return {
            "hard_state": self.hard_state,
            "snapshot": self.snapshot,
            "entries": list(self.entries),
        }

    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot.index

    # -- writing ----------------------------------------------------------------------------

    def persist(self, rd: Ready) -> None:
        """Make ``rd``'s snapshot, entries and hard state durable; returns after fsync.
        REQUIRES: called in Ready order; then (only then) send ``rd.messages``."""
        if rd.snapshot is not None:
            self.save_snapshot(rd.snapshot, keep_matching=False)
        if rd.entries:
            self.append(list(rd.entries))
        if rd.hard_state is not None:
            self.set_hard_state(rd.hard_state)

    def append(self, entries: list[Entry]) -> None:
        """Append, first dropping every stored entry at or after ``entries[0].index``.
        REQUIRES: contiguous, snapshot.index < entries[0].index <= last_index() + 1."""
        first = entries[0].index
        if not self.snapshot.index < first <= self.last_index() + 1:
            raise ValueError(
                f"append at {first}: log holds ({self.snapshot.index}, {self.last_index()}]"
            )
        base = self.snapshot.index + 1
        if first <= self.last_index():
            k = first - base
            self._truncate_file(self._offsets[k])  # fsynced before the new records land
            del self.entries[k:], self._offsets[k:]
        data = bytearray()
        for e in entries:
            self._offsets.append(self._end + len(data))
            self.entries.append(e)
            data += encode_entry(e)
        self._f.seek(self._end)
        self._f.write(data)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._end += len(data)

    def set_hard_state(self, hs: HardState) -> None:
        if hs != self.hard_state:
            _write_atomic(self.path / "hardstate", HS_MAGIC, encode_hard_state(hs))
            self.hard_state = hs

    def save_snapshot(self, s: Snapshot, *, keep_matching: bool = True) -> None:
        """Store ``s`` durably, then compact: drop entries up to ``s.index``. With
        ``keep_matching`` (a snapshot this node took) entries after it are kept when the log
        holds ``s.index`` with ``s.term``; a received snapshot replaces the whole log."""
        _write_atomic(self.path / "snapshot", SNAP_MAGIC, encode_snapshot(s))
        self.snapshot = s
        self._fit_snapshot(s, keep_matching)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> DurableLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _fit_snapshot(self, s: Snapshot, keep_matching: bool) -> None:
        """Make the log file hold only entries after ``s`` that agree with it. Also run at
        open: a crash between writing a snapshot and compacting leaves entries it covers."""
        if not self.entries or self.entries[0].index > s.index:
            if self.entries and self.entries[0].index != s.index + 1:
                raise Corruption(
                    f"{self._log_path}: log starts at entry {self.entries[0].index}, "
                    f"snapshot ends at {s.index}: entries missing"
                )
            return
        at = s.index - self.entries[0].index
        keep = keep_matching and at < len(self.entries) and self.entries[at].term == s.term
        self._rewrite(self.entries[at + 1 :] if keep else [])

    def _rewrite(self, entries: list[Entry]) -> None:
        """Replace the log file with one holding ``entries`` (tmp, fsync, rename, fsync dir)."""
        tmp = self._log_path.with_name("log.tmp")
        offsets, data = [], bytearray(LOG_HEADER.pack(LOG_MAGIC, VERSION, 0))
        for e in entries:
            offsets.append(len(data))
            data += encode_entry(e)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        old = getattr(self, "_f", None)
        os.replace(tmp, self._log_path)
        _fsync_dir(self.path)
        if old is not None:
            old.close()
        self._f = open(self._log_path, "r+b")  # noqa: SIM115
        self.entries, self._offsets, self._end = list(entries), offsets, len(data)

    def _truncate_file(self, size: int) -> None:
        self._f.truncate(size)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._end = size
