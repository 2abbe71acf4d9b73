"""Self-checking values: any torn, mixed or misattributed value fails check_value."""

from __future__ import annotations

import hashlib
import struct


def make_value(writer: int, seq: int, size: int) -> bytes:
    """A self-checking value: header (writer, seq, length) + body derived from it + digest."""
    body = hashlib.blake2b(struct.pack("<II", writer, seq), digest_size=32).digest()
    body = (body * (size // 32 + 1))[:size]
    head = struct.pack("<III", writer, seq, size)
    return head + body + hashlib.blake2b(head + body, digest_size=8).digest()


def check_value(v: bytes) -> tuple[int, int]:
    writer, seq, size = struct.unpack_from("<III", v)
    assert len(v) == 12 + size + 8, "length does not match header"
    assert hashlib.blake2b(v[:-8], digest_size=8).digest() == v[-8:], "torn or mixed value"
    assert v == make_value(writer, seq, size)
    return writer, seq
