"""RESP2 (the Redis protocol) for the daemon's ``--resp`` front: parse requests, encode replies.

No I/O: ``RespParser.feed(bytes) -> [Command | CommandError, ...]``; resp_server.py owns the
socket. Enough of Redis for ``redis-cli``, ``redis-benchmark`` and redis-py:

    PING [msg]   GET k   SET k v [EX s | PX ms]   DEL k...   MGET k...   MSET k v [k v ...]
    EXISTS k...  TTL k  PTTL k  INCR k  INCRBY k n   DBSIZE   INFO [section]   COMMAND [...]   CONFIG GET pat
    QUIT         SELECT 0   CLIENT sub [args]   HELLO [protover ...]

Requests
--------
A request is either a multibulk array (``*<n>\\r\\n`` then n ``$<len>\\r\\n<bytes>\\r\\n``, what
every client library sends) or an inline line (``PING\\r\\n``, what telnet and
``redis-benchmark``'s ``*_INLINE`` tests send). The first byte of each request decides, as in
Redis's ``processInputBuffer``.

Multibulk arrays are parsed by ``hiredis.Reader`` (C, the parser redis-py uses). A Reader parses
*replies* and has no "bytes consumed" counter, so to hand the stream back for an inline request
we re-encode every parsed request canonically (``hiredis.pack_command``, C) and compare it with
the bytes it came from: while they match we know exactly where the next request starts. A client
that frames non-canonically (``+GET`` elements, leading zeros) still parses; it only cannot
switch to inline until hiredis' buffer drains. The rejected alternative, a Python scanner that
finds each request's end first, costs a Python loop per argument -- hiredis exists so pipelines
(``redis-benchmark -P 16``) do not pay that.

Errors
------
Every bad *command* (unknown, wrong arity, a non-integer where one is needed, a bad ``SET``
option) becomes a :class:`CommandError` in the output, in order: the server answers it with
``-ERR ...`` and keeps the connection, like Redis. A bad *stream* (not RESP, an array longer
than :data:`MAX_ARGS`, a request bigger than :data:`MAX_REQUEST`, an inline line longer than
:data:`MAX_INLINE`) is a CommandError with ``fatal=True``, always the last item; the parser then
ignores further input and the server answers and closes, as Redis does for protocol errors.

Limits: the top-level array length is checked before hiredis allocates the list; a nested array
(never valid in a request) is allocated by hiredis up to its own bound of 2**32-1 entries
before we refuse it -- lazily zeroed memory, freed when the connection closes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import hiredis

from .versions import MAX_TTL_MS

#: Largest multibulk request (all its bytes). A 64 MiB value plus slack, as for wire.MAX_FRAME.
MAX_REQUEST = 64 * 1024 * 1024 + 64 * 1024
#: Most arguments in one request (Redis allows more; a million keys in one MGET is a mistake).
MAX_ARGS = 1024 * 1024
#: Longest inline line (Redis: PROTO_INLINE_MAX_SIZE).
MAX_INLINE = 64 * 1024

_STAR = ord("*")


class Command(NamedTuple):
    """One parsed request (immutable). Fields unused by a command keep their defaults.

    A NamedTuple rather than a frozen dataclass: one is built per request, and a frozen
    dataclass's ``__init__`` sets each of its 8 fields through ``object.__setattr__``.

    name   upper-case command name ("GET", "CONFIG GET" for CONFIG's sub-command)
    keys   GET: (k,); DEL/MGET/EXISTS: all keys; SET/INCR/INCRBY: (k,)
    value  SET's value
    ttl_ms SET's EX/PX converted to milliseconds (None: no expiry)
    delta  INCR: 1; INCRBY: n
    items  MSET's (key, value) pairs
    arg    PING's message, INFO's section, CONFIG GET's pattern, COMMAND's and CLIENT's
           sub-command (upper-case), SELECT's db
    args   CLIENT's arguments after the sub-command (``CLIENT SETNAME n``: ``(b"n",)``)
    """

    name: str
    keys: tuple[bytes, ...] = ()
    value: bytes | None = None
    ttl_ms: int | None = None
    delta: int = 0
    items: tuple[tuple[bytes, bytes], ...] = ()
    arg: bytes | None = None
    args: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class CommandError:
    """A request that cannot be served: answer ``-<message>``; ``fatal``: then close."""

    message: str
    fatal: bool = False


class RespParser:
    """Incremental request parser for one connection (not thread-safe; one per connection).

    Invariant: when ``_reading`` is false, ``_buf`` starts at a request boundary; when it is true
    and ``_aligned``, ``_buf`` holds exactly the bytes hiredis has not returned as requests yet,
    so ``_buf[0]`` is the first byte of the request hiredis is working on.
    """

    __slots__ = (
        "_buf", "_reader", "_reading", "_aligned", "_checked", "_failed", "_max_request", "_dirty",
    )

    def __init__(self, max_request: int = MAX_REQUEST) -> None:
        self._buf = bytearray()
        self._reader = hiredis.Reader()
        # the Reader holds bytes it was fed but never returned (an inline request followed):
        # a fresh one is needed before the next multibulk. Otherwise it is reused (one Reader
        # per connection, not one per request).
        self._dirty = False
        self._reading = False
        self._aligned = True
        self._checked = False  # the current multibulk header passed the MAX_ARGS check
        self._failed = False
        self._max_request = max_request

    def feed(self, data: bytes | bytearray | memoryview) -> list[Command | CommandError]:
        """Parse what ``data`` completes. Never raises for bad input (see the module docstring)."""
        if self._failed:
            return []
        if self._reading:
            self._reader.feed(bytes(data))
            if self._aligned:
                self._buf += data
        else:
            self._buf += data
        out: list[Command | CommandError] = []
        while True:
            if not self._reading:
                if not self._buf:
                    break
                if self._buf[0] != _STAR:
                    if not self._inline(out):
                        break
                    continue
                if self._dirty:
                    self._reader = hiredis.Reader()
                    self._dirty = False
                self._reader.feed(self._buf)  # type: ignore[arg-type]  # any buffer (its stub: bytes); hiredis copies it
                self._reading, self._aligned, self._checked = True, True, False
            if not self._multibulk(out):
                break
        if out and isinstance(out[-1], CommandError) and out[-1].fatal:
            self._failed = True
            self._buf.clear()
        return out

    def _fail(self, out: list[Command | CommandError], why: str) -> bool:
        out.append(CommandError(f"ERR Protocol error: {why}", fatal=True))
        return False

    def _inline(self, out: list[Command | CommandError]) -> bool:
        """Consume one inline line from ``_buf``; False when there is no whole line yet."""
        buf = self._buf
        nl = buf.find(b"\n", 0, MAX_INLINE + 1)
        if nl < 0:
            if len(buf) > MAX_INLINE:
                return self._fail(out, "too big inline request")
            return False
        line = bytes(buf[:nl]).rstrip(b"\r")
        del buf[: nl + 1]
        try:
            args = split_inline(line)
        except ValueError as e:
            return self._fail(out, str(e))
        if args:  # empty lines are ignored, as by Redis
            out.append(parse_command(args))
        return True

    def _multibulk(self, out: list[Command | CommandError]) -> bool:
        """Take one request from hiredis; False when it needs more bytes (or failed)."""
        buf = self._buf
        if self._aligned and not self._checked:
            end = buf.find(b"\r\n", 0, 24)
            if end < 0 and len(buf) >= 24:
                return self._fail(out, "invalid multibulk length")
            if end >= 0:
                try:
                    n = int(buf[1:end])
                except ValueError:
                    return self._fail(out, "invalid multibulk length")
                if n > MAX_ARGS:
                    return self._fail(out, f"invalid multibulk length {n} (limit {MAX_ARGS})")
                self._checked = True
        try:
            req = self._reader.gets()
        except hiredis.ProtocolError as e:
            return self._fail(out, str(e))
        if req is False:
            # reader.len() is the unparsed rest plus at most 1 KiB hiredis has not compacted yet
            if self._reader.len() > self._max_request:
                return self._fail(out, f"request larger than {self._max_request} bytes")
            return False
        if type(req) is not list:
            return self._fail(out, "expected an array of bulk strings")
        for a in req:
            if type(a) is not bytes:
                return self._fail(out, "expected an array of bulk strings")
        done = not self._reader.has_data()
        if self._aligned and not done:  # (done: _buf is cleared below whatever it holds)
            canon = hiredis.pack_command(tuple(req)) if req else b"*0\r\n"
            if buf.startswith(canon):
                del buf[: len(canon)]
            else:
                self._aligned = False  # non-canonical framing: stop tracking until hiredis drains
                buf.clear()
        if req:  # "*0\r\n" is ignored, as by Redis
            out.append(parse_command(req))
        self._checked = False
        if done:
            # hiredis consumed every byte it was given, so _buf is at a boundary again
            self._reading = False
            buf.clear()
        elif self._aligned and buf and buf[0] != _STAR:
            self._reading = False  # an inline request follows: hiredis cannot parse it
            self._dirty = True
        return True


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline request like Redis' ``sdssplitargs``: spaces separate, "double quotes"
    take ``\\n \\r \\t \\b \\a \\\\ \\" \\xHH`` escapes, 'single quotes' take ``\\'``.

    :raises ValueError: unbalanced quotes, or a closing quote not followed by a space.
    """
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \t\r\n\v\f":
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        q = line[i]
        if q in b"\"'":
            i += 1
            while True:
                if i >= n:
                    raise ValueError("unbalanced quotes in request")
                c = line[i]
                if q == 0x22 and c == 0x5C and i + 1 < n:  # backslash in "..."
                    e = line[i + 1]
                    if e == 0x78 and i + 3 < n and _ishex(line[i + 2 : i + 4]):
                        cur.append(int(line[i + 2 : i + 4], 16))
                        i += 4
                        continue
                    cur += _ESCAPES.get(e, bytes([e]))
                    i += 2
                    continue
                if q == 0x27 and c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    cur.append(0x27)
                    i += 2
                    continue
                if c == q:
                    i += 1
                    if i < n and line[i] not in b" \t\r\n\v\f":
                        raise ValueError("unbalanced quotes in request")
                    break
                cur.append(c)
                i += 1
        else:
            while i < n and line[i] not in b" \t\r\n\v\f":
                cur.append(line[i])
                i += 1
        args.append(bytes(cur))


_ESCAPES = {0x6E: b"\n", 0x72: b"\r", 0x74: b"\t", 0x62: b"\b", 0x61: b"\a"}


def _ishex(b: bytes) -> bool:
    return len(b) == 2 and all(c in b"0123456789abcdefABCDEF" for c in b)


# -- commands -------------------------------------------------------------------------------------

_NOT_INT = "ERR value is not an integer or out of range"


def _arity(name: str) -> CommandError:
    return CommandError(f"ERR wrong number of arguments for '{name.lower()}' command")


def _int(b: bytes) -> int | None:
    """Redis' string2ll: optional '-', digits, no spaces or '+', fits in a signed 64-bit int."""
    if not b or len(b) > 20 or not (b.isdigit() or (b[:1] == b"-" and b[1:].isdigit())):
        return None
    if len(b) > 1 and b[0] == 0x30 or b[:2] == b"-0":  # leading zeros, "-0"
        return None
    v = int(b)
    return v if -(2**63) <= v < 2**63 else None


def parse_command(args: list[bytes]) -> Command | CommandError:
    """The Command for one request's arguments (``args[0]`` is the name, any case)."""
    name = args[0].upper().decode("latin-1")
    rest = args[1:]
    n = len(rest)
    if name == "GET":
        return Command("GET", keys=(rest[0],)) if n == 1 else _arity(name)
    if name == "SET":
        return _parse_set(rest)
    if name in ("TTL", "PTTL"):
        return Command(name, keys=(rest[0],)) if n == 1 else _arity(name)
    if name in ("DEL", "MGET", "EXISTS"):
        return Command(name, keys=tuple(rest)) if n >= 1 else _arity(name)
    if name == "MSET":
        if n == 0 or n % 2:
            return _arity(name)
        return Command("MSET", items=tuple(zip(rest[::2], rest[1::2], strict=True)))
    if name == "INCR":
        return Command("INCR", keys=(rest[0],), delta=1) if n == 1 else _arity(name)
    if name == "INCRBY":
        if n != 2:
            return _arity(name)
        d = _int(rest[1])
        return CommandError(_NOT_INT) if d is None else Command("INCRBY", keys=(rest[0],), delta=d)
    if name == "PING":
        if n > 1:
            return _arity(name)
        return Command("PING", arg=rest[0] if n else None)
    if name == "DBSIZE":
        return Command("DBSIZE") if n == 0 else _arity(name)
    if name == "INFO":
        return Command("INFO", arg=rest[0] if n else None)  # INFO a b: sections, first wins
    if name == "COMMAND":
        return Command("COMMAND", arg=rest[0].upper() if n else None)
    if name == "CONFIG":
        if n == 0:
            return _arity(name)
        sub = rest[0].upper()
        if sub != b"GET":
            return CommandError(f"ERR unknown subcommand '{_show(rest[0])}'. Try CONFIG GET.")
        return Command("CONFIG GET", arg=rest[1]) if n == 2 else _arity("config|get")
    if name == "SELECT":
        if n != 1:
            return _arity(name)
        db = _int(rest[0])
        if db is None:
            return CommandError(_NOT_INT)
        return (
            Command("SELECT", arg=rest[0])
            if db == 0
            else CommandError("ERR DB index is out of range")
        )
    if name == "QUIT":
        return Command("QUIT")
    if name == "HELLO":  # redis-py >= 8 opens with HELLO 3
        return Command("HELLO", arg=rest[0] if n else None, args=tuple(rest[1:]))
    if name == "CLIENT":  # redis-py sends CLIENT SETINFO / SETNAME on connect
        if n == 0:
            return _arity(name)
        return Command("CLIENT", arg=rest[0].upper(), args=tuple(rest[1:]))
    shown = " ".join(f"'{_show(a)}'" for a in rest[:8])
    return CommandError(
        f"ERR unknown command '{_show(args[0])}', with args beginning with: {shown}"
    )


def _parse_set(rest: list[bytes]) -> Command | CommandError:
    if len(rest) < 2:
        return _arity("SET")
    ttl_ms: int | None = None
    i = 2
    while i < len(rest):
        opt = rest[i].upper()
        if opt in (b"EX", b"PX") and ttl_ms is None and i + 1 < len(rest):
            t = _int(rest[i + 1])
            if t is None:
                return CommandError(_NOT_INT)
            ms = t * 1000 if opt == b"EX" else t
            if t <= 0 or ms > MAX_TTL_MS:  # as Redis: zero, negative or overflowing
                return CommandError("ERR invalid expire time in 'set' command")
            ttl_ms = ms
            i += 2
        else:
            return CommandError("ERR syntax error")
    return Command("SET", keys=(rest[0],), value=rest[1], ttl_ms=ttl_ms)


def _show(b: bytes) -> str:
    """An argument as Redis echoes it in an error: at most 128 characters, no newlines."""
    s = b[:128].decode("utf-8", "replace")
    return s.replace("\r", " ").replace("\n", " ")


# -- replies --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Simple:
    """A simple-string reply (``+OK``); plain ``bytes`` encode as bulk strings."""

    text: str


OK = Simple("OK")
PONG = Simple("PONG")


def encode_error(message: str) -> bytes:
    """``-message\\r\\n``; newlines in ``message`` would end it early, so they become spaces."""
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace") + b"\r\n"


def encode_reply(value: Any) -> bytes:
    """RESP2 for a reply: bytes -> bulk, None -> null bulk, int -> integer, Simple -> simple
    string, CommandError -> error, list/tuple -> array of those.

    :raises TypeError: anything else (a bug in the server, not bad input).
    """
    out = bytearray()
    _encode_into(out, value)
    return bytes(out)


def _encode_into(out: bytearray, v: Any) -> None:
    t = type(v)
    if t is bytes or t is bytearray or t is memoryview:
        out += b"$%d\r\n" % len(v)
        out += v
        out += b"\r\n"
    elif v is None:
        out += b"$-1\r\n"
    elif t is int:
        out += b":%d\r\n" % v
    elif t is Simple:
        out += b"+" + v.text.replace("\r", " ").replace("\n", " ").encode("utf-8") + b"\r\n"
    elif t is CommandError:
        out += encode_error(v.message)
    elif t is list or t is tuple:
        out += b"*%d\r\n" % len(v)
        for item in v:
            _encode_into(out, item)
    else:
        raise TypeError(f"cannot encode {t.__name__} as RESP")


def encode_command(*args: bytes | str | int) -> bytes:
    """A request as clients send it (a multibulk array): for tests and tools."""
    # hiredis' stub types the argument as a 1-tuple; it takes any number of arguments
    return bytes(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]


def encode_replies(values: Iterable[Any]) -> bytes:
    """Several replies back to back (a pipeline's answers in one write)."""
    out = bytearray()
    for v in values:
        _encode_into(out, v)
    return bytes(out)


__all__ = [
    "MAX_REQUEST",
    "MAX_ARGS",
    "MAX_INLINE",
    "Command",
    "CommandError",
    "RespParser",
    "parse_command",
    "split_inline",
    "Simple",
    "OK",
    "PONG",
    "encode_reply",
    "encode_replies",
    "encode_error",
    "encode_command",
]
