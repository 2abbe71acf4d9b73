"""The RESP front (``--resp``) and the metrics endpoint (``--metrics``) of real daemons.

A 3-node cluster (N=3, W=2, R=2) is started through tools/cluster.py with both fronts on every
node, once for the module (the tests that kill nodes start their own), and stopped by PID in the
fixture's teardown. Driven by redis-py (RESP2 and RESP3 handshakes), ``redis-cli`` and
``redis-benchmark`` (Debian's redis-server package; .ci/run installs it), and raw sockets for the
garbage. Every client has a socket timeout, every subprocess a ``timeout=``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import shmkv

from .local_cluster import start as start_cluster
from .local_cluster import stop as stop_cluster
from .local_cluster import tc

redis = pytest.importorskip("redis")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.multiprocess

REDIS_CLI = shutil.which("redis-cli")
REDIS_BENCHMARK = shutil.which("redis-benchmark")
needs_redis_tools = pytest.mark.skipif(
    REDIS_CLI is None or REDIS_BENCHMARK is None,
    reason="redis-cli/redis-benchmark missing (apt-get install redis-server; .ci/run does)",
)


def _start(d: Path, **kw: Any) -> dict[str, Any]:
    return start_cluster(d, 3, resp=True, metrics=True, **kw)


def _stop(d: Path) -> None:
    stop_cluster(d)


@pytest.fixture(scope="module")
def c3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("resp") / "c3"
    state = _start(d)
    yield state
    _stop(d)


def _port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def _redis(node: dict[str, Any], **kw: Any) -> Any:
    kw.setdefault("socket_timeout", 10.0)
    return redis.Redis(host="127.0.0.1", port=_port(node["resp"]), **kw)


def _scrape(node: dict[str, Any], path: str = "/metrics") -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{node['metrics']}{path}", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _sample(scraped: dict[str, Any], name: str, **labels: str) -> float:
    for lab, value in scraped.get(name, []):
        if all(lab.get(k) == v for k, v in labels.items()):
            return float(value)
    raise KeyError(f"{name}{labels} not in {sorted(scraped)}")


# -- redis-py ---------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_commands_through_every_node(c3: dict[str, Any], protocol: int) -> None:
    a, b, c = (_redis(n, protocol=protocol) for n in c3["nodes"])
    p = f"p{protocol}:"
    assert a.ping() is True
    assert a.set(p + "k", b"v1") is True
    assert b.get(p + "k") == b"v1" and c.get(p + "k") == b"v1"  # any node serves any key
    assert a.get(p + "missing") is None
    assert a.mset({p + "x": b"1", p + "y": b"2"}) is True
    assert c.mget([p + "x", p + "y", p + "missing"]) == [b"1", b"2", None]
    assert b.exists(p + "x", p + "x", p + "missing") == 2  # repeats count, as in Redis
    assert a.delete(p + "x", p + "missing") == 1
    assert c.get(p + "x") is None and c.exists(p + "x") == 0
    # counters: increments through different nodes all count
    assert a.incr(p + "n") == 1
    assert b.incrby(p + "n", 10) == 11
    assert c.incrby(p + "n", -2) == 9
    assert a.dbsize() > 0
    info = a.info()
    assert info["redis_version"] and info["shmkv_n"] == 3 and info["shmkv_w"] == 2
    assert a.config_get("save") == {"save": ""}
    a.close(), b.close(), c.close()


def test_the_resp_front_and_the_python_client_see_the_same_data(c3: dict[str, Any]) -> None:
    r = _redis(c3["nodes"][0])
    client = shmkv.connect(c3["seeds"], n=3, timeout=2.0)
    try:
        r.set("shared:a", b"from-resp")
        assert client.get(b"shared:a") == b"from-resp"
        client.put(b"shared:b", b"from-python")
        assert r.get("shared:b") == b"from-python"
    finally:
        client.close()
        r.close()


def test_a_pipeline_answers_in_order_and_sees_its_own_writes(c3: dict[str, Any]) -> None:
    r = _redis(c3["nodes"][1])
    pipe = r.pipeline(transaction=False)
    for i in range(200):
        pipe.set(f"pl:{i}", str(i))
        pipe.get(f"pl:{i}")
        pipe.incr("pl:count")
    out = pipe.execute()
    assert out[0::3] == [True] * 200
    assert out[1::3] == [str(i).encode() for i in range(200)]
    assert out[2::3] == list(range(1, 201))
    r.close()


def _local_get(c3: dict[str, Any], name: str, key: bytes) -> Any:
    """``key`` as node ``name``'s own copy serves it: a zero-hop R=1 read of its shared memory."""
    with shmkv.connect(c3["seeds"], n=3, r=1, local=name, timeout=2.0) as c:
        assert list(c.local_nodes) == [name]
        return c.get(key)


