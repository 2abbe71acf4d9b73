"""The client's synchronous network path (sync_transport.py + the routing rules in client.py)
against scripted fake nodes: real sockets on 127.0.0.1, each node a thread that answers RING
with a ring of the fake nodes and every other request the way the test says -- a good reply, no
reply (a stopped node), garbage, half a frame, a hang-up. No daemons: each test takes well
under a second.

What these pin down: a request returns within its timeout with the error type that says what
may have happened (MaybeApplied for a write that left whole, QuorumError for one that never
did); a read goes on to the next node of the preference list; a broken or garbled connection is
closed and never reused; a connection the node closed while idle is replaced before a request
is written into it; many threads share one client.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.ring import Member, Ring
from shmkv.cluster.sync_transport import Pool
from shmkv.cluster.transport import RequestTimeout, Unreachable
from shmkv.cluster.versions import Context
from shmkv.cluster.wire import Message

from .local_cluster import run_threads

TIMEOUT = 0.2  # the client's; one attempt at a node is bounded by twice that

# What a fake node does with a request: a reply Message, a Then, or one of these.
SILENT = "silent"  # read it, never answer (a SIGSTOPped node, as its socket sees it)
HANG_UP = "hang up"  # read it, close the connection
Behaviour = Callable[[Message], Any]


class Then:
    """Write ``data`` (raw bytes), then hang up when ``close``."""

    def __init__(self, data: bytes, close: bool) -> None:
        self.data, self.close = data, close


def ok_versions(msg: Message) -> Message:
    """A node that holds b"v" for every key and acknowledges every write."""
    ctx = Context({"n1": 1}).encode()
    if msg.code in (wire.GET_VERSIONS, wire.GET):
        return Message(wire.OK, msg.rid, {"values": [b"v"], "context": ctx})
    if msg.code == wire.GET_MANY:
        return Message(wire.OK, msg.rid, {"results": [[[b"v"], ctx] for _ in msg.fields["keys"]]})
    if msg.code == wire.PUT_MANY:
        return Message(wire.OK, msg.rid, {})
    return Message(wire.OK, msg.rid, {"context": ctx})


class FakeNode:
    """One fake node: accepts on 127.0.0.1, one thread per connection, answers RING itself."""

    def __init__(self, name: str, behave: Behaviour = ok_versions) -> None:
        self.name = name
        self.behave = behave
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.ring: Ring | None = None
        self.connections = 0
        self.requests: list[Message] = []
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            self.connections += 1
            self.conns.append(s)
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s: socket.socket) -> None:
        dec = wire.FrameDecoder()
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    return
                for msg in dec.feed(data):
                    if msg.code == wire.RING:
                        assert self.ring is not None
                        s.sendall(wire.encode(Message(wire.OK, msg.rid, {"ring": self.ring.to_wire(), "n": len(self.ring)})))
                        continue
                    self.requests.append(msg)
                    out = self.behave(msg)
                    if out == SILENT:
                        continue
                    if out == HANG_UP:
                        return
                    if isinstance(out, Then):
                        s.sendall(out.data)
                        if out.close:
                            return
                        continue
                    s.sendall(wire.encode(out))
        except OSError:
            return
        finally:
            s.close()

    def drop_connections(self) -> None:
        """Close every accepted connection (the node restarted between two requests)."""
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.conns.clear()

    def close(self) -> None:
        self._stop = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)  # wakes the accept (a bare close may not)
        except OSError:
            pass
        self.lsock.close()
        self.drop_connections()


@pytest.fixture
def nodes() -> Iterator[Callable[..., list[FakeNode]]]:
    made: list[FakeNode] = []

    def make(*behaviours: Behaviour) -> list[FakeNode]:
        ns = [FakeNode(f"n{i + 1}", b) for i, b in enumerate(behaviours)]
        ring = Ring([Member(n.name, n.addr, 1.0) for n in ns], 1, vnodes_per_weight=16)
        for n in ns:
            n.ring = ring
        made.extend(ns)
        return ns

    yield make
    for n in made:
        n.close()


def _client(ns: list[FakeNode], **kw: Any) -> shmkv.Client:
    kw.setdefault("timeout", TIMEOUT)
    return shmkv.connect([n.addr for n in ns], n=len(ns), w=kw.pop("w", 1), r=kw.pop("r", 1), **kw)


def _key_first_at(c: shmkv.Client, name: str) -> bytes:
    """A key whose coordinator (first of its preference list) is ``name``."""
    assert c.ring is not None
    for i in range(10_000):
        k = b"k%d" % i
        if c.ring.preference_list(k, c.n)[0] == name:
            return k
    raise AssertionError("no such key")


def _elapsed(fn: Callable[[], Any]) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


# -- the happy path ---------------------------------------------------------------------------


def test_requests_reuse_one_connection_per_thread(nodes: Callable[..., list[FakeNode]]) -> None:
    (n1,) = nodes(ok_versions)
    with _client([n1]) as c:
        for i in range(50):
            assert c.get(b"k%d" % i) == b"v"
            c.put(b"k%d" % i, b"x")
        assert n1.connections == 1  # the RING fetch's connection carried all 100 requests


def test_one_frame_per_request_encoded_once_and_compatible(nodes: Callable[..., list[FakeNode]]) -> None:
    (n1,) = nodes(ok_versions)
    with _client([n1]) as c:
        c.put(b"k", b"v", ttl=1.5, strict=True)
    (put,) = n1.requests
    assert put.code == wire.PUT
    assert put.fields["key"] == b"k" and put.fields["value"] == b"v" and put.fields["ttl_ms"] == 1500
    assert put.fields["strict"] == 1 and put.fields["epoch"] == 1 and put.fields["timeout_ms"] == 200


# -- timeouts ---------------------------------------------------------------------------------


def test_a_silent_coordinator_makes_a_write_maybe_applied_within_the_timeout(
    nodes: Callable[..., list[FakeNode]],
) -> None:
    ns = nodes(lambda m: SILENT, ok_versions)
    with _client(ns) as c:
        k = _key_first_at(c, "n1")
        t0 = time.monotonic()
        with pytest.raises(shmkv.MaybeApplied, match="may have been applied"):
            c.put(k, b"v")
        assert time.monotonic() - t0 < 2 * TIMEOUT + 0.3
        assert not ns[1].requests  # a write that left is never re-sent to another node


def test_a_silent_coordinator_makes_a_read_go_to_the_next_node(nodes: Callable[..., list[FakeNode]]) -> None:
    ns = nodes(lambda m: SILENT, ok_versions)
    with _client(ns) as c:
        k = _key_first_at(c, "n1")
        assert _elapsed(lambda: c.get(k)) < 2 * TIMEOUT + 0.3
        assert c.get(k) == b"v"
        assert _elapsed(lambda: c.get(k)) < TIMEOUT  # n1 is a suspect now: n2 first


def test_every_node_silent_is_a_quorum_error_bounded_by_the_preference_list(
    nodes: Callable[..., list[FakeNode]],
) -> None:
    ns = nodes(lambda m: SILENT, lambda m: SILENT)
    with _client(ns) as c:
        t0 = time.monotonic()
        with pytest.raises(shmkv.QuorumError, match="no coordinator") as e:
            c.get(b"k")
        assert not isinstance(e.value, shmkv.MaybeApplied)
        assert time.monotonic() - t0 < 2 * (2 * TIMEOUT) + 0.4


# -- broken and garbled connections -----------------------------------------------------------


def first_then_ok(first: Any) -> Behaviour:
    """The first request gets ``first``; every later one a good reply."""
    seen: list[Message] = []

    def behave(m: Message) -> Any:
        seen.append(m)
        return first if len(seen) == 1 else ok_versions(m)

    return behave


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(Then(b"\x00\x00\x00\x09\x01garbage!", False), id="garbage body"),
        pytest.param(Then(b"\xff\xff\xff\xff\x01", False), id="oversized length"),
        pytest.param(Then(b"\x00\x00\x00\x05\x07abcd", False), id="unknown version"),
        pytest.param(Then(b"\x00\x00\x01\x00\x01" + b"x" * 20, True), id="half a frame, then hang-up"),
        pytest.param(Then(b"", True), id="hang-up"),
        pytest.param(Then(wire.encode(Message(wire.OK, 12345, {})), False), id="reply to another request"),
    ],
)
def test_a_garbled_reply_closes_the_connection_and_a_write_is_maybe_applied(
    nodes: Callable[..., list[FakeNode]], first: Then
) -> None:
    (n1,) = nodes(first_then_ok(first))
    with _client([n1]) as c:
        t0 = time.monotonic()
        with pytest.raises(shmkv.MaybeApplied, match="may have been applied"):
            c.put(b"k", b"v")
        assert time.monotonic() - t0 < 2 * TIMEOUT + 0.3
        before = n1.connections
        assert c.get(b"k") == b"v"  # on a new connection: the garbled one was closed
        assert n1.connections == before + 1


def test_a_garbled_reply_to_a_read_goes_to_the_next_node(nodes: Callable[..., list[FakeNode]]) -> None:
    ns = nodes(first_then_ok(Then(b"\x00\x00\x00\x03\x01\xc1\xc1", False)), ok_versions)
    with _client(ns) as c:
        k = _key_first_at(c, "n1")
        assert c.get(k) == b"v"
        assert len(ns[1].requests) == 1


def test_a_connection_the_node_closed_while_idle_is_replaced_not_written_into(
    nodes: Callable[..., list[FakeNode]],
) -> None:
    (n1,) = nodes(ok_versions)
    with _client([n1]) as c:
        c.put(b"k", b"v")
        n1.drop_connections()  # the node restarted between the calls
        time.sleep(0.05)
        c.put(b"k", b"v2")  # not MaybeApplied: the dead connection was noticed before the write
        assert n1.connections == 2


def test_a_refused_node_is_skipped_for_writes_too(nodes: Callable[..., list[FakeNode]]) -> None:
    ns = nodes(ok_versions, ok_versions)
    with _client(ns) as c:
        k = _key_first_at(c, "n1")
        ns[0].close()  # connections refused from now on: nothing can have been sent
        c.put(k, b"v")  # n2 coordinates
        assert [m.code for m in ns[1].requests] == [wire.PUT]


def test_an_error_reply_keeps_the_connection(nodes: Callable[..., list[FakeNode]]) -> None:
    (n1,) = nodes(first_then_ok(Message(wire.ERR_QUORUM, 0, {"message": "1 of 2 answered", "needed": 2, "answered": 1, "n": 3})))
    with _client([n1]) as c:
        n1.behave = _with_rid(n1.behave)
        with pytest.raises(shmkv.QuorumError, match="1 of 2 answered") as e:
            c.put(b"k", b"v")
        assert not isinstance(e.value, shmkv.MaybeApplied) and e.value.needed == 2
        c.put(b"k", b"v")
        assert n1.connections == 1


def _with_rid(behave: Behaviour) -> Behaviour:
    """Replies carry the request's rid (the scripted ones are written with rid 0)."""

    def out(m: Message) -> Any:
        r = behave(m)
        return Message(r.code, m.rid, r.fields) if isinstance(r, Message) else r

    return out


