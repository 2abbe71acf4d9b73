"""Small file helpers every on-disk module of the spill tier uses (WAL, tables, manifest,
store metadata, ``lost/``): whole writes, whole preads, directory fsync, quiet unlink.

One home so that the format modules import *down* to here instead of sideways into each other
(they imported wal.py's private helpers). Errors are raw ``OSError``: each caller maps them with
:func:`shmkv.lsm.errors.io_error`, naming its file and operation.
"""

from __future__ import annotations

import errno
import os


def write_all(fd: int, data: bytes | memoryview, path: str) -> None:
    """``write(2)`` until every byte of ``data`` is written (``path`` names the file in errors)."""
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        if n <= 0:  # pragma: no cover - write(2) reports ENOSPC instead of 0 on Linux
            raise OSError(errno.ENOSPC, "short write", path)
        mv = mv[n:]


def pread_all(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset``: fewer only at end of file."""
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
    """Make a rename or create in ``dirpath`` durable."""
    fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quiet(path: str) -> None:
    """Remove ``path`` if it is there; a failure leaves a leftover the next maintenance removes."""
    try:
        os.unlink(path)
    except OSError:
        pass
