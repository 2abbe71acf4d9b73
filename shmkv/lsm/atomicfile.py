"""The one way a small file of the spill tier is made durable: write it whole under a temporary
name, fsync it, publish it under its real name, fsync the directory.

Used by the MANIFEST (published by rename: :func:`replace`, a reader sees the old or the new file
whole) and the STORE record (published by ``link``, which refuses to overwrite: storemeta.py uses
:func:`write_synced` and links the result itself). The temporary name is ``<path>.<pid>.tmp``:
a crash leaves at most that, which the next maintenance removes as a ``*.tmp`` leftover.

Errors are raw ``OSError``; each caller maps them (``io_error``) naming its file and operation.
"""

from __future__ import annotations

import os

from .fileio import fsync_dir


def tmp_path(path: str) -> str:
    """The temporary name ``path`` is written under before it is published."""
    return f"{path}.{os.getpid()}.tmp"


def write_synced(path: str, data: bytes) -> None:
    """Create or truncate ``path``, write all of ``data``, fsync it. :raises OSError:."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:  # a buffered write writes every byte or raises
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace(path: str, data: bytes) -> None:
    """Atomically and durably make ``data`` the content of ``path`` (rename over it).

    On failure the previous file stays in force and the temporary file is removed.
    :raises OSError:
    """
    tmp = tmp_path(path)
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path) or ".")
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
