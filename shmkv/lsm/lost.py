"""``<dir>/lost/``: where recovery and repair put what they take out of the store.

Contract (LevelDB's RepairDB keeps damaged files in the same place, for the same reason):
nothing the store drops at recovery or repair is deleted. WAL bytes cut by
``wal_recovery="truncate"``/``"skip"`` are copied here (fsynced) *before* the log is cut; a
damaged or superseded table and a WAL converted by repair are renamed here. ``verify()``
reports every file here as a problem until an operator removes it, so a drop is never only a
counter. Names are unique (a ``.N`` suffix is added on a clash), so a second drop never
overwrites the first.
"""

from __future__ import annotations

import os

from .errors import io_error
from .fileio import fsync_dir, write_all

LOST = "lost"


def lost_dir(dirpath: str) -> str:
    return os.path.join(dirpath, LOST)


def _unique(dirpath: str, name: str) -> str:
    d = lost_dir(dirpath)
    p = os.path.join(d, name)
    i = 1
    while os.path.lexists(p):  # terminates: each try is a new name, and a directory is finite
        p = os.path.join(d, f"{name}.{i}")
        i += 1
    return p


def _ensure(dirpath: str) -> str:
    d = lost_dir(dirpath)
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise io_error(e, d, "create directory") from e
    return d


def keep_bytes(dirpath: str, name: str, data: bytes) -> str:
    """Write ``data`` to a new file ``lost/<name>`` durably (file, ``lost/`` and the store
    directory fsynced); return its path."""
    d = _ensure(dirpath)
    p = _unique(dirpath, name)
    tmp = p + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data, tmp)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
        fsync_dir(d)
        fsync_dir(dirpath)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise io_error(e, p, "keep dropped bytes in") from e
    return p


def move(dirpath: str, path: str) -> str:
    """Rename ``path`` (a file of the store) into ``lost/``; return its new path."""
    d = _ensure(dirpath)
    p = _unique(dirpath, os.path.basename(path))
    try:
        os.rename(path, p)
        fsync_dir(d)
        fsync_dir(dirpath)
    except OSError as e:
        raise io_error(e, path, "move into lost/") from e
    return p


def listing(dirpath: str) -> list[tuple[str, int]]:
    """(path, size) of every file in ``lost/`` (``.tmp`` leftovers of an interrupted copy
    included: they are evidence too), sorted by name; [] when there is none."""
    d = lost_dir(dirpath)
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise io_error(e, d, "list") from e
    out = []
    for name in names:
        p = os.path.join(d, name)
        try:
            out.append((p, os.path.getsize(p)))
        except OSError:
            continue  # removed meanwhile by an operator
    return out
