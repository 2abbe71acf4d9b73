"""Every exception shmkv raises on purpose derives from :class:`Error`.

Where a built-in exception is the natural match (a missing key is a ``KeyError``, a bad
argument a ``ValueError``) the shmkv class derives from both, so ``except KeyError`` and
``except shmkv.Error`` each catch it.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of all shmkv errors."""


class InvalidType(Error, TypeError):
    """A key, value or argument of the wrong type (keys: bytes or str; values: bytes-like)."""


def not_bytes_like(value: object, what: str = "value", pickle_hint: bool = False) -> InvalidType:
    """The one "must be bytes-like" error, for the memory tier (ext/_core.pyx) and the disk tier
    (lsm/db.py) alike. ``what`` names the argument ("value", "value for key 'k'", "new");
    ``pickle_hint`` where a pickle store would take the object as it is."""
    if isinstance(value, str):
        tail = " or attach with codec='pickle'" if pickle_hint else ""
        return InvalidType(f"{what} must be bytes-like, not str: encode it (.encode()){tail}")
    tail = "; attach with codec='pickle' to store objects" if pickle_hint else ""
    return InvalidType(
        f"{what} must be bytes-like (bytes, bytearray, memoryview), not {type(value).__name__}{tail}"
    )


class InvalidArgument(Error, ValueError):
    """An argument outside its allowed range (a negative TTL, a malformed size string...)."""


class KeyTooLarge(Error, ValueError):
    """The key is empty or longer than the store's key limit."""


class ValueTooLarge(Error, ValueError):
    """The value does not fit the in-memory item limit (and there is no spill tier for it)."""


class StoreFull(Error, MemoryError):
    """No memory could be found for an item, or the segment cannot be created at that size."""


class SegmentMismatch(Error):
    """An existing segment differs from what the caller asked for (size, layout version)."""


class EngineMismatch(SegmentMismatch):
    """An existing store was created with another engine (``"hash"``, ``"btree"``) than the
    attach asked for; the message names both."""


class StoreNotFound(Error, FileNotFoundError):
    """No store of that name exists (and creation was not asked for)."""


class StoreClosed(Error, ValueError):
    """The store handle was used after ``close()``."""


class NotACounter(Error, ValueError):
    """``incr`` met a value that is not a decimal integer."""


class CodecError(Error, ValueError):
    """A value could not be encoded or decoded by the store's codec."""


class Corruption(Error):
    """Stored data failed a checksum or a structural check; the message names the place."""


__all__ = [
    "Error",
    "InvalidType",
    "InvalidArgument",
    "KeyTooLarge",
    "ValueTooLarge",
    "StoreFull",
    "SegmentMismatch",
    "EngineMismatch",
    "StoreNotFound",
    "StoreClosed",
    "NotACounter",
    "CodecError",
    "Corruption",
]
