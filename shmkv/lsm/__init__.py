"""shmkv.lsm: the on-disk spill tier -- a multi-process log-structured merge tree.

Usable on its own::

    from shmkv.lsm import LSM
    with LSM("/var/cache/app", durability="fsync") as db:
        db.put(b"k", b"v")
        db.get(b"k")

Module map (one idea each): ``format`` (every stored layout), ``wal``, ``memtable``, ``bloom``,
``sstable``, ``manifest``, ``compaction``, ``verify``, ``db`` (the :class:`LSM` class and the
multi-process design), ``errors``.
"""

from __future__ import annotations

from .compaction import LevelOptions
from .db import LSM
from .errors import DiskFull, FileAccessError

__all__ = ["LSM", "LevelOptions", "DiskFull", "FileAccessError"]
