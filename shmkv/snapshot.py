"""Snapshots of the memory tier: `Store.dump(file)` and `shmkv.restore(file, name)`.

A restart then starts warm instead of cold (the seed's "dump to disk").

File format (version 1), msgpack-framed:

    "SHMKVDMP" (8 bytes) | version u32 LE | count u64 LE placeholder
    msgpack [key: bytes, value: bytes, expire_at_ms: int]   x count
    msgpack ["end", count, crc32 of every record's bytes]

The trailer makes a truncated or altered file an error (`Corruption`), never a silent partial
restore. Written to a temporary file, fsynced and renamed, so a crash leaves the old snapshot.
Expiry times are absolute (wall clock ms), so items that expired while the store was down are
skipped at restore.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from typing import TYPE_CHECKING, Any

import msgpack

from .errors import Corruption

if TYPE_CHECKING:
    from .store import Store

MAGIC = b"SHMKVDMP"  # DO NOT CHANGE: stored layout
VERSION = 1
_HEADER = struct.Struct("<8sIQ")


def dump(store: Store, path: str | os.PathLike[str]) -> int:
    """Write every live item of `store`'s memory tier to `path`; returns the item count."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    count = 0
    crc = 0
    packer = msgpack.Packer(use_bin_type=True)
    with open(tmp, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, 0))
        for key, value, expire in store._scan(2):
            rec = packer.pack([key, value, expire])
            crc = zlib.crc32(rec, crc)
            f.write(rec)
            count += 1
        f.write(packer.pack(["end", count, crc]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return count


def load(store: Store, path: str | os.PathLike[str]) -> int:
    """Put every unexpired item of the snapshot at `path` into `store`; returns how many.

    :raises Corruption: the file is not a shmkv snapshot, or is truncated or altered.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) != _HEADER.size or head[:8] != MAGIC:
            raise Corruption(f"{path}: not a shmkv snapshot")
        _, version, _ = _HEADER.unpack(head)
        if version != VERSION:
            raise Corruption(f"{path}: snapshot format version {version}; this shmkv reads {VERSION}")
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 31)
        records: list[Any] = []
        crc = 0
        packer = msgpack.Packer(use_bin_type=True)
        trailer = None
        try:
            for obj in unpacker:
                if isinstance(obj, list) and len(obj) == 3 and obj[0] == "end":  # keys are bin, never str
                    trailer = obj
                    break
                if not (isinstance(obj, list) and len(obj) == 3):
                    raise Corruption(f"{path}: malformed record")
                crc = zlib.crc32(packer.pack(obj), crc)
                records.append(obj)
        except (ValueError, msgpack.UnpackException) as e:
            raise Corruption(f"{path}: unreadable snapshot: {e}") from e
    if trailer is None:
        raise Corruption(f"{path}: truncated snapshot (no trailer after {len(records)} records)")
    if trailer[1] != len(records) or trailer[2] != crc:
        raise Corruption(f"{path}: snapshot checksum mismatch (altered or truncated)")
    now = time.time() * 1000
    n = 0
    for key, value, expire in records:
        if expire and expire <= now:
            continue
        ttl = (expire - now) / 1000 if expire else None
        store._put_raw(key, value, ttl)
        n += 1
    return n
