"""resp.py: RESP2 requests parsed into Commands (multibulk through hiredis, inline by hand),
bad commands answered as errors without killing the connection, any split of a pipeline."""

from __future__ import annotations

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmkv.cluster import resp
from shmkv.cluster.resp import Command, CommandError, RespParser, encode_command


def parse(data: bytes) -> list[Command | CommandError]:
    return RespParser().feed(data)


def test_multibulk_get_and_set_with_ttl() -> None:
    got = parse(encode_command("GET", b"k") + encode_command("set", b"k", b"v", "EX", 10))
    assert got == [
        Command("GET", keys=(b"k",)),
        Command("SET", keys=(b"k",), value=b"v", ttl_ms=10_000),
    ]


def test_set_px_and_bad_options() -> None:
    assert parse(encode_command("SET", "k", "v", "px", 5))[0] == Command(
        "SET", keys=(b"k",), value=b"v", ttl_ms=5
    )
    assert parse(encode_command("SET", "k", "v", "EX", "ten")) == [
        CommandError("ERR value is not an integer or out of range")
    ]
    assert parse(encode_command("SET", "k", "v", "EX", 0)) == [
        CommandError("ERR invalid expire time in 'set' command")
    ]
    for opt, t in (("PX", 0), ("EX", -1), ("PX", 2**62 + 1), ("EX", 2**62 // 1000 + 1)):
        assert parse(encode_command("SET", "k", "v", opt, t)) == [
            CommandError("ERR invalid expire time in 'set' command")
        ], (opt, t)
    assert parse(encode_command("SET", "k", "v", "PX", 2**62)) == [
        Command("SET", keys=(b"k",), value=b"v", ttl_ms=2**62)
    ]
    assert parse(encode_command("PTTL", "k")) == [Command("PTTL", keys=(b"k",))]
    assert parse(encode_command("TTL", "k", "j")) == [
        CommandError("ERR wrong number of arguments for 'ttl' command")
    ]
    assert parse(encode_command("SET", "k", "v", "EX", 1, "PX", 2)) == [
        CommandError("ERR syntax error")
    ]
    assert parse(encode_command("SET", "k", "v", "NX")) == [CommandError("ERR syntax error")]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["PING"], Command("PING")),
        (["ping", "hi"], Command("PING", arg=b"hi")),
        (["DEL", "a", "b"], Command("DEL", keys=(b"a", b"b"))),
        (["MGET", "a", "b"], Command("MGET", keys=(b"a", b"b"))),
        (["EXISTS", "a"], Command("EXISTS", keys=(b"a",))),
        (["MSET", "a", "1", "b", "2"], Command("MSET", items=((b"a", b"1"), (b"b", b"2")))),
        (["INCR", "c"], Command("INCR", keys=(b"c",), delta=1)),
        (["INCRBY", "c", "-5"], Command("INCRBY", keys=(b"c",), delta=-5)),
        (["DBSIZE"], Command("DBSIZE")),
        (["INFO"], Command("INFO")),
        (["INFO", "server"], Command("INFO", arg=b"server")),
        (["COMMAND"], Command("COMMAND")),
        (["command", "docs"], Command("COMMAND", arg=b"DOCS")),
        (["CONFIG", "get", "save"], Command("CONFIG GET", arg=b"save")),
        (["SELECT", "0"], Command("SELECT", arg=b"0")),
        (["QUIT"], Command("QUIT")),
        (["client", "setname", "w1"], Command("CLIENT", arg=b"SETNAME", args=(b"w1",))),
    ],
)
def test_commands(args: list[str], expected: Command) -> None:
    assert parse(encode_command(*args)) == [expected]


