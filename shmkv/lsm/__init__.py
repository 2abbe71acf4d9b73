"""shmkv.lsm: the on-disk spill tier -- a multi-process log-structured merge tree.

Usable on its own::

    from shmkv.lsm import LSM
    with LSM("/var/cache/app", durability="fsync") as db:
        db.put(b"k", b"v")
        db.get(b"k")

Module map (one idea each): ``format`` (every stored layout), ``wal``, ``memtable``, ``bloom``,
``sstable``, ``manifest`` (with ``Edit``), ``compaction``, ``verify``, ``lost``, ``repair``,
``db`` (the :class:`LSM` API, the write path and the multi-process design), ``version`` (each
process's view of the files), ``maintenance`` (flush, compaction, the background thread),
``helper`` / ``helper_main`` (the helper process), ``errors``, ``fileio``.
"""

from __future__ import annotations

from .compaction import LevelOptions
from .db import LSM
from .errors import DiskFull, FileAccessError, StoreInUse
from .repair import RepairReport, repair

__all__ = ["LSM", "LevelOptions", "DiskFull", "FileAccessError", "StoreInUse", "RepairReport", "repair"]
