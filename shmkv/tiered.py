"""The disk-tier policy of a persistent store: what `add`, `incr` and `cas` do on disk, and the
disk's value limit.

The memory boundary (ext/_core.pyx) owns the mechanism, not the policy: each function here
runs as the `fn` of ``shmkv_through`` (ext/core/table.c), under the key's stripe lock, after
the key left memory, and returns what memory should hold now: None, ``(value, expire_ms)``,
or ``(value, expire_ms, ticket)`` -- a write's ticket is committed (``LSM.commit``, the fsync
of durability "fsync") by the boundary only after the stripe lock is released. So memory and
disk see one order of writes to a key, and memory never holds what disk contradicts.

The façade (shmkv/store.py) wires this module into a store beside its LSM
(``Store._tiering``), so the memory boundary imports nothing of the disk tier, and imports run
one way: store -> tiered -> lsm, _core.

Keys need no check here: a segment's ``max_key`` (<= 65535) is below the disk's ``MAX_KEY``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._ext import _core
from .errors import ValueTooLarge
from .lsm.format import MAX_VALUE

if TYPE_CHECKING:
    from .lsm import LSM

__all__ = ["MAX_VALUE", "add", "cas", "check_value", "incr"]


def check_value(value: bytes) -> None:
    """Before a write goes through (the key would leave memory first): the disk's limit.

    :raises ValueTooLarge: over the disk tier's value limit."""
    if len(value) > MAX_VALUE:
        raise ValueTooLarge(f"value is {len(value)} bytes; the disk tier's limit is {MAX_VALUE}")


def add(tier: LSM, key: bytes, value: bytes, expire: int, outcome: list[Any]) -> Any:
    """Store only if the disk holds no live `key`; when stored, its ticket goes to `outcome`
    (empty: not stored). The disk holds every value, so it alone decides."""
    entry = tier.get_entry(key)
    if entry is not None:
        return entry  # memory caches what disk holds
    res = tier.fast_put(key, value, expire)
    outcome.append(res[2])
    return res


def incr(tier: LSM, key: bytes, delta: int) -> Any:
    """The counter on disk plus `delta`, by the memory tier's rule (``_core.next_counter``:
    shmkv_counter_add in ext/core/table.c); keeps the key's expiry.

    :raises NotACounter: the stored value is not a decimal integer, or the result does not fit
        a signed 64-bit integer."""
    entry = tier.get_entry(key)
    raw, expire = entry if entry is not None else (None, 0)
    return tier.fast_put(key, _core.next_counter(raw, delta), expire)


def cas(tier: LSM, key: bytes, expected: bytes | None, value: bytes, expire: int,
        outcome: list[Any]) -> Any:
    """Store `value` only if the disk's value is `expected` (None: absent), durably before the
    stripe lock is released (``put_checked``); True goes to `outcome` when stored."""
    entry = tier.get_entry(key)
    if (entry is None and expected is None) or (entry is not None and entry[0] == expected):
        outcome.append(True)
        return tier.put_checked(key, value, expire)
    return entry  # unchanged: memory caches what disk holds
