"""Errors the spill tier adds to :mod:`shmkv.errors` (everything still derives from ``shmkv.Error``).

``shmkv/errors.py`` belongs to the store façade; the two disk-specific cases live here so the
LSM can be used, and tested, on its own.
"""

from __future__ import annotations

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
