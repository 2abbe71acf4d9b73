"""Self-checking values: any torn, mixed or misattributed value fails check_value (one copy of
the format: shmkv.torture.soak, which the soak tool checks its stores with)."""

from __future__ import annotations

from shmkv.torture import soak
from shmkv.torture.soak import make_value


def check_value(v: bytes) -> tuple[int, int]:
    """soak.check_value, failing as an assertion (the tests' readers count AssertionErrors)."""
    try:
        return soak.check_value(v)
    except ValueError as e:
        raise AssertionError(str(e)) from None


__all__ = ["check_value", "make_value"]