# -- batches, siblings, threads -----------------------------------------------------------------


def test_batches_go_to_every_coordinator_at_once(nodes: Callable[..., list[FakeNode]]) -> None:
    slow = 0.1

    def slow_ok(m: Message) -> Any:
        time.sleep(slow)
        return ok_versions(m)

    ns = nodes(slow_ok, slow_ok, slow_ok)
    with _client(ns) as c:
        keys = [b"b%d" % i for i in range(30)]
        t0 = time.monotonic()
        assert c.get_many(keys) == {k: b"v" for k in keys}
        assert time.monotonic() - t0 < 2 * slow + 0.1  # one round, not three
        assert sorted(m.code for n in ns for m in n.requests) == [wire.GET_MANY] * 3


def test_a_batch_whose_coordinator_is_silent_is_maybe_applied(nodes: Callable[..., list[FakeNode]]) -> None:
    ns = nodes(lambda m: SILENT, ok_versions)
    with _client(ns) as c:
        with pytest.raises(shmkv.MaybeApplied):
            c.put_many({b"p%d" % i: b"v" for i in range(20)})


def test_a_batch_whose_coordinator_is_refused_is_rerouted_key_by_key(nodes: Callable[..., list[FakeNode]]) -> None:
    ns = nodes(ok_versions, ok_versions)
    with _client(ns) as c:
        keys = [b"g%d" % i for i in range(20)]
        ns[0].close()
        assert c.get_many(keys) == {k: b"v" for k in keys}
        c.put_many({k: b"v" for k in keys})