def test_set_ex_expires_on_every_replica_and_read_repair_does_not_bring_it_back(
    c3: dict[str, Any],
) -> None:
    nodes = c3["nodes"]
    a, b = _redis(nodes[0]), _redis(nodes[2])
    names = [n["name"] for n in nodes]
    # a long TTL: readable on every replica, and TTL/PTTL tell what is left
    assert a.set("ttl:long", b"v", ex=300) is True
    assert 290 <= b.ttl("ttl:long") <= 300 and 290_000 <= b.pttl("ttl:long") <= 300_000
    deadline = time.monotonic() + 30
    while not all(_local_get(c3, n, b"ttl:long") == b"v" for n in names):  # W=2: the third lags
        assert time.monotonic() < deadline, "a replica never got the write"
        time.sleep(0.05)
    assert b.ttl("ttl:plain") == -2
    b.set("ttl:plain", b"p")
    assert a.ttl("ttl:plain") == -1 and a.pttl("ttl:plain") == -1
    # SET EX 1: readable (unless this loaded machine took a second to ask), then absent
    t0 = time.monotonic()
    assert a.set("ttl:k", b"v", ex=1) is True
    got = b.get("ttl:k")
    assert got == b"v" or time.monotonic() - t0 >= 1.0
    deadline = time.monotonic() + 30
    while b.get("ttl:k") is not None or a.get("ttl:k") is not None:
        assert time.monotonic() < deadline, "SET EX 1 never expired"
        time.sleep(0.05)
    assert time.monotonic() - t0 >= 0.9  # not before its time (the nodes share this host's clock)
    # a read at R=N repairs every replica from the others' copies: the copies carry the expiry
    with shmkv.connect(c3["seeds"], n=3, r=3, timeout=2.0) as client:
        assert client.get(b"ttl:k", r=3) is None
        assert client.get_versions(b"ttl:k", r=3).values == []
    for node in nodes:  # each replica's own copy (zero hops), and through each node's front
        assert _local_get(c3, node["name"], b"ttl:k") is None, node["name"]
        r = _redis(node)
        assert r.get("ttl:k") is None and r.ttl("ttl:k") == -2, node["name"]
        r.close()
    # a plain SET over an expired key is a new version without expiry
    assert a.set("ttl:k", b"again") is True and b.get("ttl:k") == b"again" and b.ttl("ttl:k") == -1
    # bad EX/PX answer as Redis does and write nothing
    for kw in ({"ex": 0}, {"px": 0}, {"ex": -1}, {"px": -5}):
        with pytest.raises(redis.ResponseError, match="invalid expire time in 'set' command"):
            a.set("ttl:bad", b"v", **kw)
    with pytest.raises(redis.ResponseError, match="invalid expire time in 'set' command"):
        a.execute_command("SET", "ttl:bad", "v", "PX", str(2**63 - 1))
    assert b.get("ttl:bad") is None
    a.close(), b.close()


def test_siblings_answer_a_conflict_error_naming_them(c3: dict[str, Any]) -> None:
    client = shmkv.connect(c3["seeds"], n=3, timeout=2.0)
    r = _redis(c3["nodes"][0])
    try:
        client.put(b"sib", b"base", w=3)
        ctx = client.get_versions(b"sib").context
        client.put(b"sib", b"left-value", context=ctx, w=3)
        client.put(b"sib", b"right-value", context=ctx, w=3)
        for call in (lambda: r.get("sib"), lambda: r.mget(["other", "sib"])):
            with pytest.raises(redis.ResponseError) as e:
                call()
            text = str(e.value)
            assert "CONFLICT" in text and "sib" in text
            assert "left-value" in text and "right-value" in text
        assert r.set("sib", b"resolved") is True  # supersedes what the coordinator holds
        assert r.get("sib") == b"resolved"
    finally:
        client.close()
        r.close()


def test_runs_of_gets_and_sets_in_a_pipeline_answer_per_command(c3: dict[str, Any]) -> None:
    # A run of GETs (SETs) is one GET_MANY (PUT_MANY) inside the node; replies stay per command.
    client = shmkv.connect(c3["seeds"], n=3, timeout=2.0)
    r = _redis(c3["nodes"][2])
    try:
        client.put(b"run:sib", b"base", w=3)
        ctx = client.get_versions(b"run:sib").context
        client.put(b"run:sib", b"one", context=ctx, w=3)
        client.put(b"run:sib", b"two", context=ctx, w=3)
        pipe = r.pipeline(transaction=False)
        for i in range(100):
            pipe.set(f"run:{i}", f"v{i}")
        pipe.set("run:dup", b"first")
        pipe.set("run:dup", b"second")
        for i in range(100):
            pipe.get(f"run:{i}")
        pipe.get("run:sib")
        pipe.get("run:missing")
        pipe.get("run:dup")
        out = pipe.execute(raise_on_error=False)
        assert out[:102] == [True] * 102
        assert out[102:202] == [f"v{i}".encode() for i in range(100)]
        assert isinstance(out[202], redis.ResponseError) and "CONFLICT" in str(out[202])
        assert "one" in str(out[202]) and "two" in str(out[202])
        assert out[203] is None and out[204] == b"second"
        assert client.get(b"run:57") == b"v57"
    finally:
        client.close()
        r.close()


