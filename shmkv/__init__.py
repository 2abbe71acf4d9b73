"""shmkv: one shared-memory key-value cache per host for Python worker processes."""

from __future__ import annotations

from typing import Any

from .errors import (
    CodecError,
    Corruption,
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

# The store needs the compiled extension; load it on first use so that pure-Python parts
# (shmkv.lsm, shmkv.bench) import even in a tree where the extension is not built yet.
_LAZY = {"attach", "unlink", "list_stores", "restore", "Store"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module 'shmkv' has no attribute {name!r}")


__all__ = [
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
]
