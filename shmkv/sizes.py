"""Parsing of human sizes ("256MiB", "1GiB", "64MB", 1048576)."""

from __future__ import annotations

import re

from .errors import InvalidArgument, InvalidType

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes in `value`: an int, or a number with a unit (K/M/G/T = KiB/MiB/GiB/TiB;
    KB/MB/GB/TB are powers of 1000)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidType(f"{what} must be an int or a string like '256MiB', not {type(value).__name__}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(value)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise InvalidArgument(f"{what} {value!r} is not a size like '256MiB', '1GiB' or '65536'")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise InvalidArgument(f"{what} must be positive, got {value!r}")
    return n


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
