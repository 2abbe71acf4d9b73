"""Hints: writes a fallback node holds for a down owner until the owner has them (no network).

A hint is ``(owner, key) -> VersionSet``: what a sloppy-quorum write (handoff.py) left on this
node on behalf of ``owner``. Two hints for one (owner, key) merge into one (versions.py's merge),
so the store is bounded by keys, not by writes.

Durability. With a ``path`` the hints are kept in one append-only file, every change appended as
a record and fsynced before the call returns -- a fallback acknowledges a write only once its hint
is on disk, so a hint survives the holder's crash or restart (the owner's copy is then the only
other one). Without a path (a node without ``--path``) hints live in memory and die with the
process -- the README says so. Rejected: keeping hints in the node's local Store under a prefix
-- a memory-only Store loses them at restart, and a full cache could *evict* one, silently
dropping an acknowledged write.

    record: LENGTH (u32 big-endian) | msgpack [op, owner, key, versions] | CRC32 (u32)
    op: 1 = the merged hint of (owner, key) is now ``versions`` (VersionSet encoding)
        2 = the hint of (owner, key) is gone (delivered and acknowledged, or expired)

A torn or corrupt tail (a crash mid-append) ends the replay there: every record before it was
fsynced and is kept; the partial record was never acknowledged. Every ``COMPACT_FACTOR`` x more
records than live hints the file is rewritten (temp file, fsync, rename, fsync of the directory).

Deletion rule (the point of the module): a hint is deleted only by :meth:`HintStore.ack` with
the VersionSet the owner acknowledged having merged, and only when that set covers the stored
hint (the hint merged into it changes nothing). A hint that grew while its delivery was in
flight stays. Nothing else deletes a hint except :meth:`HintStore.drop_owner` (a node no longer
in the ring; logged by the caller).

Bound. At most ``max_hints`` hints and ``max_bytes`` of encoded versions; a new hint past the
bound is refused (:meth:`HintStore.add` returns False and ``refused`` counts it) -- the fallback
then answers "overloaded" and its write does not count toward W. Rejected: evicting old hints to
make room -- it would drop acknowledged writes silently.

Invariants: ``self._hints`` equals the replay of the file; ``bytes`` is the sum of the encoded
sizes of the hints held; a hint, once added and acknowledged to the writer, stays until acked.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack

from .versions import VersionSet

PUT = 1
DEL = 2  # DO NOT CHANGE: stored layout
LEN = struct.Struct(">I")
CRC = struct.Struct(">I")
MAX_RECORD = 64 * 1024 * 1024 + 4096
FILENAME = "hints.log"
MAX_HINTS = 1_000_000
MAX_BYTES = 256 * 1024 * 1024
COMPACT_FACTOR = 4


@dataclass
class HintStats:
    added: int = 0
    delivered: int = 0
    refused: int = 0  # hints refused because the bound was hit
    dropped: int = 0  # hints of owners no longer in the ring


class HintStore:
    """This node's hints. One thread (the daemon's loop) uses it; every method returns with the
    change on disk when there is a path."""

    def __init__(
        self, path: str | None = None, *, max_hints: int = MAX_HINTS, max_bytes: int = MAX_BYTES,
        fsync: bool = True,
    ) -> None:
        self.dir = path
        self.max_hints = max_hints
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.stats = HintStats()
        self._hints: dict[tuple[str, bytes], bytes] = {}
        self.bytes = 0
        self._records = 0
        self._batch = False  # inside ack_many: one fsync at the end, not one per record
        self._f = None
        if path is not None:
            os.makedirs(path, exist_ok=True)
            self._replay(os.path.join(path, FILENAME))
            self._f = open(os.path.join(path, FILENAME), "ab")  # noqa: SIM115 (held open)

    # -- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._hints)

    def owners(self) -> dict[str, int]:
        """owner -> hints pending for it."""
        out: dict[str, int] = {}
        for owner, _ in self._hints:
            out[owner] = out.get(owner, 0) + 1
        return dict(sorted(out.items()))

    def get(self, owner: str, key: bytes) -> VersionSet | None:
        raw = self._hints.get((owner, key))
        return None if raw is None else VersionSet.decode(raw)

    def pending(self, owner: str, limit: int = 256) -> list[tuple[bytes, VersionSet]]:
        """Up to ``limit`` hints for ``owner``, in key order (a delivery batch)."""
        keys = sorted(k for o, k in self._hints if o == owner)[:limit]
        return [(k, VersionSet.decode(self._hints[(owner, k)])) for k in keys]

    def keys(self, owner: str) -> list[bytes]:
        """Every key with a hint for ``owner``, in key order (a delivery round's worklist)."""
        return sorted(k for o, k in self._hints if o == owner)

    def all(self) -> Iterator[tuple[str, bytes, VersionSet]]:
        for (owner, key), raw in sorted(self._hints.items()):
            yield owner, key, VersionSet.decode(raw)

    # -- changing ----------------------------------------------------------------------------

    def add(self, owner: str, key: bytes, versions: VersionSet) -> bool:
        """Merge ``versions`` into the hint of (owner, key). False: refused, the bound is hit."""
        old_raw = self._hints.get((owner, key))
        merged = versions if old_raw is None else VersionSet.decode(old_raw).merge(versions)
        raw = merged.encode()
        if raw == old_raw:
            return True
        grow = len(raw) - (len(old_raw) if old_raw is not None else 0)
        if (old_raw is None and len(self._hints) >= self.max_hints) or self.bytes + grow > self.max_bytes:
            self.stats.refused += 1
            return False
        self._append(PUT, owner, key, raw)
        self._hints[(owner, key)] = raw
        self.bytes += grow
        self.stats.added += 1
        return True

    def ack(self, owner: str, key: bytes, acknowledged: VersionSet) -> bool:
        """The owner merged ``acknowledged`` (its answer to the delivery): delete the hint if that
        covers it. Returns whether it was deleted (False: it grew meanwhile, or is gone)."""
        raw = self._hints.get((owner, key))
        if raw is None:
            return False
        if acknowledged.merge(VersionSet.decode(raw)) != acknowledged:
            return False
        self._delete(owner, key, raw)
        self.stats.delivered += 1
        return True

    def ack_many(self, owner: str, acked: list[tuple[bytes, VersionSet]]) -> int:
        """:meth:`ack` for a delivery batch, with one fsync for all its records. Returns how
        many hints were deleted. (A deletion lost to a crash before that fsync only means the
        hint is delivered again: the owner's merge is idempotent.)"""
        done = 0
        self._batch = True
        try:
            for key, vs in acked:
                done += self.ack(owner, key, vs)
        finally:
            self._batch = False
            if done and self._f is not None and self.fsync:
                os.fsync(self._f.fileno())
        return done

    def drop_owner(self, owner: str) -> int:
        """Forget every hint of ``owner`` (a node that left the ring). Returns how many."""
        gone = [(o, k) for o, k in self._hints if o == owner]
        for o, k in gone:
            self._delete(o, k, self._hints[(o, k)])
        self.stats.dropped += len(gone)
        return len(gone)

    def __enter__(self) -> HintStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    # -- the file ----------------------------------------------------------------------------

    def _delete(self, owner: str, key: bytes, raw: bytes) -> None:
        self._append(DEL, owner, key, b"")
        del self._hints[(owner, key)]
        self.bytes -= len(raw)
        if self._records > COMPACT_FACTOR * len(self._hints) + 1024:
            self._compact()

    def _append(self, op: int, owner: str, key: bytes, raw: bytes) -> None:
        if self._f is None:
            return
        self._f.write(_record(op, owner, key, raw))
        self._f.flush()
        if self.fsync and not self._batch:
            os.fsync(self._f.fileno())
        self._records += 1

    def _replay(self, file: str) -> None:
        try:
            with open(file, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        pos = 0
        good = 0
        while pos + LEN.size <= len(data):
            (n,) = LEN.unpack_from(data, pos)
            end = pos + LEN.size + n + CRC.size
            if n > MAX_RECORD or end > len(data):
                break
            body = data[pos + LEN.size : pos + LEN.size + n]
            if CRC.unpack_from(data, end - CRC.size)[0] != zlib.crc32(body):
                break
            try:
                op, owner, key, raw = msgpack.unpackb(body)
            except Exception:  # a CRC-valid but foreign body: stop, as for a torn tail
                break
            if op == PUT:
                old = self._hints.get((owner, key))
                self.bytes += len(raw) - (len(old) if old is not None else 0)
                self._hints[(owner, key)] = raw
            elif op == DEL and (owner, key) in self._hints:
                self.bytes -= len(self._hints.pop((owner, key)))
            pos = end
            good += 1
        self._records = good
        if pos != len(data):  # cut the torn tail off, or later appends would follow garbage
            with open(file, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())

    def _compact(self) -> None:
        if self._f is None or self.dir is None:
            return
        final = os.path.join(self.dir, FILENAME)
        tmp = final + ".tmp"
        with open(tmp, "wb") as f:
            for (owner, key), raw in sorted(self._hints.items()):
                f.write(_record(PUT, owner, key, raw))
            f.flush()
            os.fsync(f.fileno())
        self._f.close()
        os.replace(tmp, final)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._f = open(final, "ab")  # noqa: SIM115
        self._records = len(self._hints)


def _record(op: int, owner: str, key: bytes, raw: bytes) -> bytes:
    body: bytes = msgpack.packb([op, owner, key, raw], use_bin_type=True)
    return LEN.pack(len(body)) + body + CRC.pack(zlib.crc32(body))


__all__ = ["HintStore", "HintStats"]
