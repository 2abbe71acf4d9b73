"""Snapshots of the memory tier: `Store.dump(file)` and `shmkv.restore(file, name)`.

A restart then starts warm instead of cold (the seed's "dump to disk").

File format (version 2), msgpack-framed:

    "SHMKVDMP" (8 bytes) | version u32 LE | count u64 LE placeholder
    msgpack {"codec": int, "codec_arg": int, "max_key": int, "max_item": int}   the store's shape
    msgpack [key: bytes, value: bytes, expire_at_ms: int]   x count
    msgpack ["end", count, crc32 of the shape's and every record's bytes]

Version 1 is the same without the shape map: it is still read, and restores as it always did
(values go in as they are, whatever the target's codec). Version 2 records the codec because a
pickle store's values restored into a raw store come back as pickled bytes, and the limits so
that `shmkv.restore` creates a store that can hold what it loads.

Promises:
- The trailer makes a truncated or altered file an error (`Corruption`), never a silent partial
  restore; and every record is checked against the target store (codec, `max_key`, `max_item`)
  *before* the first is stored, so a snapshot that does not fit loads nothing
  (`SegmentMismatch`). Rejected: loading into a fresh segment and swapping -- other processes
  attached to the target would keep the old one.
- Written to a temporary file beside the target, fsynced and renamed, so a crash leaves the old
  snapshot. A failed dump (disk full, missing directory, a directory as target) removes its
  temporary file and raises `DiskFull` / `FileAccessError` naming the file; the target is
  checked before anything is written.
- Expiry times are absolute (wall clock ms), so items that expired while the store was down are
  skipped at restore.

This module knows the file and the checks, not the store: the store (shmkv/store.py) hands
`dump` its records and describes itself as a `Target`, and stores what `plan_load` returns.
So imports run one way, store -> snapshot.
"""

from __future__ import annotations

import errno
import os
import struct
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import Corruption, SegmentMismatch
from .lsm.errors import FileAccessError, io_error
from .lsm.fileio import fsync_dir
from .lsm.format import MAX_VALUE as _DISK_MAX_VALUE

MAGIC = b"SHMKVDMP"  # DO NOT CHANGE: stored layout
VERSION = 2
READABLE = (1, 2)  # versions load() understands
_HEADER = struct.Struct("<8sIQ")
_ITEM_HEADER = 36  # SHMKV_ITEM_HDR: max_item counts it
_CODEC_NAMES = {0: "raw", 1: "pickle"}  # segment.CODEC_*; not imported: segment needs the extension


@dataclass
class Snapshot:
    """A snapshot read whole and verified (checksum, trailer), not yet loaded anywhere."""

    path: str
    version: int
    meta: dict[str, Any] | None  # the shape (version 2); None for version 1
    records: list[Any]

    def shape(self) -> dict[str, Any]:
        """Codec and limits for a store created to hold this snapshot ({} for version 1)."""
        if self.meta is None:
            return {}
        return {k: self.meta.get(k) for k in ("codec", "max_key", "max_item")}


def _check_target(path: str) -> None:
    """Fail before writing anything: a directory as target, or a missing parent directory."""
    if os.path.isdir(path):
        raise FileAccessError(errno.EISDIR, "cannot dump: the target is a directory", path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileAccessError(errno.ENOENT, f"cannot dump: directory {parent} does not exist", path)


@dataclass(frozen=True)
class Target:
    """What `plan_load` checks a snapshot against: the store it is loaded into."""

    name: str
    codec_id: int
    max_key: int
    max_item: int
    on_disk: bool  # a disk tier: items over max_item live on disk only


def dump(path: str | os.PathLike[str], meta: dict[str, Any],
         records: Iterable[tuple[bytes, bytes, int]]) -> int:
    """Write `records` -- (key, value, expire_at_ms) of every live item of a memory tier --
    and the store's shape `meta` to `path`; returns the item count.

    :raises DiskFull: no space (the temporary file is removed). :raises FileAccessError: the
        target is a directory, its directory is missing, or it cannot be written.
    """
    path = os.fspath(path)
    _check_target(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    count = 0
    packer = msgpack.Packer(use_bin_type=True)
    try:
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, 0))
            head = packer.pack(meta)
            crc = zlib.crc32(head)
            f.write(head)
            for key, value, expire in records:
                rec = packer.pack([key, value, expire])
                crc = zlib.crc32(rec, crc)
                f.write(rec)
                count += 1
            f.write(packer.pack(["end", count, crc]))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        _unlink_quiet(tmp)
        raise io_error(e, path, "write snapshot") from e
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return count


