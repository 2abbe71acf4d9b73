"""Raft messages as msgpack-friendly lists, for the RAFT wire message (config_service.py).

One message is a list in a fixed order (DO NOT CHANGE: wire layout; append fields at the end and
accept shorter lists from older peers)::

    [type str, src, dst, term, log_term, index, [entry...], commit, reject bool, hint,
     snapshot | None, context bytes]
    entry:    [term, index, kind int, data bytes]
    snapshot: [index, term, [voter...], data bytes]

:func:`decode` checks every type it reads, so a malformed message from the network is a
ProtocolError here and never reaches the state machine.
"""

from __future__ import annotations

from typing import Any

from ..errors import ProtocolError
from .types import Entry, EntryKind, Message, MsgType, Snapshot


def _entry(e: Entry) -> list[Any]:
    return [e.term, e.index, int(e.kind), e.data]


def _snapshot(s: Snapshot) -> list[Any]:
    return [s.index, s.term, list(s.voters), s.data]


def encode(m: Message) -> list[Any]:
    return [
        m.type.value, m.src, m.dst, m.term, m.log_term, m.index,
        [_entry(e) for e in m.entries], m.commit, m.reject, m.hint,
        None if m.snapshot is None else _snapshot(m.snapshot), m.context,
    ]


def _int(v: Any, what: str) -> int:
    if type(v) is not int or v < 0:
        raise ProtocolError(f"raft message: {what} must be an int >= 0, got {v!r}")
    return v


def _bytes(v: Any, what: str) -> bytes:
    if not isinstance(v, bytes):
        raise ProtocolError(f"raft message: {what} must be bytes, got {type(v).__name__}")
    return v


def _str(v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise ProtocolError(f"raft message: {what} must be a str, got {type(v).__name__}")
    return v


def decode(raw: Any) -> Message:
    """:raises ProtocolError: not an encoded message."""
    if not isinstance(raw, list) or len(raw) < 12:
        raise ProtocolError("raft message must be a list of 12 fields")
    try:
        kind = MsgType(raw[0])
    except ValueError:
        raise ProtocolError(f"raft message: unknown type {raw[0]!r}") from None
    entries = []
    if not isinstance(raw[6], list):
        raise ProtocolError("raft message: entries must be a list")
    for e in raw[6]:
        if not isinstance(e, list) or len(e) != 4:
            raise ProtocolError("raft message: an entry must be [term, index, kind, data]")
        try:
            ek = EntryKind(_int(e[2], "entry kind"))
        except ValueError:
            raise ProtocolError(f"raft message: unknown entry kind {e[2]!r}") from None
        entries.append(Entry(_int(e[0], "entry term"), _int(e[1], "entry index"), ek, _bytes(e[3], "entry data")))
    snap = None
    if raw[10] is not None:
        s = raw[10]
        if not isinstance(s, list) or len(s) != 4 or not isinstance(s[2], list):
            raise ProtocolError("raft message: a snapshot must be [index, term, voters, data]")
        snap = Snapshot(
            _int(s[0], "snapshot index"), _int(s[1], "snapshot term"),
            tuple(_str(v, "voter") for v in s[2]), _bytes(s[3], "snapshot data"),
        )
    if type(raw[8]) is not bool:
        raise ProtocolError("raft message: reject must be a bool")
    return Message(
        kind, _str(raw[1], "src"), _str(raw[2], "dst"), _int(raw[3], "term"),
        _int(raw[4], "log_term"), _int(raw[5], "index"), tuple(entries), _int(raw[7], "commit"),
        raw[8], _int(raw[9], "hint"), snap, _bytes(raw[11], "context"),
    )


__all__ = ["encode", "decode"]