@pytest.mark.parametrize(
    "args, message",
    [
        (["GET"], "ERR wrong number of arguments for 'get' command"),
        (["GET", "a", "b"], "ERR wrong number of arguments for 'get' command"),
        (["SET", "a"], "ERR wrong number of arguments for 'set' command"),
        (["DEL"], "ERR wrong number of arguments for 'del' command"),
        (["MSET", "a", "1", "b"], "ERR wrong number of arguments for 'mset' command"),
        (["INCRBY", "c", "1.5"], "ERR value is not an integer or out of range"),
        (["INCRBY", "c", "99999999999999999999"], "ERR value is not an integer or out of range"),
        (["INCRBY", "c", " 1"], "ERR value is not an integer or out of range"),
        (["DBSIZE", "x"], "ERR wrong number of arguments for 'dbsize' command"),
        (["CONFIG", "SET", "a", "b"], "ERR unknown subcommand 'SET'. Try CONFIG GET."),
        (["SELECT", "1"], "ERR DB index is out of range"),
        (["FLUSHALL", "x\ny"], "ERR unknown command 'FLUSHALL', with args beginning with: 'x y'"),
    ],
)
def test_bad_commands_become_errors_and_the_connection_lives(args: list[str], message: str) -> None:
    p = RespParser()
    assert p.feed(encode_command(*args)) == [CommandError(message)]
    assert p.feed(encode_command("PING")) == [Command("PING")]


def test_inline_commands_with_quotes() -> None:
    got = parse(b"SET k \"a b\\x41\\n\"\r\nGET k\n\r\n   \r\nset 'it\\'s' v ex 2\r\n")
    assert got == [
        Command("SET", keys=(b"k",), value=b"a bA\n"),
        Command("GET", keys=(b"k",)),
        Command("SET", keys=(b"it's",), value=b"v", ttl_ms=2000),
    ]


def test_inline_unbalanced_quotes_is_fatal() -> None:
    p = RespParser()
    got = p.feed(b'GET "k\r\nPING\r\n')
    assert got == [CommandError("ERR Protocol error: unbalanced quotes in request", fatal=True)]
    assert p.feed(b"PING\r\n") == []  # stays failed; the server closes


def test_mixed_inline_and_multibulk_in_one_chunk() -> None:
    data = (
        encode_command("GET", "a")
        + b"PING\r\n"
        + encode_command("GET", "b")
        + encode_command("GET", "c")
        + b"DBSIZE\r\n"
    )
    assert parse(data) == [
        Command("GET", keys=(b"a",)),
        Command("PING"),
        Command("GET", keys=(b"b",)),
        Command("GET", keys=(b"c",)),
        Command("DBSIZE"),
    ]


def test_non_canonical_multibulk_still_parses() -> None:
    # simple-string elements: legal for hiredis, not what clients send
    p = RespParser()
    assert p.feed(b"*2\r\n+GET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n") == [
        Command("GET", keys=(b"k",)),
        Command("PING"),
    ]
    assert p.feed(b"PING\r\n") == [Command("PING")]  # hiredis drained: resynchronised


def test_inline_right_after_non_canonical_multibulk_is_the_documented_limit() -> None:
    got = parse(b"*1\r\n+PING\r\nPING\r\n")
    assert got[0] == Command("PING") and isinstance(got[1], CommandError) and got[1].fatal


def test_empty_multibulk_is_ignored() -> None:
    assert parse(b"*0\r\n" + encode_command("PING")) == [Command("PING")]


@pytest.mark.parametrize(
    "data",
    [
        b"*2\r\n:1\r\n$1\r\nk\r\n",  # an integer argument
        b"*1\r\n*1\r\n$1\r\nk\r\n",  # a nested array
        b"*1\r\n-ERR x\r\n",  # an error argument
        b"*-1\r\n",  # a null array
        b"*1\r\n$-1\r\n",  # a null bulk
        b"*1\r\n!xx\r\n",  # not RESP
        b"*99999999999\r\n",  # more arguments than MAX_ARGS
        b"*1" + b"1" * 40,  # a header that never ends
    ],
)
def test_bad_streams_are_fatal_protocol_errors(data: bytes) -> None:
    got = parse(data)
    assert len(got) == 1 and isinstance(got[0], CommandError) and got[0].fatal
    assert got[0].message.startswith("ERR Protocol error")


