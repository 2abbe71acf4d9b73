"""The federation's wire format: every frame, message code and body field in one place, one version.

Daemons talk to each other and to the Python client (``shmkv.connect``) in msgpack frames over
TCP. This module encodes and decodes them without touching a socket (transport.py does the I/O);
RESP for redis tools lives apart in resp.py.

Frame
-----
::

    +-----------------+---------+------------------------------------------+
    | length          | version | body: msgpack array [code, rid, fields]  |
    | u32 big-endian  | u8      | `length - 1` bytes                       |
    +-----------------+---------+------------------------------------------+
      length counts the version byte and the body (so length >= 1), never itself;
      a frame is at most 4 + MAX_FRAME bytes.

    code    u8-range int: one of the message codes below
    rid     request id, 0 <= rid < 2**63: a reply carries the rid of its request, so one
            connection multiplexes many requests in flight and replies may come in any order.
            rid 0 is reserved for unsolicited messages (a BAD_REQUEST sent before closing a
            connection whose stream could not be parsed).
    fields  msgpack map, str keys -> values; required and optional fields per code are in
            SCHEMA. Unknown extra fields are ignored (a newer peer may add optional ones;
            anything else needs a WIRE_VERSION bump).

Why big-endian here but little-endian on disk (lsm/format.py): network byte order is what every
tool that dumps TCP streams (Wireshark's length-prefixed dissectors, `xxd`) reads naturally, and
nothing here is mapped into memory.

Why a length prefix over a self-delimiting msgpack stream (msgpack.Unpacker.feed): with the
length first, an oversized frame is refused after 4 bytes instead of after buffering it, a
malformed body cannot swallow the next frame, and the version byte is checked before any body
is parsed.

Why msgpack arrays for the top level and maps for the fields: the three header items are
fixed forever (DO NOT CHANGE), the fields are where the protocol grows.

Message codes
-------------
::

       1..31   client requests    (client -> any node; the node coordinates)
      32..63   replica requests   (coordinator -> replica)
      64       OK                 the reply to every request that succeeded; fields per request
      96..127  error replies      fields: "message" str always, plus the ones in SCHEMA

OK reply fields, by request (the proposal the coordinator and client build on; extra fields
are allowed, so refining it needs no version bump)::

    PING              {}                               RING     {"ring": Ring.to_wire()}
    GET               {"value": bytes|None, "context": bytes}
    GET_VERSIONS      {"values": [bytes|None, ...], "context": bytes}
    PUT, DELETE       {"context": bytes} ({} with "ack": 1)   STATUS   {"status": map}
    GET_MANY          {"values": [bytes|None, ...]}    (in the order of "keys")
    PUT_MANY          {}                               INCR     {"value": int}
    REPLICA_GET       {"versions": VersionSet.to_wire() | None}
    REPLICA_PUT       {"versions": the merged VersionSet.to_wire()} ({} with "ack": 1)
    REPLICA_GET_MANY  {"versions": [... | None, ...]}  REPLICA_PUT_MANY  {}
    REPLICA_COUNTER   {"counter": the merged PNCounter.to_wire()}
    LOAD              {"ops": int, "bytes": int}       (autobalance.py: store ops so far, bytes)

Keys and values are msgpack bin (bytes); ``None`` in a value position means "absent" or a
tombstone. Version sets (``versions``), counters (``counter``) and rings (``ring``) are the
``to_wire()`` forms of versions.py, crdt.py and ring.py, checked by their ``from_wire()``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .. import errors
from . import errors as cluster_errors
from .errors import (
    ClusterError,
    Conflict,
    MaybeApplied,
    ProtocolError,
    QuorumError,
    WrongEpoch,
)

# DO NOT CHANGE: wire layout. Bump WIRE_VERSION (and teach both ends) instead.
WIRE_VERSION = 1

# DO NOT CHANGE: wire layout
HEADER = struct.Struct(">IB")  # length (version byte + body), version
LENGTH = struct.Struct(">I")
#: One Packer for every frame (``msgpack.packb`` builds one per call, as costly as packing a
#: small frame). Safe to share: ``pack`` runs in C holding the GIL, calls no Python code for
#: the types a frame holds, and resets its buffer when it raises.
_pack = msgpack.Packer(use_bin_type=True).pack

#: Largest ``length`` a decoder accepts by default: a 64 MiB value (the spill tier's big-item
#: path) plus its key, version set and msgpack overhead. A decoder may be built with a smaller
#: limit; an encoder refuses to build a frame over its limit.
MAX_FRAME = 64 * 1024 * 1024 + 64 * 1024

MAX_RID = 2**63 - 1

# DO NOT CHANGE: wire layout (message codes). Add new codes; never renumber or reuse one.
# -- client requests
PING = 1
GET = 2
PUT = 3
DELETE = 4
GET_MANY = 5
PUT_MANY = 6
INCR = 7
RING = 8
STATUS = 9
GET_VERSIONS = 10
# -- replica requests (coordinator -> replica)
REPLICA_GET = 32
REPLICA_PUT = 33  # merge the given version set into the replica's, answer the merged set
REPLICA_GET_MANY = 34
REPLICA_PUT_MANY = 35
REPLICA_COUNTER = 36  # merge the given PN-counter state, answer the merged state
# -- failure handling (issue 12): gossip, hinted handoff
GOSSIP = 37  # the sender's heartbeat view; the reply (OK) carries the receiver's: push-pull
HINT_PUT = 38  # keep this version set as a hint for ``owner`` (a down primary): sloppy quorum
AE_ROOTS = 39  # anti-entropy: the Merkle roots of the replica sets shared with ``from``
AE_CHILDREN = 40  # the 16 child hashes of each tree node ``idxs`` at ``level`` of ``range``
AE_LEAVES = 41  # the (key, digest) items of the leaves ``idxs`` of ``range``
# -- the configuration group (issue 13): Raft between the voters, configurations to every node
RAFT = 42  # Raft messages from ``from`` (raft/codec.py lists), one-way: the reply is a bare OK
CONFIG = 43  # this node's committed cluster configuration and Raft status (cluster status)
CONFIG_PUSH = 44  # a committed configuration, pushed by the leader to every member
CONFIG_CHANGE = 45  # propose a change (cluster_config.py command); forwarded to the leader
AE_SYNC = 46  # anti-entropy: merge these copies of differing keys, answer yours (push-pull)
AE_NOTIFY = 47  # a node's worker -> its anti-entropy owner: these store keys changed
LOAD = 48  # the node's load counters (autobalance.py): the OK reply has ops, bytes
AE_PULL = 49  # anti-entropy: stream your copies under these token spans of ``range``, from a cursor
# -- the success reply
OK = 64
# -- error replies
ERR_WRONG_EPOCH = 96
ERR_OVERLOADED = 97
ERR_QUORUM = 98
ERR_MAYBE_APPLIED = 99
ERR_CONFLICT = 100
ERR_BAD_REQUEST = 101
ERR_INTERNAL = 102

NAMES: dict[int, str] = {
    PING: "PING",
    GET: "GET",
    PUT: "PUT",
    DELETE: "DELETE",
    GET_MANY: "GET_MANY",
    PUT_MANY: "PUT_MANY",
    INCR: "INCR",
    RING: "RING",
    STATUS: "STATUS",
    GET_VERSIONS: "GET_VERSIONS",
    REPLICA_GET: "REPLICA_GET",
    REPLICA_PUT: "REPLICA_PUT",
    REPLICA_GET_MANY: "REPLICA_GET_MANY",
    REPLICA_PUT_MANY: "REPLICA_PUT_MANY",
    REPLICA_COUNTER: "REPLICA_COUNTER",
    GOSSIP: "GOSSIP",
    HINT_PUT: "HINT_PUT",
    AE_ROOTS: "AE_ROOTS",
    AE_CHILDREN: "AE_CHILDREN",
    AE_LEAVES: "AE_LEAVES",
    RAFT: "RAFT",
    CONFIG: "CONFIG",
    CONFIG_PUSH: "CONFIG_PUSH",
    CONFIG_CHANGE: "CONFIG_CHANGE",
    AE_SYNC: "AE_SYNC",
    AE_NOTIFY: "AE_NOTIFY",
    LOAD: "LOAD",
    AE_PULL: "AE_PULL",
    OK: "OK",
    ERR_WRONG_EPOCH: "ERR_WRONG_EPOCH",
    ERR_OVERLOADED: "ERR_OVERLOADED",
    ERR_QUORUM: "ERR_QUORUM",
    ERR_MAYBE_APPLIED: "ERR_MAYBE_APPLIED",
    ERR_CONFLICT: "ERR_CONFLICT",
    ERR_BAD_REQUEST: "ERR_BAD_REQUEST",
    ERR_INTERNAL: "ERR_INTERNAL",
}

REQUESTS = frozenset(c for c in NAMES if c < OK)
ERRORS = frozenset(c for c in NAMES if c > OK)

# A field check returns None when the value is acceptable, else what is wrong with it.
Check = Callable[[Any], "str | None"]


def _is(*types: type) -> Check:
    names = "/".join("None" if t is type(None) else t.__name__ for t in types)

    def check(v: Any) -> str | None:
        return None if isinstance(v, types) else f"is {type(v).__name__}, expected {names}"

    return check


def _int(v: Any) -> str | None:
    # bool is an int subclass; True for a count is a bug on the other side, not a 1
    return None if type(v) is int else f"is {type(v).__name__}, expected int"


def _any(v: Any) -> str | None:  # checked by another module's from_wire()
    return None


def _list_of(item: Check, what: str) -> Check:
    def check(v: Any) -> str | None:
        if type(v) is not list:
            return f"is {type(v).__name__}, expected a list of {what}"
        for i, x in enumerate(v):
            bad = item(x)
            if bad is not None:
                return f"item {i} {bad}"
        return None

    return check


def _pair(first: Check, second: Check) -> Check:
    def check(v: Any) -> str | None:
        if type(v) is not list or len(v) != 2:
            return "is not a [key, value] pair"
        return first(v[0]) or second(v[1])

    return check


def _level(v: Any) -> str | None:
    # W/R: a count, or a consistency level's name (levels.py judges which names exist)
    if type(v) is str:
        return None if 0 < len(v) <= 32 else "is not a consistency level name"
    return _int(v)


_B = _is(bytes)
_S = _is(str)
_I = _int
_L = _level
_OPT_B = _is(bytes, type(None))
_KEYS = _list_of(_B, "bytes")
_VALUES = _list_of(_OPT_B, "bytes/None")

#: code -> (required fields, optional fields), each field -> its check, on the values as
#: decoded (msgpack bin -> bytes, str -> str, array -> list, map -> dict). An optional field
#: may also be None (absent). ``epoch`` on a
#: request is the ring epoch the sender routed with; a node whose epoch differs answers
#: ERR_WRONG_EPOCH. Counts (r, w, n) and times (``timeout_ms``, ``ttl_ms``) are ints.
SCHEMA: dict[int, tuple[dict[str, Check], dict[str, Check]]] = {
    PING: ({}, {}),
    GET: ({"key": _B}, {"r": _L, "epoch": _I, "timeout_ms": _I}),
    GET_VERSIONS: ({"key": _B}, {"r": _L, "epoch": _I, "timeout_ms": _I}),
    PUT: (
        {"key": _B, "value": _B},
        # strict (issue 12): 1 = only primaries' acks count toward W (no hinted fallbacks)
        # ack: 1 = answer {} without the new version's context (RESP SET: nothing reads it)
        {"context": _B, "w": _L, "epoch": _I, "timeout_ms": _I, "ttl_ms": _I, "strict": _I, "ack": _I},
    ),
    DELETE: ({"key": _B}, {"context": _B, "w": _L, "epoch": _I, "timeout_ms": _I, "strict": _I}),
    GET_MANY: ({"keys": _KEYS}, {"r": _L, "epoch": _I, "timeout_ms": _I}),
    PUT_MANY: (
        {"items": _list_of(_pair(_B, _B), "[key, value] pairs")},
        {"w": _L, "epoch": _I, "timeout_ms": _I},
    ),
    INCR: ({"key": _B, "delta": _I}, {"w": _L, "epoch": _I, "timeout_ms": _I}),
    RING: ({}, {}),
    STATUS: ({}, {}),
    REPLICA_GET: ({"key": _B, "epoch": _I}, {}),
    # ack: 1 = answer {} instead of the merged set (a write's fan-out reads only that it is done)
    REPLICA_PUT: ({"key": _B, "versions": _any, "epoch": _I}, {"ttl_ms": _I, "ack": _I}),
    REPLICA_GET_MANY: ({"keys": _KEYS, "epoch": _I}, {}),
    REPLICA_PUT_MANY: (
        {"items": _list_of(_pair(_B, _any), "[key, versions] pairs"), "epoch": _I},
        {},
    ),
    REPLICA_COUNTER: ({"key": _B, "counter": _any, "epoch": _I}, {}),
    # view: [[name, generation, counter], ...], checked entry by entry by liveness.parse_view
    # reply: 1 on the answer of a one-way push (the simulator's machines; the daemon answers OK)
    GOSSIP: ({"from": _S, "view": _any}, {"reply": _I}),
    HINT_PUT: ({"key": _B, "versions": _any, "epoch": _I, "owner": _S}, {"ttl_ms": _I}),
    # hashes are 16 bytes; range, idxs checked by anti_entropy.py
    AE_ROOTS: ({"from": _S, "epoch": _I}, {}),
    AE_CHILDREN: ({"range": _any, "level": _I, "idxs": _any, "epoch": _I}, {}),
    # level: of the nodes idxs name (default: the receiver's leaves); a deeper tree answers the
    # items under each (trees grow with their range, merkle.py); from: the requester
    AE_LEAVES: ({"range": _any, "idxs": _any, "epoch": _I}, {"level": _I, "from": _S}),
    # msgs: raft/codec.py lists, checked by codec.decode; config: ClusterConfig.to_wire()
    RAFT: ({"from": _S, "msgs": _list_of(_is(list), "raft messages")}, {}),
    CONFIG: ({}, {}),
    CONFIG_PUSH: ({"config": _any}, {"from": _S}),
    # cmd: a cluster_config.py command map; hops: forwards so far (bounded, no loops)
    CONFIG_CHANGE: ({"cmd": _any}, {"hops": _I}),
    # items: [[store key, stored bytes | None, tombstone time | None], ...]; the OK reply
    # carries the receiver's copies after the merge, in the same form
    AE_SYNC: ({"from": _S, "range": _any, "items": _any, "epoch": _I}, {}),
    # keys: store keys (b"v"/b"c" + key) another worker of this node wrote; overflow: 1 when
    # the sender dropped some (the owner then rebuilds its trees from the store)
    AE_NOTIFY: ({"keys": _KEYS}, {"overflow": _I}),
    # reply: OK {"ops": store gets+puts+deletes so far, "bytes": bytes its items take in memory}
    LOAD: ({}, {}),
    # spans: [[first token, last token], ...] sorted, disjoint; after: [token, store key], the
    # cursor (exclusive); max: keys per reply. The OK reply: items as AE_SYNC's, and next: the
    # cursor to ask again from (None: done)
    AE_PULL: ({"from": _S, "range": _any, "spans": _any, "epoch": _I}, {"after": _any, "max": _I}),
    # OK fields depend on the request: value/values/context/versions/counter/ring/status...
    OK: ({}, {}),
    ERR_WRONG_EPOCH: ({"message": _S}, {"expected": _I, "got": _I}),
    ERR_OVERLOADED: ({"message": _S}, {}),
    ERR_QUORUM: ({"message": _S}, {"needed": _I, "answered": _I, "n": _I}),
    ERR_MAYBE_APPLIED: ({"message": _S}, {"needed": _I, "answered": _I, "n": _I}),
    ERR_CONFLICT: ({"message": _S}, {"values": _VALUES, "context": _B}),
    # "kind": the shmkv error class the node raised (KeyTooLarge, ConfigError...), re-raised as
    # that class by raise_for_error when this side knows it
    ERR_BAD_REQUEST: ({"message": _S}, {"kind": _S}),
    ERR_INTERNAL: ({"message": _S}, {"kind": _S}),
}


@dataclass(frozen=True, slots=True)
class Message:
    """One frame's contents. ``fields`` follows SCHEMA[code]; ``rid`` pairs replies with requests."""

    code: int
    rid: int
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_error(self) -> bool:
        return self.code in ERRORS

    def __repr__(self) -> str:
        return f"Message({NAMES.get(self.code, self.code)}, rid={self.rid}, {dict(self.fields)!r})"