def test_siblings_over_the_network_raise_conflict_or_resolve(nodes: Callable[..., list[FakeNode]]) -> None:
    ctx = Context({"n1": 1, "n2": 1}).encode()

    def siblings(m: Message) -> Any:
        if m.code == wire.GET_VERSIONS:
            return Message(wire.OK, m.rid, {"values": [b"a", b"b"], "context": ctx})
        return ok_versions(m)

    (n1,) = nodes(siblings)
    with _client([n1]) as c:
        with pytest.raises(shmkv.Conflict) as e:
            c.get(b"k")
        assert sorted(e.value.values) == [b"a", b"b"] and e.value.context == Context.decode(ctx)
    with _client([n1], resolve=lambda vs: max(vs)) as c:
        assert c.get(b"k") == b"b"
        assert n1.requests[-1].code == wire.PUT and n1.requests[-1].fields["context"] == ctx


def test_many_threads_share_one_client(nodes: Callable[..., list[FakeNode]]) -> None:
    def echo(m: Message) -> Any:  # answers every read with its own key: a crossed reply shows
        if m.code == wire.GET_VERSIONS:
            return Message(wire.OK, m.rid, {"values": [m.fields["key"]], "context": Context().encode()})
        return ok_versions(m)

    ns = nodes(echo, echo)
    with _client(ns) as c:

        def work(t: int) -> None:
            for i in range(150):
                k = b"t%d-%d" % (t, i)
                assert c.get(k) == k
                c.put(k, b"x")

        errors = run_threads(work, 16, timeout=30)
        assert not errors, errors[:3]
        # each thread had its own connection while it was in flight, at most one per thread
        assert sum(n.connections for n in ns) <= 2 + 16 * 2


