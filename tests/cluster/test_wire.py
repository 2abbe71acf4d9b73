"""wire.py: frames round-trip, survive any split of the byte stream, and garbage only ever
raises ProtocolError (never hangs, never another exception)."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmkv.cluster import wire
from shmkv.cluster.errors import Conflict, MaybeApplied, ProtocolError, QuorumError, WrongEpoch
from shmkv.cluster.wire import FrameDecoder, Message
from shmkv.errors import InvalidArgument, KeyTooLarge

rids = st.integers(min_value=0, max_value=wire.MAX_RID)
keys = st.binary(min_size=1, max_size=64)
values = st.binary(max_size=300)


def _requests() -> st.SearchStrategy[Message]:
    return st.one_of(
        st.builds(lambda r: Message(wire.PING, r, {}), rids),
        st.builds(lambda r, k: Message(wire.GET, r, {"key": k}), rids, keys),
        st.builds(
            lambda r, k, v, w, e: Message(wire.PUT, r, {"key": k, "value": v, "w": w, "epoch": e}),
            rids,
            keys,
            values,
            st.integers(1, 5),
            st.integers(0, 2**40),
        ),
        st.builds(
            lambda r, k, c: Message(wire.DELETE, r, {"key": k, "context": c}), rids, keys, values
        ),
        st.builds(lambda r, ks: Message(wire.GET_MANY, r, {"keys": ks}), rids, st.lists(keys)),
        st.builds(
            lambda r, items: Message(wire.PUT_MANY, r, {"items": [list(i) for i in items]}),
            rids,
            st.lists(st.tuples(keys, values)),
        ),
        st.builds(
            lambda r, k, d: Message(wire.INCR, r, {"key": k, "delta": d}),
            rids,
            keys,
            st.integers(-(2**63), 2**63 - 1),
        ),
        st.builds(
            lambda r, k, vs, e: Message(
                wire.REPLICA_PUT, r, {"key": k, "versions": vs, "epoch": e}
            ),
            rids,
            keys,
            st.lists(
                st.tuples(
                    st.none() | values, st.dictionaries(st.text(max_size=8), st.integers(0, 2**32))
                )
            ).map(lambda xs: [[v, c] for v, c in xs]),
            st.integers(0, 2**32),
        ),
        st.builds(lambda r, m: Message(wire.ERR_OVERLOADED, r, {"message": m}), rids, st.text()),
        st.builds(lambda r, v: Message(wire.OK, r, {"value": v}), rids, st.none() | values),
    )


@given(_requests())
def test_message_round_trips(msg: Message) -> None:
    frame = wire.encode(msg)
    assert FrameDecoder().feed(frame) == [msg]


@given(st.lists(_requests(), max_size=8), st.data())
@settings(max_examples=200)
def test_stream_split_at_arbitrary_points_decodes_the_same_messages(msgs, data) -> None:
    stream = b"".join(wire.encode(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    dec = FrameDecoder()
    got: list[Message] = []
    prev = 0
    for c in [*cuts, len(stream)]:
        got += dec.feed(stream[prev:c])
        prev = c
    assert got == msgs
    assert dec.buffered == 0


@given(st.binary(max_size=2000), st.integers(1, 64))
@settings(max_examples=500)
def test_garbage_raises_only_protocol_error_and_never_hangs(garbage: bytes, step: int) -> None:
    dec = FrameDecoder(max_frame=1 << 16)
    try:
        for i in range(0, len(garbage), step):
            for m in dec.feed(garbage[i : i + step]):
                assert isinstance(m, Message)
    except ProtocolError:
        with pytest.raises(ProtocolError):  # stays failed: framing is lost
            dec.feed(wire.encode(Message(wire.PING, 1, {})))
    # Invariant: never holds more than one incomplete frame's bytes
    assert dec.buffered <= 4 + (1 << 16)


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_valid_frame_around_garbage_body_raises_protocol_error_or_decodes(body: bytes) -> None:
    frame = struct.pack(">IB", len(body) + 1, wire.WIRE_VERSION) + body
    try:
        msgs = FrameDecoder().feed(frame)
    except ProtocolError:
        return
    assert len(msgs) == 1 and msgs[0].code in wire.SCHEMA


def test_oversized_length_is_refused_after_four_bytes() -> None:
    dec = FrameDecoder(max_frame=1000)
    with pytest.raises(ProtocolError, match="frame length 1001"):
        dec.feed(struct.pack(">I", 1001))
    assert dec.buffered == 0


def test_zero_length_frame_is_refused() -> None:
    with pytest.raises(ProtocolError, match="frame length 0"):
        FrameDecoder().feed(b"\0\0\0\0")


def test_bad_version_is_refused_before_the_body_arrives() -> None:
    with pytest.raises(ProtocolError, match="wire version 2"):
        FrameDecoder().feed(struct.pack(">IB", 100, 2))


def test_http_request_on_the_port_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize(
    "body, match",
    [
        ([wire.GET, 1], "not \\[code, rid, fields\\]"),
        ([200, 1, {}], "unknown message code 200"),
        ([True, 1, {}], "unknown message code True"),
        ([wire.GET, -1, {"key": b"k"}], "request id -1"),
        ([wire.GET, 1, {}], "missing field 'key'"),
        ([wire.GET, 1, {"key": "text"}], "field 'key' is str, expected bytes"),
        ([wire.PUT, 1, {"key": b"k", "value": b"v", "w": True}], "field 'w' is bool"),
        ([wire.GET, 1, []], "fields are list"),
        ([wire.GET_MANY, 1, {"keys": [b"a", 7]}], "field 'keys' item 1 is int, expected bytes"),
        ([wire.GET_MANY, 1, {"keys": b"a"}], "field 'keys' is bytes, expected a list of bytes"),
        ([wire.PUT_MANY, 1, {"items": [[b"k", b"v"], [b"k"]]}], "item 1 is not a \\[key, value\\]"),
        ([wire.PUT_MANY, 1, {"items": [[b"k", "v"]]}], "item 0 is str, expected bytes"),
        ([wire.REPLICA_PUT_MANY, 1, {"items": [["k", []]], "epoch": 1}], "item 0 is str"),
        ([wire.ERR_CONFLICT, 1, {"message": "m", "values": [b"a", 1]}], "item 1 is int"),
        ({"a": 1}, "not \\[code, rid, fields\\]"),
    ],
)
def test_malformed_bodies_name_the_problem(body: object, match: str) -> None:
    raw = msgpack.packb(body, use_bin_type=True)
    frame = struct.pack(">IB", len(raw) + 1, wire.WIRE_VERSION) + raw
    with pytest.raises(ProtocolError, match=match):
        FrameDecoder().feed(frame)


def test_trailing_bytes_inside_a_frame_are_malformed() -> None:
    raw = msgpack.packb([wire.PING, 1, {}]) + b"\x00"
    with pytest.raises(ProtocolError, match="malformed"):
        FrameDecoder().feed(struct.pack(">IB", len(raw) + 1, wire.WIRE_VERSION) + raw)


def test_unknown_extra_fields_are_ignored_for_forward_compatibility() -> None:
    msg = Message(wire.GET, 7, {"key": b"k", "hint": "new"})
    assert FrameDecoder().feed(wire.encode(msg)) == [msg]


def test_encoder_refuses_what_the_decoder_would_refuse() -> None:
    with pytest.raises(ProtocolError, match="missing field 'value'"):
        wire.encode(Message(wire.PUT, 1, {"key": b"k"}))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        wire.encode(Message(wire.PUT, 1, {"key": b"k", "value": b"x" * 2000}), max_frame=1000)
    with pytest.raises(ProtocolError, match="cannot encode"):
        wire.encode(Message(wire.OK, 1, {"value": object()}))


@pytest.mark.parametrize(
    "exc",
    [
        WrongEpoch("epoch 3, you sent 2", expected=3, got=2),
        QuorumError("1 of 2 replicas answered", needed=2, answered=1, n=3),
        MaybeApplied("1 of 2 acked before the deadline", needed=2, answered=1, n=3),
        Conflict("2 siblings", values=[b"a", None], context=b"ctx"),
        wire.Overloaded("256 requests in flight"),
        wire.BadRequest("no"),
    ],
)
def test_errors_survive_the_wire_with_their_type_and_numbers(exc: Exception) -> None:
    reply = FrameDecoder().feed(wire.encode(wire.error_reply(9, exc)))[0]
    assert reply.rid == 9 and reply.is_error
    with pytest.raises(type(exc)) as got:
        wire.raise_for_error(reply)
    assert type(got.value) is type(exc)
    assert str(got.value) == str(exc)
    for attr in ("expected", "got", "needed", "answered", "n", "values", "context"):
        if hasattr(exc, attr):
            assert getattr(got.value, attr) == getattr(exc, attr)


def test_an_unexpected_exception_becomes_an_internal_error() -> None:
    reply = wire.error_reply(1, KeyError("boom"))
    with pytest.raises(wire.RemoteError, match="KeyError"):
        wire.raise_for_error(reply)


def test_ok_reply_passes_through_raise_for_error() -> None:
    ok = Message(wire.OK, 3, {"value": b"v"})
    assert wire.raise_for_error(ok) is ok


def test_codes_are_stable() -> None:
    # DO NOT CHANGE: a renumbered code silently misroutes messages between versions.
    assert (wire.WIRE_VERSION, wire.PING, wire.GET, wire.PUT, wire.DELETE) == (1, 1, 2, 3, 4)
    assert (wire.REPLICA_GET, wire.REPLICA_PUT, wire.OK, wire.ERR_WRONG_EPOCH) == (32, 33, 64, 96)
    assert wire.encode(Message(wire.PING, 1, {})) == b"\x00\x00\x00\x05\x01\x93\x01\x01\x80"


@pytest.mark.parametrize(
    "exc", [KeyTooLarge("key of 300 bytes > 250"), InvalidArgument("W=4 > N=3")]
)
def test_a_callers_shmkv_error_comes_back_as_its_own_class(exc: Exception) -> None:
    reply = FrameDecoder().feed(wire.encode(wire.error_reply(5, exc)))[0]
    assert reply.code == wire.ERR_BAD_REQUEST and reply.fields["kind"] == type(exc).__name__
    with pytest.raises(type(exc), match=str(exc)):
        wire.raise_for_error(reply)


def test_an_unknown_or_hostile_kind_is_a_plain_bad_request() -> None:
    for kind in ("NoSuchError", "SystemExit", "Message", "__class__"):
        reply = Message(wire.ERR_BAD_REQUEST, 1, {"message": "m", "kind": kind})
        with pytest.raises(wire.BadRequest):
            wire.raise_for_error(reply)


def test_version_sets_counters_and_contexts_cross_the_wire_intact() -> None:
    from shmkv.cluster.crdt import PNCounter
    from shmkv.cluster.versions import Context, VersionSet

    a = VersionSet().put(b"v1", None, "node-a")
    b = a.put(b"v2", a.context, "node-b").merge(a.put(b"v3", a.context, "node-c"))
    counter = PNCounter().increment("node-a", 5).increment("node-b", -2)
    msgs = [
        Message(wire.REPLICA_PUT, 1, {"key": b"k", "versions": b.to_wire(), "epoch": 3}),
        Message(wire.REPLICA_COUNTER, 2, {"key": b"c", "counter": counter.to_wire(), "epoch": 3}),
    ]
    got = FrameDecoder().feed(b"".join(wire.encode(m) for m in msgs))
    assert VersionSet.from_wire(got[0].fields["versions"]) == b
    assert PNCounter.from_wire(got[1].fields["counter"]) == counter
    # a Conflict's Context travels encoded; the receiver decodes it back
    reply = wire.error_reply(3, Conflict("2 siblings", values=b.values, context=b.context))
    with pytest.raises(Conflict) as e:
        wire.raise_for_error(FrameDecoder().feed(wire.encode(reply))[0])
    assert Context.decode(e.value.context) == b.context
    assert sorted(e.value.values) == sorted(b.values)