#: The type each check passes without a look (bytes for _B, int for _I and _L, ...): _check
#: calls a field's check only for a value of another type -- every message is checked twice
#: (decoded and encoded), field by field. Per code, SCHEMA's (required, optional) as
#: (name, check, the type it passes) tuples.
_PASSES: dict[Check, type] = {_B: bytes, _S: str, _I: int, _L: int, _OPT_B: bytes}
_COMPILED: dict[int, tuple[tuple[tuple[str, Check, type | None], ...], ...]] = {
    code: tuple(tuple((n, c, _PASSES.get(c)) for n, c in part.items()) for part in parts)
    for code, parts in SCHEMA.items()
}


def _check(code: Any, rid: Any, fields: Any) -> None:
    """Raise ProtocolError unless (code, rid, fields) is a well-formed message."""
    # bool is an int subclass; True as a code or rid is a bug on the other side, not a 1.
    if type(code) is not int or code not in SCHEMA:
        raise ProtocolError(f"unknown message code {code!r}")
    if type(rid) is not int or not 0 <= rid <= MAX_RID:
        raise ProtocolError(f"request id {rid!r} is not an int in [0, 2**63)")
    if not isinstance(fields, dict):
        raise ProtocolError(f"{NAMES[code]}: fields are {type(fields).__name__}, not a map")
    required, optional = _COMPILED[code]
    for name, check, passes in required:
        if name not in fields:
            raise ProtocolError(f"{NAMES[code]}: missing field {name!r}")
        value = fields[name]
        if type(value) is not passes:
            bad = check(value)
            if bad is not None:
                raise ProtocolError(f"{NAMES[code]}: field {name!r} {bad}")
    for name, check, passes in optional:
        value = fields.get(name)
        if value is not None and type(value) is not passes:
            bad = check(value)
            if bad is not None:
                raise ProtocolError(f"{NAMES[code]}: field {name!r} {bad}")


