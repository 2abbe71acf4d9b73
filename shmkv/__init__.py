"""shmkv: one shared-memory key-value cache per host for Python worker processes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cluster.errors import ClusterError, Conflict, MaybeApplied, QuorumError, WrongEpoch
from .errors import (
    CodecError,
    Corruption,
    EngineMismatch,
    Error,
    InvalidArgument,
    InvalidType,
    KeyTooLarge,
    NotACounter,
    SegmentMismatch,
    StoreClosed,
    StoreFull,
    StoreNotFound,
    ValueTooLarge,
)

__version__ = "0.1.0"

if TYPE_CHECKING:  # what the lazy __getattr__ below returns, for type checkers
    from .cluster.client import Client, NoSeedReachable, connect
    from .store import Store, attach, list_stores, restore, unlink

# The store needs the compiled extension; load it on first use so that pure-Python parts
# (shmkv.lsm, shmkv.bench) import even in a tree where the extension is not built yet.
_LAZY = {"attach", "unlink", "list_stores", "restore", "Store"}


def __getattr__(name: str) -> Any:
    if name in ("connect", "Client", "NoSeedReachable"):  # the cluster client pulls in asyncio and msgpack
        from .cluster import client

        return getattr(client, name)
    if name in _LAZY:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module 'shmkv' has no attribute {name!r}")


__all__ = [
    "connect",
    "Client",
    "NoSeedReachable",
    "attach",
    "unlink",
    "list_stores",
    "restore",
    "Store",
    "Error",
    "InvalidType",
    "InvalidArgument",
    "KeyTooLarge",
    "ValueTooLarge",
    "StoreFull",
    "SegmentMismatch",
    "StoreNotFound",
    "StoreClosed",
    "NotACounter",
    "CodecError",
    "Corruption",
    "EngineMismatch",
    "ClusterError",
    "QuorumError",
    "MaybeApplied",
    "Conflict",
    "WrongEpoch",
]