def test_bad_commands_are_errors_and_the_connection_lives_on(c3: dict[str, Any]) -> None:
    r = _redis(c3["nodes"][0])
    with pytest.raises(redis.ResponseError, match="unknown command 'FLUSHALL'"):
        r.execute_command("FLUSHALL")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        r.execute_command("INCRBY", "k", "ten")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        r.execute_command("GET")
    with pytest.raises(redis.ResponseError, match="syntax error"):
        r.execute_command("SET", "k", "v", "EX")
    with pytest.raises(redis.ResponseError, match="non-empty"):
        r.set("", b"v")
    with pytest.raises(redis.ResponseError, match="NOPROTO"):
        r.execute_command("HELLO", "4")
    assert r.ping() is True
    r.close()


# -- garbage ----------------------------------------------------------------------------------


def _raw(addr: str, data: bytes, timeout: float = 5.0, expect_close: bool = True) -> bytes:
    """Send ``data``, read until the server closes (or ``timeout``): what it answered."""
    s = socket.create_connection(("127.0.0.1", _port(addr)), timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                return out
            out += chunk
        if not expect_close:
            return out
        raise AssertionError(f"the server did not close the connection; it answered {out[:200]!r}")
    finally:
        s.close()


def test_garbage_on_the_resp_port_closes_only_that_connection(c3: dict[str, Any]) -> None:
    node = c3["nodes"][2]
    bystander = _redis(node)
    bystander.set("bystander", b"ok")
    for junk in (
        b"*abc\r\n",                      # a multibulk length that is not a number
        b"*2\r\n$3\r\nGET\r\n:12\r\n",    # an integer where a bulk string must be
        b"*99999999999\r\n",              # an absurd argument count
        b"\"unbalanced\r\n",              # an inline request with unbalanced quotes
    ):
        answer = _raw(node["resp"], junk)
        assert answer.startswith(b"-ERR Protocol error"), (junk[:20], answer)
        assert bystander.get("bystander") == b"ok"  # everyone else is served on
    # binary noise reads as inline lines of unknown commands: each an error, as in Redis
    answer = _raw(node["resp"], bytes(range(256)) * 40, timeout=1.0, expect_close=False)
    assert answer.startswith(b"-ERR unknown command"), answer[:100]
    # a request larger than MAX_INLINE with no newline: refused, connection closed
    assert _raw(node["resp"], b"x" * (70 * 1024)).startswith(b"-ERR Protocol error")
    assert bystander.ping() is True
    bystander.close()


def test_a_client_that_vanishes_mid_pipeline_leaves_the_node_serving(c3: dict[str, Any]) -> None:
    node = c3["nodes"][1]
    s = socket.create_connection(("127.0.0.1", _port(node["resp"])), timeout=5)
    s.sendall(b"".join(b"*3\r\n$3\r\nSET\r\n$4\r\nv:%03d\r\n$1\r\nx\r\n" % i for i in range(500)))
    s.close()  # its replies have nowhere to go
    r = _redis(node)
    assert r.ping() is True and r.set("after", b"1") is True
    r.close()


# -- redis-cli and redis-benchmark --------------------------------------------------------------


@needs_redis_tools
def test_redis_cli_talks_to_the_front(c3: dict[str, Any]) -> None:
    port = str(_port(c3["nodes"][0]["resp"]))

    def cli(*args: str) -> str:
        p = subprocess.run([REDIS_CLI, "-p", port, *args], capture_output=True, timeout=30, text=True)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    assert cli("PING") == "PONG"
    assert cli("SET", "cli:k", "hello world") == "OK"
    assert cli("GET", "cli:k") == "hello world"
    assert cli("INCRBY", "cli:n", "7") == "7"
    assert "unknown command" in cli("NOSUCH", "x")
    assert "redis_version" in cli("INFO", "server")
    # interactive start-up (COMMAND DOCS, hints) with commands on stdin
    p = subprocess.run([REDIS_CLI, "-p", port], input="GET cli:k\nDEL cli:k\nGET cli:k\n",
                       capture_output=True, timeout=30, text=True)
    assert p.returncode == 0 and p.stdout.split() == ["hello", "world", "1"], (p.stdout, p.stderr)


@needs_redis_tools
def test_redis_benchmark_pipelined_completes_without_errors(c3: dict[str, Any]) -> None:
    node = c3["nodes"][0]
    before = _scrape(node)
    p = subprocess.run(
        [REDIS_BENCHMARK, "-p", str(_port(node["resp"])), "-n", "2000", "-c", "10", "-P", "16",
         "-t", "get,set", "-q"],
        capture_output=True, timeout=120, text=True,
    )
    out = p.stdout.replace("\r", "\n")
    assert p.returncode == 0, (out[-500:], p.stderr)
    assert "SET:" in out and "GET:" in out and out.count("requests per second") == 2, out[-500:]
    assert "rror" not in out + p.stderr and "WARNING" not in p.stderr, (out[-500:], p.stderr)
    after = _scrape(node)
    for cmd in ("SET", "GET"):
        n0 = _sample(before, "shmkv_resp_command_seconds_count", command=cmd) if any(
            lab.get("command") == cmd for lab, _ in before.get("shmkv_resp_command_seconds_count", [])
        ) else 0.0
        assert _sample(after, "shmkv_resp_command_seconds_count", command=cmd) - n0 >= 2000


# -- metrics ------------------------------------------------------------------------------------


def test_metrics_endpoint_parses_and_counts(c3: dict[str, Any]) -> None:
    node = c3["nodes"][0]
    r = _redis(node)
    for i in range(20):
        r.set(f"m:{i}", b"v")
        r.get(f"m:{i}")
    with pytest.raises(redis.ResponseError):
        r.execute_command("INCRBY", "m:x", "nope")  # a parse error: not a node request
    m = _scrape(node)
    assert _sample(m, "shmkv_resp_command_seconds_count", command="GET") >= 20
    assert _sample(m, "shmkv_resp_command_seconds_bucket", command="SET", le="+Inf") >= 20
    assert _sample(m, "shmkv_requests_total", op="PUT") >= 20
    assert _sample(m, "shmkv_requests_total", op="REPLICA_PUT") >= 0  # replicas of other nodes' writes
    assert _sample(m, "shmkv_store_items") > 0
    assert _sample(m, "shmkv_store_puts_total") > 0
    assert _sample(m, "shmkv_quorum_failures_total") == 0
    assert _sample(m, "shmkv_read_repairs_total") >= 0
    assert _sample(m, "shmkv_ring_epoch") == 1
    assert _sample(m, "shmkv_resp_connections") >= 1
    # another node's wire histogram saw the replica requests this node sent it
    other = _scrape(c3["nodes"][1])
    assert _sample(other, "shmkv_request_seconds_count", op="REPLICA_PUT") >= 1
    r.close()


def test_metrics_port_refuses_other_paths_and_garbage(c3: dict[str, Any]) -> None:
    node = c3["nodes"][1]
    with pytest.raises(urllib.error.HTTPError) as e:
        _scrape(node, "/nope")
    assert e.value.code == 404
    e.value.close()
    assert _raw(node["metrics"], b"\x00\xffnot http\r\n\r\n").startswith(b"HTTP/1.0 400")
    assert _raw(node["metrics"], b"x" * 20000).startswith(b"HTTP/1.0 400")
    assert "shmkv_store_items" in _scrape(node)


# -- failing loudly -------------------------------------------------------------------------------


@pytest.mark.slow
def test_quorum_shortfalls_are_resp_errors_that_say_so(tmp_path: Path) -> None:
    d = tmp_path / "c3"
    state = _start(d)
    try:
        r = _redis(state["nodes"][0])
        assert r.set("q", b"v") is True
        tc.kill(d, "n2")
        tc.kill(d, "n3")
        with pytest.raises(redis.ResponseError, match="QUORUM|MAYBEAPPLIED") as e:
            r.set("q", b"w")
        assert "answered" in str(e.value) or "applied" in str(e.value)
        with pytest.raises(redis.ResponseError, match="QUORUM"):
            r.get("q")
        assert r.ping() is True  # the node itself serves on
        m = _scrape(state["nodes"][0])
        assert _sample(m, "shmkv_quorum_failures_total") >= 2
        r.close()
    finally:
        _stop(d)


@pytest.mark.slow
def test_a_taken_resp_port_is_a_clear_start_error(tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = f"127.0.0.1:{blocker.getsockname()[1]}"
    listen = f"127.0.0.1:{tc.free_ports(1)[0]}"
    try:
        p = subprocess.run(
            [tc.sys.executable, "-m", "shmkv.cli", "serve", "--listen", listen, "--seeds", listen,
             "--n", "1", "--w", "1", "--r", "1", "--size", "16MiB", "--resp", taken,
             "--store", f"tresp{blocker.getsockname()[1]}"],
            capture_output=True, timeout=60, text=True,
        )
    finally:
        blocker.close()
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert f"cannot listen on {taken}" in p.stderr