def test_a_closed_client_refuses_requests(nodes: Callable[..., list[FakeNode]]) -> None:
    (n1,) = nodes(ok_versions)
    c = _client([n1])
    c.close()
    with pytest.raises(shmkv.Error, match="closed"):
        c.get(b"k")


# -- the pool on its own -------------------------------------------------------------------------


def test_the_pool_maps_failures_to_the_transport_errors(nodes: Callable[..., list[FakeNode]]) -> None:
    silent, good = nodes(lambda m: SILENT, _with_rid(ok_versions))
    pool = Pool()
    frame = wire.encode(Message(wire.GET_VERSIONS, 9, {"key": b"k"}))
    with pytest.raises(RequestTimeout):
        pool.request(silent.addr, 9, frame, 0.1)
    port = socket.create_server(("127.0.0.1", 0))
    dead = f"127.0.0.1:{port.getsockname()[1]}"
    port.close()
    with pytest.raises(Unreachable) as e:
        pool.request(dead, 9, frame, 0.1)
    assert e.value.sent is False
    assert pool.request(good.addr, 9, frame, 1.0).code == wire.OK
    got = pool.fan_out([(silent.addr, 9, frame), (dead, 9, frame), (good.addr, 9, frame)], 0.2)
    assert isinstance(got[0], RequestTimeout) and isinstance(got[1], Unreachable)
    assert isinstance(got[2], Message) and got[2].code == wire.OK
    pool.close()


def test_a_large_reply_is_read_whole(nodes: Callable[..., list[FakeNode]]) -> None:
    big = b"z" * (1 << 20)

    def large(m: Message) -> Any:
        if m.code == wire.GET_VERSIONS:
            return Message(wire.OK, m.rid, {"values": [big], "context": Context().encode()})
        return ok_versions(m)

    (n1,) = nodes(large)
    with _client([n1], timeout=2.0) as c:
        assert c.get(b"k") == big
        assert c.get(b"k") == big  # the connection is still in step
        assert n1.connections == 1
