"""The daemon's Redis-protocol front (``shmkv serve --resp HOST:PORT``): RESP2 over TCP.

resp.py parses and encodes (no I/O); this file owns the socket and maps each command onto the
node's own request handler (:meth:`Node.handle <shmkv.cluster.coordinator.Node.handle>`) at the
cluster's default consistency (``--w``/``--r``), exactly as a request of the Python client that
names no W or R. The node coordinates keys it holds and forwards the others to a replica of the
key, so any node's RESP port serves every key.

    GET k          GET             -> the value; nil when absent or deleted
    SET k v [EX s | PX ms]         PUT without a context (supersedes what the coordinator holds)
    DEL k...       GET_VERSIONS, then DELETE with that context for each live key; the count of
                   keys that were live
    MGET k...      GET_MANY        -> an array (nil for absent keys)
    MSET k v ...   PUT_MANY        -> OK
    EXISTS k...    GET_MANY        -> how many of the keys have a live value (repeats count)
    TTL k, PTTL k  GET             -> -2 absent, -1 no expiry, else seconds / ms left
    INCR/INCRBY    INCR            -> the PN-counter's value (see "Counters" below)
    DBSIZE         this node's copies (keys and counters it holds, as ``cluster status``)
    PING, INFO, COMMAND, CONFIG GET, SELECT 0, CLIENT ..., QUIT: enough for redis-cli,
                   redis-benchmark and redis-py to start

Errors. A key with concurrent versions (siblings) answers ``-CONFLICT`` naming them (a plain
``SET`` through the key's coordinator supersedes them; the Python client resolves them with a
context). Quorum shortfalls answer ``-QUORUM`` (not applied) or ``-MAYBEAPPLIED`` (a write that
may have been applied: never reported as simply failed), a node that is starting or stopping
``-OVERLOADED``; a bad argument (an oversized value, an empty key) ``-ERR`` with the node's
message. resp.py's bad commands answer its Redis-style ``-ERR`` and the connection lives on; a
stream that is not RESP is answered once and that connection closed. Nothing a client sends
stops the daemon or another client.

Counters. ``INCR``/``INCRBY`` are PN-counters (crdt.py): a namespace of their own beside the
values, so concurrent increments through any nodes all count -- but ``GET k`` does not see the
counter ``k`` and ``SET k`` does not reset it; ``INCRBY k 0`` reads it. Rejected: a Redis-style
read-modify-write of the value (loses increments that meet at two coordinators).

TTL (``SET ... EX s`` / ``PX ms``): a PUT with ``ttl_ms``. The coordinator stores the absolute
expiry (its wall clock + the TTL, in ms) *inside* the new version (versions.py, "Expiry"), so
every copy, every read repair and every anti-entropy exchange carries the same expiry: a read
treats a version past it as absent, and each replica's Store entry expires a margin later to
reclaim memory (replica.py). Expiry is judged by each node's wall clock: skew between nodes
bounds how early or late a key vanishes. ``SET`` without EX/PX writes a version without expiry
(superseding one with it, as Redis's SET clears a TTL). Zero, negative or overflowing EX/PX
answer ``-ERR invalid expire time in 'set' command``, as Redis does.

Pipelining. The commands of a pipeline start in order -- each runs until its first wait on the
network before the next starts, so its effect on this node's copy (the coordinator's local read
or write) happens in order -- and their replies are written in order, as soon as every earlier
one is ready, many in one write (one flush per loop iteration). A connection stops being read
while 1024 of its replies wait, or while the socket's send buffer is full.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import logging
import os
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ..errors import Error
from . import resp, wire
from .errors import Conflict, MaybeApplied, QuorumError
from .resp import Command, CommandError
from .transport import split_addr, start_eager
from .wire import Message, Overloaded

if TYPE_CHECKING:
    from .coordinator import Node, _Read, _Write
    from .metrics import Metrics

log = logging.getLogger("shmkv.cluster.resp")

#: Replies one connection may have outstanding before it is no longer read (backpressure).
MAX_PIPELINE = 1024
READ_CHUNK = 256 * 1024
#: Redis version reported by INFO: clients gate features on it; we speak RESP2 of Redis 7.
REDIS_VERSION = "7.0.0"

_CLOSE = object()  # a queue marker: write everything before it, then close the connection

_SIMPLE_OK = b"+OK\r\n"
_PONG = b"+PONG\r\n"
_NIL = b"$-1\r\n"


class RespServer:
    """One RESP listener in front of ``node`` (one per daemon; not thread-safe: one loop)."""

    def __init__(
        self, node: Node, metrics: Metrics | None = None, *, max_pipeline: int = MAX_PIPELINE,
        reuse_port: bool = False,
    ) -> None:
        """``reuse_port``: bind with SO_REUSEPORT, so the K worker processes of a node
        (``--workers K``) all accept on the one ``--resp`` port and the kernel spreads the
        RESP connections over them, as it does the node's own port (transport.py)."""
        self.node = node
        self.reuse_port = reuse_port
        self.metrics = metrics
        self.max_pipeline = max_pipeline
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_RespConn] = set()
        self.started = time.time()
        self.connections_total = 0
        #: connections with replies to write, in the order they got them: written together
        #: once this loop iteration's reads are all handled (flush_soon)
        self._to_flush: list[_RespConn] = []
        self._flush_scheduled = False

    def flush_soon(self, conn: _RespConn) -> None:
        """Write ``conn``'s ready replies after every connection readable in this loop
        iteration has been read -- Redis's way (its replies go out in beforeSleep, not as each
        command is run). Written as each command ran, the replies to 50 clients left ~20 us
        apart, and each found the client's process asleep again: on these VMs waking another
        CPU is a hypervisor exit, ~10 us of this process's system time per reply. Written in
        one burst, the first wakes the client and the rest find it running (1-node SET: 35 ->
        18 us of CPU per request, README "Where the daemon's time goes")."""
        self._to_flush.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_all)

    def _flush_all(self) -> None:
        self._flush_scheduled = False
        conns, self._to_flush = self._to_flush, []
        for c in conns:
            c._flush()

    async def start(self, addr: str, reuse_port: bool = False) -> str:
        """Listen on ``addr``; returns the bound ``host:port``. :raises OSError: taken.

        ``reuse_port``: bind with SO_REUSEPORT, as every worker of a ``--workers K`` node does
        (the kernel spreads RESP connections over them, as it does the wire port's)."""
        host, port = split_addr(addr)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _RespConn(self), host, port, reuse_port=(reuse_port or self.reuse_port) or None
        )
        h, p = self._server.sockets[0].getsockname()[:2]
        return f"{h}:{p}"

    async def close(self) -> None:
        """Stop listening and close every client connection (their commands in flight still run
        to their own timeouts inside the node, which drains them)."""
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                pass

    # -- commands ----------------------------------------------------------------------------

    def execute(self, cmd: Command | CommandError) -> bytes | _NowReply | Coroutine[Any, Any, bytes]:
        """The reply to ``cmd``: bytes when it is known at once, a _NowReply (a GET or SET
        waiting for its quorum), else a coroutine that never raises an Exception (every error becomes a
        RESP error reply)."""
        if type(cmd) is CommandError:
            return resp.encode_error(cmd.message)
        assert isinstance(cmd, Command)
        name = cmd.name
        if name == "SET" or name == "GET":
            return self._now(cmd)
        if name in _NODE_COMMANDS:
            return self._run(cmd)
        if name == "PING":
            return _PONG if cmd.arg is None else resp.encode_reply(cmd.arg)
        if name == "DBSIZE":
            return b":%d\r\n" % self.node.replica.key_count(asyncio.get_running_loop().time())
        if name == "INFO":
            return resp.encode_reply(self.info(cmd.arg).encode())
        if name == "COMMAND":
            return _command(cmd)
        if name == "CLIENT":
            return _client(cmd)
        if name in ("SELECT", "QUIT"):
            return _SIMPLE_OK
        return resp.encode_error(f"ERR command '{name}' is not served here")

    def _now(self, cmd: Command) -> bytes | _NowReply | Coroutine[Any, Any, bytes]:
        """GET or SET begun without a coroutine (Node.get_now / put_now) when this node
        coordinates the key: its reply, or a _NowReply until it is decided. Else handle()'s
        path (_run)."""
        t0 = time.perf_counter()
        node = self.node
        op: _Write | _Read | _Refused | None
        try:
            if cmd.name == "SET":
                assert cmd.value is not None  # resp.parse: a SET always has its value
                op = node.put_now(cmd.keys[0], cmd.value, cmd.ttl_ms)
            else:
                op = node.get_now(cmd.keys[0])
        except Exception as e:  # noqa: BLE001 -- as in _run: the command's error reply
            op = _Refused(e)
        if op is None:
            return self._run(cmd)
        pending = _NowReply(self, cmd, op, t0)
        return pending.reply() if op.waiter is None else pending

    async def _run(self, cmd: Command) -> bytes:
        t0 = time.perf_counter()
        kind = None
        try:
            out = await self._node_command(cmd)
        except Exception as e:  # noqa: BLE001 -- every failure is this command's error reply
            out, kind = _error_reply(cmd, e)
        m = self.metrics
        if m is not None:
            m.observe_resp(cmd.name, time.perf_counter() - t0, kind)
        return out

    async def run_batch(self, cmds: list[Command]) -> list[bytes]:
        """A run of consecutive GETs (or SETs without EX/PX) of one pipeline as one GET_MANY
        (PUT_MANY): one coordination -- one replica request per replica -- for the whole run
        instead of one per key. The replies are per command (a key with siblings gets its own
        CONFLICT); a failure of the batch request (a quorum shortfall...) is every command's
        reply, and for a PUT_MANY that missed W it is MAYBEAPPLIED for every SET of the run."""
        t0 = time.perf_counter()
        name = cmds[0].name
        kind = None
        try:
            if name == "GET":
                reply = await self.node.handle(
                    Message(wire.GET_MANY, 0, {"keys": [c.keys[0] for c in cmds]})
                )
                out = []
                for c, (values, _ctx) in zip(cmds, reply.fields["results"], strict=True):
                    live = list(dict.fromkeys(v for v in values if v is not None))
                    if len(live) > 1 or (live and len(set(values)) > 1):
                        e = _KeyConflict(c.keys[0], list(dict.fromkeys(values)))
                        out.append(resp.encode_error(_conflict_message(c, e)))
                    elif live:
                        v = live[0]
                        out.append(b"$%d\r\n%s\r\n" % (len(v), v))
                    else:
                        out.append(_NIL)
            else:
                items = [[c.keys[0], c.value] for c in cmds]
                await self.node.handle(Message(wire.PUT_MANY, 0, {"items": items}))
                out = [_SIMPLE_OK] * len(cmds)
        except Exception as e:  # noqa: BLE001 -- as in _run
            err, kind = _error_reply(cmds[0], e)
            out = [err] * len(cmds)
        m = self.metrics
        if m is not None:
            dt = time.perf_counter() - t0
            for _ in cmds:
                m.observe_resp(name, dt, kind)
        return out

    async def _node_command(self, cmd: Command) -> bytes:
        handle = self.node.handle
        name = cmd.name
        if name == "GET":
            reply = await handle(Message(wire.GET, 0, {"key": cmd.keys[0]}))
            v = reply.fields["value"]
            return _NIL if v is None else b"$%d\r\n%s\r\n" % (len(v), v)
        if name == "SET":
            f: dict[str, Any] = {"key": cmd.keys[0], "value": cmd.value, "ack": 1}  # no context wanted
            if cmd.ttl_ms is not None:
                f["ttl_ms"] = cmd.ttl_ms
            await handle(Message(wire.PUT, 0, f))
            return _SIMPLE_OK
        if name == "MGET":
            results = await self._get_many(cmd.keys)
            out = []
            for key, (values, _ctx) in zip(cmd.keys, results, strict=True):
                live = list(dict.fromkeys(v for v in values if v is not None))
                if len(live) > 1 or (live and len(set(values)) > 1):
                    raise _KeyConflict(key, list(dict.fromkeys(values)))
                out.append(live[0] if live else None)
            return resp.encode_reply(out)
        if name in ("TTL", "PTTL"):
            # as Redis: -2 absent, -1 no expiry, else what is left (TTL rounds to seconds), by
            # this node's wall clock
            reply = await handle(Message(wire.GET, 0, {"key": cmd.keys[0]}))
            if reply.fields["value"] is None:
                return b":-2\r\n"
            expires = reply.fields.get("expires")
            if expires is None:
                return b":-1\r\n"
            left = max(0, expires - self.node.replica.now_ms())
            return b":%d\r\n" % (left if name == "PTTL" else (left + 500) // 1000)
        if name == "EXISTS":
            results = await self._get_many(cmd.keys)
            return b":%d\r\n" % sum(1 for values, _ in results if any(v is not None for v in values))
        if name == "MSET":
            await handle(Message(wire.PUT_MANY, 0, {"items": [list(kv) for kv in cmd.items]}))
            return _SIMPLE_OK
        if name in ("INCR", "INCRBY"):
            reply = await handle(Message(wire.INCR, 0, {"key": cmd.keys[0], "delta": cmd.delta}))
            return b":%d\r\n" % reply.fields["value"]
        if name == "DEL":
            # Read, then delete with what was read: the tombstone supersedes exactly the versions
            # counted, and a concurrent write it did not see survives as a sibling.
            count = 0
            for key in cmd.keys:
                got = await handle(Message(wire.GET_VERSIONS, 0, {"key": key}))
                if any(v is not None for v in got.fields["values"]):
                    await handle(Message(wire.DELETE, 0, {"key": key, "context": got.fields["context"]}))
                    count += 1
            return b":%d\r\n" % count
        raise AssertionError(name)  # _NODE_COMMANDS lists exactly the names above

    async def _get_many(self, keys: tuple[bytes, ...]) -> list[tuple[list[bytes | None], bytes]]:
        if len(keys) == 1:
            reply = await self.node.handle(Message(wire.GET_VERSIONS, 0, {"key": keys[0]}))
            return [(reply.fields["values"], reply.fields["context"])]
        reply = await self.node.handle(Message(wire.GET_MANY, 0, {"keys": list(keys)}))
        return [(r[0], r[1]) for r in reply.fields["results"]]

    # -- introspection -----------------------------------------------------------------------

    def info(self, section: bytes | None) -> str:
        node = self.node
        ring = node.ring
        cfg = node.config
        st = node.stats
        keys = node.replica.key_count(asyncio.get_running_loop().time())
        sections: dict[str, list[tuple[str, Any]]] = {
            "server": [
                ("redis_version", REDIS_VERSION),
                ("redis_mode", "standalone"),
                ("shmkv_node", cfg.name),
                ("process_id", os.getpid()),
                ("tcp_port", self._port()),
                ("uptime_in_seconds", int(time.time() - self.started)),
            ],
            "clients": [("connected_clients", len(self._conns))],
            "stats": [
                ("total_connections_received", self.connections_total),
                ("total_commands_processed", sum(st.requests.values())),
                ("quorum_failures", st.quorum_failures),
                ("maybe_applied", st.maybe_applied),
                ("read_repairs", st.read_repairs),
                ("forwarded", st.forwarded),
            ],
            "cluster": [
                ("cluster_enabled", 0),  # not Redis Cluster: any node serves any key
                ("shmkv_ring_epoch", ring.epoch if ring else 0),
                ("shmkv_members", ",".join(sorted(ring.members)) if ring else ""),
                ("shmkv_n", cfg.n), ("shmkv_w", cfg.w), ("shmkv_r", cfg.r),
                ("shmkv_suspects", ",".join(sorted(node.suspects))),
            ],
            "keyspace": [("db0", f"keys={keys},expires=0,avg_ttl=0")],
        }
        want = (section or b"default").decode("latin-1").lower()
        chosen = sections if want in ("default", "all", "everything") else {
            k: v for k, v in sections.items() if k == want
        }
        parts = []
        for title, rows in chosen.items():
            parts.append(f"# {title.capitalize()}\r\n" + "".join(f"{k}:{v}\r\n" for k, v in rows))
        return "\r\n".join(parts)

    def config_get(self, pattern: bytes) -> list[bytes]:
        """Flat [name, value, ...] of the parameters matching the glob ``pattern``: the few
        tools ask for at start (redis-benchmark: save, appendonly)."""
        cfg = self.node.config
        params = {
            "save": "", "appendonly": "no", "databases": "1", "maxmemory": "0",
            "maxmemory-policy": "allkeys-lru", "timeout": "0", "port": str(self._port()),
            "cluster-enabled": "no",
            "shmkv-n": str(cfg.n), "shmkv-w": str(cfg.w), "shmkv-r": str(cfg.r),
        }
        pat = pattern.decode("latin-1").lower()
        out: list[bytes] = []
        for k, v in params.items():
            if fnmatch.fnmatchcase(k, pat):
                out += [k.encode(), v.encode()]
        return out

    def _port(self) -> int:
        if self._server is None or not self._server.sockets:
            return 0
        return int(self._server.sockets[0].getsockname()[1])


def _error_reply(cmd: Command, e: Exception) -> tuple[bytes, str]:
    """The RESP error for a node request that failed, and its kind (for the metrics)."""
    if isinstance(e, Conflict):
        return resp.encode_error(_conflict_message(cmd, e)), "conflict"
    if isinstance(e, MaybeApplied):
        return resp.encode_error(f"MAYBEAPPLIED {e}"), "maybe_applied"
    if isinstance(e, QuorumError):
        return resp.encode_error(f"QUORUM {e}"), "quorum"
    if isinstance(e, Overloaded):
        return resp.encode_error(f"OVERLOADED {e}"), "overloaded"
    if isinstance(e, Error):  # a bad argument (ValueTooLarge, an empty key...), named by the node
        return resp.encode_error(f"ERR {e}"), "bad_request"
    log.error("RESP %s failed", cmd.name, exc_info=e)  # a bug: costs this command, not the daemon
    return resp.encode_error(f"ERR internal error: {type(e).__name__}: {e}"), "internal"


_NODE_COMMANDS = frozenset(
    {"GET", "SET", "MGET", "EXISTS", "MSET", "INCR", "INCRBY", "DEL", "TTL", "PTTL"}
)


class _KeyConflict(Conflict):
    """A conflict found by MGET, which knows the key (the node's GET names it in its text)."""

    def __init__(self, key: bytes, values: list[bytes | None]) -> None:
        super().__init__(f"{len(values)} concurrent versions", values=values)
        self.key = key


def _show(v: bytes | None) -> str:
    if v is None:
        return "(deleted)"
    s = v[:32].decode("utf-8", "replace")
    return repr(s) + ("..." if len(v) > 32 else "")


def _conflict_message(cmd: Command, e: Conflict) -> str:
    key = e.key if isinstance(e, _KeyConflict) else cmd.keys[0]
    where = f"key {_show(key)}"
    shown = ", ".join(_show(v) for v in e.values[:8]) + (", ..." if len(e.values) > 8 else "")
    return (
        f"CONFLICT {len(e.values)} concurrent versions of {where}: {shown}; SET the key "
        "to replace them, or resolve with the Python client (get_versions, put with the context)"
    )


def _command(cmd: Command) -> bytes:
    sub = cmd.arg
    if sub == b"COUNT":
        return b":%d\r\n" % (len(_NODE_COMMANDS) + 9)
    return b"*0\r\n"  # COMMAND, COMMAND DOCS, INFO: no docs; redis-cli then goes without hints


def _client(cmd: Command) -> bytes:
    sub = cmd.arg
    if sub in (b"SETNAME", b"SETINFO", b"REPLY", b"NO-EVICT", b"NO-TOUCH"):
        return _SIMPLE_OK
    if sub == b"GETNAME":
        return _NIL
    if sub == b"ID":
        return b":0\r\n"
    sub_s = (sub or b"").decode("latin-1")
    return resp.encode_error(f"ERR unknown subcommand '{sub_s}'. Try CLIENT SETNAME, GETNAME, ID.")


def _batchable_with(cmd: Command | CommandError, name: str) -> bool:
    return type(cmd) is Command and cmd.name == name and (name == "GET" or cmd.ttl_ms is None)


def _map(flat: list[Any]) -> bytes:
    """A RESP3 map of the flat [key, value, ...] list."""
    return b"%%%d\r\n" % (len(flat) // 2) + resp.encode_replies(flat)


# -- the connection --------------------------------------------------------------------------------


def _start(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run one command now (transport.start_eager): its reply (bytes, or a batch's list) when
    it never waits -- a 1-node or R=1/W=1 request answered from the local copy -- else a Task
    that goes on from its first wait. Either way the commands of a pipeline run their first
    steps (the coordinator's local read or write) in request order.

    An earlier measurement of an eager start found no gain while the coordinator spawned a
    Task of its own per request (read repair, the fan-out's drain); with those gone (the
    coordinator's _FanOut) a command that never waits costs no Task, no wake-up and no second
    flush at all.
    """
    done, result = start_eager(coro)
    return result if done else _Pending(result)


class _Refused:
    """A SET refused before anything was written (Node.put_now raised): decided at once."""

    __slots__ = ("error",)
    waiter = None

    def __init__(self, error: Exception) -> None:
        self.error = error

    def result(self) -> None:
        raise self.error


class _NowReply:
    """A GET or SET begun by Node.get_now / put_now: its reply once ``op.waiter`` is None or
    done (what _node_command answers for its outcome; the metrics observed as _run observes
    them)."""

    __slots__ = ("server", "cmd", "op", "t0")

    def __init__(self, server: RespServer, cmd: Command, op: Any, t0: float) -> None:
        self.server = server
        self.cmd = cmd
        self.op = op
        self.t0 = t0

    def reply(self) -> bytes:
        kind = None
        cmd = self.cmd
        try:
            got = self.op.result()
            if cmd.name == "SET":
                out = _SIMPLE_OK
            else:
                v = self.server.node.get_answer(cmd.keys[0], got)["value"]
                out = _NIL if v is None else b"$%d\r\n%s\r\n" % (len(v), v)
        except Exception as e:  # noqa: BLE001 -- every failure is this command's error reply
            out, kind = _error_reply(cmd, e)
        m = self.server.metrics
        if m is not None:
            m.observe_resp(cmd.name, time.perf_counter() - self.t0, kind)
        return out


class _Pending:
    """A command still running: its Task (a marker type, so a reply that is a list -- a
    batch's -- is never mistaken for one)."""

    __slots__ = ("task",)

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task


class _RespConn(asyncio.Protocol):
    """One client connection. Invariant: ``_queue`` holds this connection's replies in request
    order -- bytes (ready), futures (in flight) or the ``_CLOSE`` marker -- and a ready head
    is written by :meth:`_flush` at once."""

    def __init__(self, server: RespServer) -> None:
        self.server = server
        self.parser = resp.RespParser()
        self.transport: asyncio.Transport | None = None
        self._queue: collections.deque[Any] = collections.deque()
        self._write_paused = False
        self._read_paused = False
        self._closing = False
        self._flush_soon = False
        self.proto = 2  # HELLO 3 switches it: the replies that differ (HELLO, CONFIG GET) follow

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.server._conns.add(self)
        self.server.connections_total += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)
        self._closing = True
        self._queue.clear()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        queue = self._queue
        execute = self.server.execute
        cmds = self.parser.feed(data)
        i, n = 0, len(cmds)
        while i < n:
            cmd = cmds[i]
            j = i
            if type(cmd) is Command and (cmd.name == "GET" or cmd.name == "SET" and cmd.ttl_ms is None):
                while j + 1 < n and _batchable_with(cmds[j + 1], cmd.name):
                    j += 1
            if j > i:  # a run of GETs (SETs): one batched node request, one reply each
                got = _start(self.server.run_batch(cmds[i : j + 1]))  # type: ignore[arg-type]
                if type(got) is _Pending:
                    got.task.add_done_callback(self._on_done)
                    queue.extend((got.task, k) for k in range(j + 1 - i))
                else:
                    queue.extend(got)
                i = j + 1
                continue
            i += 1
            if type(cmd) is Command and cmd.name in ("HELLO", "CONFIG GET"):
                reply: Any = self._per_protocol(cmd)
            else:
                reply = execute(cmd)
            if type(reply) is _NowReply:
                reply.op.waiter.add_done_callback(self._on_done)
            elif type(reply) is not bytes:
                reply = _start(reply)
                if type(reply) is _Pending:
                    reply = reply.task
                    reply.add_done_callback(self._on_done)
            queue.append(reply)
            if type(cmd) is CommandError and cmd.fatal or type(cmd) is Command and cmd.name == "QUIT":
                queue.append(_CLOSE)
                self._closing = True
                break
        self._on_done(None)  # written with every connection's, at the end of this iteration

    def _per_protocol(self, cmd: Command) -> bytes:
        """HELLO and CONFIG GET, whose replies are maps in RESP3.

        RESP3 is spoken only as far as clients need it: after ``HELLO 3`` the HELLO and
        CONFIG GET replies are maps; every other reply is RESP2's (bulk, integer, ``$-1`` for
        nil, arrays), which RESP3 parsers read too -- redis-py 8 opens with ``HELLO 3``.
        """
        if cmd.name == "CONFIG GET":
            params = self.server.config_get(cmd.arg or b"")
            return _map(list(params)) if self.proto == 3 else resp.encode_reply(params)
        if cmd.arg is not None and cmd.arg not in (b"2", b"3"):
            return resp.encode_error("NOPROTO unsupported protocol version")
        if any(a.upper() == b"AUTH" for a in cmd.args):
            return resp.encode_error("ERR AUTH is not supported: this server has no users")
        if cmd.arg is not None:
            self.proto = int(cmd.arg)
        flat: list[Any] = [
            b"server", b"shmkv", b"version", REDIS_VERSION.encode(), b"proto", self.proto,
            b"id", self.server.connections_total, b"mode", b"standalone", b"role", b"master",
            b"modules", [],
        ]
        return _map(flat) if self.proto == 3 else resp.encode_reply(flat)

    def _on_done(self, _fut: asyncio.Future[bytes] | None) -> None:
        # One flush per loop iteration, not per reply: the replies of a pipeline that complete
        # together (their replica answers arrived in one read) go out in one write, and the
        # replies to every connection go out together (RespServer.flush_soon).
        if not self._flush_soon and self.transport is not None and not self.transport.is_closing():
            self._flush_soon = True
            self.server.flush_soon(self)

    def _flush(self) -> None:
        self._flush_soon = False
        queue = self._queue
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        out = []
        close = False
        while queue:
            head = queue[0]
            if type(head) is bytes:
                out.append(head)
            elif head is _CLOSE:
                close = True
                queue.clear()
                break
            elif type(head) is tuple:  # (batch task, index of this command's reply)
                task, k = head
                if not task.done():
                    break
                try:
                    out.append(task.result()[k])
                except BaseException:  # noqa: BLE001 -- cancelled at shutdown
                    out.append(resp.encode_error("ERR command cancelled: the node is stopping"))
            elif type(head) is _NowReply:
                if not head.op.waiter.done():
                    break
                try:
                    out.append(head.reply())
                except BaseException:  # noqa: BLE001 -- cancelled at shutdown
                    out.append(resp.encode_error("ERR command cancelled: the node is stopping"))
            elif head.done():
                try:
                    out.append(head.result())
                except BaseException:  # noqa: BLE001 -- cancelled at shutdown
                    out.append(resp.encode_error("ERR command cancelled: the node is stopping"))
            else:
                break
            queue.popleft()
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            transport.close()
            return
        self._update_reading()

    def _update_reading(self) -> None:
        assert self.transport is not None
        want_pause = self._write_paused or len(self._queue) >= self.server.max_pipeline
        if want_pause and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
        elif not want_pause and self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


__all__ = ["RespServer", "MAX_PIPELINE"]
