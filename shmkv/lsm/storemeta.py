"""The STORE file: what the memory tier of a persistent store was created as, kept on disk.

A persistent store (``shmkv.attach(name, path=...)``) outlives its shared-memory segment: after a
reboot the segment is gone and the directory is all there is. The segment's header records the
codec and the limits, so without a copy on disk a re-created segment would take the defaults --
a pickle store coming back raw (returning pickled bytes), a store created with ``max_key=4096``
coming back with 1024, its long keys listed by ``keys()`` but neither readable nor deletable.
So the directory records them once, in ``STORE`` (layout in format.py), and every attach checks
the segment against it.

Contracts:

- ``STORE`` is written once and never changed: :func:`create` writes a temporary file, fsyncs
  it, and ``link``\\ s it to ``STORE`` -- ``link`` fails if ``STORE`` exists, so of two processes
  creating at once exactly one wins and the other reads the winner's record (rename would let
  the loser silently replace it). The directory is fsynced after, so the record is durable
  before the segment that relies on it is marked finished.
- The LSM engine itself never reads it: it is the store façade's record (shmkv/store.py), kept
  beside the MANIFEST because it describes the same data.
"""

from __future__ import annotations

import errno
import os
import zlib
from typing import Any

import msgpack

from shmkv.errors import Corruption

from . import atomicfile
from . import format as fmt
from .errors import io_error
from .fileio import fsync_dir

_ATTEMPTS = 10  # a concurrent maintenance may remove our *.tmp before we link it: bounded retries


def store_path(dirpath: str) -> str:
    return os.path.join(dirpath, fmt.STORE)


def encode(fields: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(fields, use_bin_type=True)
    return (
        fmt.STORE_HEADER.pack(fmt.STORE_MAGIC, fmt.STORE_VERSION, len(body), zlib.crc32(body))
        + body
    )


def decode(data: bytes, path: str) -> dict[str, Any]:
    hs = fmt.STORE_HEADER.size
    if len(data) < hs:
        raise Corruption(f"{path}: store record is truncated ({len(data)} bytes)")
    magic, version, length, crc = fmt.STORE_HEADER.unpack_from(data, 0)
    if magic != fmt.STORE_MAGIC:
        raise Corruption(f"{path}: not a shmkv store record (bad magic)")
    if version != fmt.STORE_VERSION:
        raise Corruption(
            f"{path}: store record version {version}, this shmkv reads {fmt.STORE_VERSION}"
        )
    body = data[hs:]
    if len(body) != length or zlib.crc32(body) != crc:
        raise Corruption(f"{path}: store record checksum mismatch")
    try:
        d = msgpack.unpackb(body, raw=False)
        if not isinstance(d, dict):
            raise ValueError("not a map")
        return d
    except Exception as e:
        raise Corruption(f"{path}: store record body malformed: {e}") from e


def read(dirpath: str) -> dict[str, Any] | None:
    """The record in ``dirpath``, or None when there is none (a new or pre-STORE directory).

    :raises Corruption: the file is damaged. :raises FileAccessError: it cannot be read.
    """
    path = store_path(dirpath)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise io_error(e, path, "read store record") from e
    return decode(data, path)


def create(dirpath: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Record ``fields`` in ``dirpath`` (created if missing) unless a record exists; returns the
    record in force -- ours, or the one another process wrote first. Durable on return.

    :raises DiskFull, FileAccessError: the directory or file cannot be written.
    """
    path = store_path(dirpath)
    data = encode(fields)
    try:
        os.makedirs(dirpath, exist_ok=True)
    except OSError as e:
        raise io_error(e, dirpath, "create directory") from e
    for _ in range(_ATTEMPTS):
        existing = read(dirpath)
        if existing is not None:
            return existing
        tmp = atomicfile.tmp_path(path)
        try:
            atomicfile.write_synced(tmp, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                continue  # another process won: read its record
            except FileNotFoundError:
                continue  # a maintenance pass removed our .tmp as a leftover: write it again
            fsync_dir(dirpath)
            return fields
        except OSError as e:
            if e.errno == errno.EEXIST:
                continue
            raise io_error(e, path, "write store record") from e
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    existing = read(dirpath)
    if existing is None:
        raise Corruption(f"{path}: could not create the store record in {_ATTEMPTS} attempts")
    return existing