def test_too_big_inline_line_is_fatal() -> None:
    got = parse(b"A" * (resp.MAX_INLINE + 2))
    assert got == [CommandError("ERR Protocol error: too big inline request", fatal=True)]


def test_too_big_multibulk_request_is_fatal_before_it_is_all_buffered() -> None:
    p = RespParser(max_request=10_000)
    head = b"*2\r\n$3\r\nGET\r\n$1000000\r\n"
    out: list[Command | CommandError] = []
    fed = 0
    for _ in range(100):
        out += p.feed(head if fed == 0 else b"x" * 1000)
        fed += 1
        if out:
            break
    assert out and isinstance(out[0], CommandError) and out[0].fatal
    assert "larger than 10000" in out[0].message
    assert fed < 20


def test_requests_before_a_fatal_error_are_kept_in_order() -> None:
    got = parse(encode_command("PING") + b"*1\r\n:5\r\n")
    assert got[0] == Command("PING") and isinstance(got[1], CommandError) and got[1].fatal


_args = st.lists(st.binary(max_size=40), min_size=1, max_size=5)
_word = st.binary(min_size=1, max_size=10).filter(
    lambda b: all(c not in b" \t\r\n\v\f\"'" for c in b)
)


@given(
    st.lists(
        st.one_of(
            _args.map(lambda a: ("multi", [b"MGET", *a])),
            st.lists(_word, min_size=0, max_size=3).map(lambda a: ("inline", [b"EXISTS", *a])),
        ),
        max_size=12,
    ),
    st.data(),
)
@settings(max_examples=300)
def test_pipelines_split_at_random_points_parse_the_same(reqs, data) -> None:
    stream = b"".join(
        encode_command(*a) if kind == "multi" else b" ".join(a) + b"\r\n" for kind, a in reqs
    )
    expected = [resp.parse_command(a) for _, a in reqs]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    p = RespParser()
    got: list[Command | CommandError] = []
    prev = 0
    for c in [*cuts, len(stream)]:
        got += p.feed(stream[prev:c])
        prev = c
    assert got == expected


@given(st.binary(max_size=500), st.integers(1, 50))
@settings(max_examples=300)
def test_garbage_never_raises(garbage: bytes, step: int) -> None:
    p = RespParser(max_request=4096)
    for i in range(0, len(garbage), step):
        for item in p.feed(garbage[i : i + step]):
            assert isinstance(item, (Command, CommandError))


def test_reply_encoding_is_what_hiredis_reads() -> None:
    replies = [
        resp.OK,
        resp.PONG,
        b"bulk\r\n",
        None,
        42,
        -1,
        [b"a", None, 3, [resp.OK]],
        CommandError("ERR bad\nthing"),
    ]
    r = hiredis.Reader()
    r.feed(resp.encode_replies(replies))
    got = [r.gets() for _ in replies]
    assert got[:7] == [b"OK", b"PONG", b"bulk\r\n", None, 42, -1, [b"a", None, 3, [b"OK"]]]
    assert isinstance(got[7], hiredis.ReplyError) and str(got[7]) == "ERR bad thing"
    with pytest.raises(TypeError):
        resp.encode_reply(1.5)


def test_what_redis_py_sends_parses() -> None:
    redis = pytest.importorskip("redis")
    conn = redis.Connection()
    chunks = conn.pack_commands(
        [
            ("CLIENT", "SETINFO", "LIB-NAME", "redis-py"),
            ("SET", "k", b"\x00\r\nbin", "px", 1500),
            ("MGET", "k", "absent"),
            ("INCRBY", "c", -3),
        ]
    )
    got = RespParser().feed(b"".join(bytes(c) for c in chunks))
    assert got == [
        Command("CLIENT", arg=b"SETINFO", args=(b"LIB-NAME", b"redis-py")),
        Command("SET", keys=(b"k",), value=b"\x00\r\nbin", ttl_ms=1500),
        Command("MGET", keys=(b"k", b"absent")),
        Command("INCRBY", keys=(b"c",), delta=-3),
    ]