def encode(msg: Message, *, max_frame: int = MAX_FRAME) -> bytes:
    """The frame (header + body) for ``msg``.

    :raises ProtocolError: the message does not follow SCHEMA, holds something msgpack cannot
        encode, or its frame would exceed ``max_frame`` (the peer would refuse it).
    """
    return encode_parts(msg.code, msg.rid, dict(msg.fields), max_frame=max_frame)


def encode_parts(
    code: int, rid: int, fields: dict[str, Any], *, max_frame: int = MAX_FRAME
) -> bytes:
    """:func:`encode` without building a :class:`Message` first (the transport's hot path)."""
    _check(code, rid, fields)
    try:
        body: bytes = _pack([code, rid, fields])
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"{NAMES[code]}: cannot encode fields: {e}") from None
    if len(body) + 1 > max_frame:
        raise ProtocolError(
            f"{NAMES[code]}: frame of {len(body) + 1} bytes exceeds the limit of {max_frame}"
        )
    return HEADER.pack(len(body) + 1, WIRE_VERSION) + body


def decode_body(body: bytes | bytearray | memoryview) -> Message:
    """The message in one frame's body (after the version byte).

    :raises ProtocolError: not one msgpack array ``[code, rid, fields]`` following SCHEMA.
    """
    try:
        obj = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 -- msgpack raises a zoo (ExtraData, FormatError,
        # StackError, ValueError, UnicodeDecodeError, TypeError...); all mean "malformed".
        raise ProtocolError(f"malformed frame body: {type(e).__name__}: {e}") from None
    if type(obj) is not list or len(obj) != 3:
        raise ProtocolError(f"frame body is not [code, rid, fields]: {type(obj).__name__}")
    code, rid, fields = obj
    _check(code, rid, fields)
    return Message(code, rid, fields)


class FrameDecoder:
    """Incremental decoder for one byte stream: ``feed(chunk) -> [Message, ...]``.

    Bytes may be split anywhere; a frame is decoded once all its bytes arrived. Work per call is
    linear in the bytes fed (each loop iteration consumes a whole frame or stops), so garbage
    can never make it spin.

    Invariant: ``self._buf`` never holds more than ``4 + max_frame`` bytes of an incomplete
    frame -- an oversized length is refused as soon as its 4 bytes are in.

    After a ProtocolError the stream's framing is lost (a bad length or version leaves no way
    to find the next frame), so the decoder stays failed: every later ``feed`` raises the same
    error, and the caller closes the connection. Messages decoded earlier in the failing call
    are dropped with it; their senders see the connection close, which for a write means "may
    have been applied" exactly as a timeout does.
    """

    __slots__ = ("_buf", "_max_frame", "_error")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max_frame = max_frame
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame that has not fully arrived."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Append ``data`` and return every message completed by it, in stream order.

        :raises ProtocolError: a frame longer than ``max_frame``, a zero length, an unknown
            version byte or a malformed body (and on every call after that).
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        if not buf and type(data) is bytes and len(data) >= 5 and LENGTH.unpack_from(data, 0)[0] + 4 == len(data):
            # The common read: exactly one whole frame, nothing held before it -- decoded
            # from ``data`` as it is, without going through the buffer (the same checks).
            length = len(data) - 4
            if length > self._max_frame:
                pass  # refused below, as any other frame
            elif data[4] != WIRE_VERSION:
                self._error = ProtocolError(f"wire version {data[4]}, this node speaks {WIRE_VERSION}")
                raise self._error
            else:
                try:
                    return [decode_body(data[5:])]
                except ProtocolError as e:
                    self._error = e
                    raise
        buf += data
        out: list[Message] = []
        pos = 0
        try:
            while len(buf) - pos >= 4:
                (length,) = LENGTH.unpack_from(buf, pos)
                if length == 0 or length > self._max_frame:
                    raise ProtocolError(f"frame length {length} outside [1, {self._max_frame}]")
                if len(buf) - pos >= 5 and buf[pos + 4] != WIRE_VERSION:
                    raise ProtocolError(
                        f"wire version {buf[pos + 4]}, this node speaks {WIRE_VERSION}"
                    )
                end = pos + 4 + length
                if len(buf) < end:
                    break
                # A copy, not a memoryview: a view still referenced by a traceback would make
                # the buffer unresizable (BufferError on the clear below).
                out.append(decode_body(buf[pos + 5 : end]))
                pos = end
        except ProtocolError as e:
            self._error = e
            buf.clear()
            raise
        del buf[:pos]
        return out


# -- errors <-> error replies -------------------------------------------------------------------


class Overloaded(ClusterError):
    """The node (or the connection to it) has too many requests in flight; retry later."""


class BadRequest(ClusterError, ValueError):
    """The peer refused the request as malformed (ERR_BAD_REQUEST)."""


class RemoteError(ClusterError):
    """The peer failed in a way it could not name (ERR_INTERNAL): a bug on that node."""


def error_reply(rid: int, exc: BaseException) -> Message:
    """The error reply that carries ``exc`` to the requester (``raise_for_error`` undoes it)."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, WrongEpoch):
        return Message(
            ERR_WRONG_EPOCH, rid, {"message": msg, "expected": exc.expected, "got": exc.got}
        )
    if isinstance(exc, MaybeApplied):  # before QuorumError: it is one
        return Message(
            ERR_MAYBE_APPLIED,
            rid,
            {"message": msg, "needed": exc.needed, "answered": exc.answered, "n": exc.n},
        )
    if isinstance(exc, QuorumError):
        return Message(
            ERR_QUORUM,
            rid,
            {"message": msg, "needed": exc.needed, "answered": exc.answered, "n": exc.n},
        )
    if isinstance(exc, Conflict):
        # The context travels as bytes: versions.py's Context encodes itself (``encode()``).
        ctx = exc.context
        if ctx is not None and not isinstance(ctx, bytes):
            ctx = ctx.encode() if callable(getattr(ctx, "encode", None)) else None
        return Message(
            ERR_CONFLICT, rid, {"message": msg, "values": list(exc.values), "context": ctx}
        )
    if isinstance(exc, Overloaded):
        return Message(ERR_OVERLOADED, rid, {"message": msg})
    if isinstance(exc, (ProtocolError, BadRequest)):
        return Message(ERR_BAD_REQUEST, rid, {"message": msg})
    if isinstance(exc, errors.Error) and isinstance(exc, (ValueError, TypeError)):
        # the caller's fault (a key too large, W > N...): its class crosses the wire by name
        return Message(ERR_BAD_REQUEST, rid, {"message": msg, "kind": type(exc).__name__})
    return Message(
        ERR_INTERNAL, rid, {"message": f"{type(exc).__name__}: {msg}", "kind": type(exc).__name__}
    )


def _known_error(kind: object) -> type[errors.Error] | None:
    """The shmkv error class named ``kind`` that takes just a message, if this side has it."""
    if not isinstance(kind, str):
        return None
    for module in (errors, cluster_errors):
        cls = getattr(module, kind, None)
        if (
            isinstance(cls, type)
            and issubclass(cls, errors.Error)
            and kind in getattr(module, "__all__", ())
        ):
            return cls
    return None


def raise_for_error(msg: Message) -> Message:
    """Return ``msg`` if it is not an error reply, else raise the exception it carries."""
    code = msg.code
    if code not in ERRORS:
        return msg
    f = msg.fields
    text = f["message"]
    if code == ERR_WRONG_EPOCH:
        raise WrongEpoch(text, expected=f.get("expected") or 0, got=f.get("got") or 0)
    if code == ERR_QUORUM:
        raise QuorumError(
            text, needed=f.get("needed") or 0, answered=f.get("answered") or 0, n=f.get("n") or 0
        )
    if code == ERR_MAYBE_APPLIED:
        raise MaybeApplied(
            text, needed=f.get("needed") or 0, answered=f.get("answered") or 0, n=f.get("n") or 0
        )
    if code == ERR_CONFLICT:
        raise Conflict(text, values=f.get("values") or (), context=f.get("context"))
    if code == ERR_OVERLOADED:
        raise Overloaded(text)
    cls = _known_error(f.get("kind"))
    if cls is not None and code == ERR_BAD_REQUEST:
        try:
            exc: Exception = cls(text)
        except TypeError:  # a class whose constructor needs more than a message
            exc = BadRequest(text)
        raise exc
    if code == ERR_BAD_REQUEST:
        raise BadRequest(text)
    raise RemoteError(text)


__all__ = [
    "WIRE_VERSION",
    "MAX_FRAME",
    "Message",
    "FrameDecoder",
    "encode",
    "encode_parts",
    "decode_body",
    "error_reply",
    "raise_for_error",
    "Overloaded",
    "BadRequest",
    "RemoteError",
    "SCHEMA",
    "NAMES",
]