def read(path: str | os.PathLike[str]) -> Snapshot:
    """Read and verify the whole snapshot at `path`.

    :raises Corruption: not a shmkv snapshot, an unknown version, truncated or altered.
    :raises FileAccessError: the file cannot be read.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise io_error(e, path, "read snapshot") from e
    with f:
        head = f.read(_HEADER.size)
        if len(head) != _HEADER.size or head[:8] != MAGIC:
            raise Corruption(f"{path}: not a shmkv snapshot")
        _, version, _ = _HEADER.unpack(head)
        if version not in READABLE:
            raise Corruption(
                f"{path}: snapshot format version {version}; this shmkv reads {READABLE}"
            )
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 31)
        records: list[Any] = []
        meta: dict[str, Any] | None = None
        crc = 0
        packer = msgpack.Packer(use_bin_type=True)
        trailer = None
        try:
            if version >= 2:
                first = next(unpacker, None)
                if not isinstance(first, dict):
                    raise Corruption(f"{path}: snapshot has no shape record")
                meta = first
                crc = zlib.crc32(packer.pack(first))
            for obj in unpacker:
                if (
                    isinstance(obj, list) and len(obj) == 3 and obj[0] == "end"
                ):  # keys are bin, never str
                    trailer = obj
                    break
                if not (isinstance(obj, list) and len(obj) == 3):
                    raise Corruption(f"{path}: malformed record")
                crc = zlib.crc32(packer.pack(obj), crc)
                records.append(obj)
        except (ValueError, msgpack.UnpackException) as e:
            raise Corruption(f"{path}: unreadable snapshot: {e}") from e
        except OSError as e:
            raise io_error(e, path, "read snapshot") from e
    if trailer is None:
        raise Corruption(f"{path}: truncated snapshot (no trailer after {len(records)} records)")
    if trailer[1] != len(records) or trailer[2] != crc:
        raise Corruption(f"{path}: snapshot checksum mismatch (altered or truncated)")
    return Snapshot(path, version, meta, records)


def plan_load(snap: Snapshot, store: Target) -> list[tuple[bytes, bytes, float | None]]:
    """The unexpired items of `snap` as (key, value, ttl in seconds or None) for `store` to
    put, after checking that each one fits it: a mismatch raises before anything is loaded.

    :raises SegmentMismatch: another codec (version 2), or a key or item over the store's limits.
    :raises Corruption: a record that is not a pair of bytes.
    """
    codec: Any = snap.meta.get("codec") if snap.meta is not None else store.codec_id
    if codec != store.codec_id:
        raise SegmentMismatch(
            f"{snap.path}: the snapshot holds values of codec {_CODEC_NAMES.get(codec, codec)!r}; "
            f"store {store.name!r} has codec {_CODEC_NAMES.get(store.codec_id, store.codec_id)!r}; "
            f"nothing was loaded"
        )
    now = time.time() * 1000
    live = [r for r in snap.records if not (r[2] and r[2] <= now)]
    on_disk = store.on_disk
    for key, value, _ in live:
        if not isinstance(key, bytes) or not isinstance(value, bytes):
            raise Corruption(f"{snap.path}: a record is not a pair of bytes")
        if not 0 < len(key) <= store.max_key:
            raise SegmentMismatch(
                f"{snap.path}: holds a key of {len(key)} bytes; store {store.name!r} has "
                f"max_key={store.max_key}; nothing was loaded"
            )
        if (
            (len(value) > _DISK_MAX_VALUE)
            if on_disk
            else (_ITEM_HEADER + len(key) + len(value) > store.max_item)
        ):
            limit = (
                f"the disk tier's {_DISK_MAX_VALUE}-byte value limit"
                if on_disk
                else f"max_item={store.max_item}"
            )
            raise SegmentMismatch(
                f"{snap.path}: holds an item of {_ITEM_HEADER + len(key) + len(value)} bytes "
                f"(header + key + value); store {store.name!r} has {limit}; nothing was loaded"
            )
    return [(key, value, (expire - now) / 1000 if expire else None) for key, value, expire in live]


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
