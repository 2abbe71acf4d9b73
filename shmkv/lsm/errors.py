"""Errors the spill tier adds to :mod:`shmkv.errors` (everything still derives from ``shmkv.Error``).

``shmkv/errors.py`` belongs to the store façade; the two disk-specific cases live here so the
LSM can be used, and tested, on its own -- with :func:`io_error`, the one mapping of an
``OSError`` to them.
"""

from __future__ import annotations

import errno as _errno

from shmkv.errors import Error, StoreFull


class DiskFull(StoreFull):
    """The file system ran out of space (ENOSPC/EDQUOT) while writing ``filename``.

    Nothing acknowledged is lost: a failed WAL append is cut back to the last whole record and
    the put raises; a failed flush or compaction leaves the previous manifest in force.
    ``errno`` and ``filename`` are copied from the underlying ``OSError`` (``__cause__``).
    """

    def __init__(self, msg: str, errno: int | None = None, filename: str | None = None) -> None:
        super().__init__(msg)
        self.errno = errno
        self.filename = filename


class FileAccessError(Error, OSError):
    """A file of the store cannot be opened, read or written (permissions, I/O error, a
    directory where a file should be...). The message names the file and the operation."""


class StoreInUse(Error):
    """An operation that needs the store to itself (``shmkv repair``) found it open in another
    process (or in another handle of this one)."""


_DISK_FULL = (_errno.ENOSPC, _errno.EDQUOT)


def io_error(e: OSError, path: str, what: str) -> Exception:
    """Map an OSError to the error the LSM raises: DiskFull for ENOSPC, else FileAccessError.
    (Used by the compiled ``_accel`` too, which imports it from here.)"""
    if e.errno in _DISK_FULL:
        return DiskFull(f"disk full: cannot {what} {path}: {e.strerror}", e.errno, path)
    return FileAccessError(e.errno or 0, f"cannot {what}: {e.strerror or e}", path)
