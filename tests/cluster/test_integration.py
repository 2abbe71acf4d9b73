"""Real daemons on 127.0.0.1, started through tools/cluster.py, driven by shmkv.connect.

Every cluster is started by the ``cluster`` fixture factory (conftest.py, local_cluster.py) and
stopped by PID in its teardown (tools/cluster.py's ``stop``: SIGTERM, wait, SIGKILL after the
grace, leftover segments removed), so no daemon outlives its test. Each test is bounded by pytest-timeout and by the clients'
own timeouts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import shmkv
from shmkv.cluster.client import NoSeedReachable
from shmkv.cluster.errors import ConfigError

from .local_cluster import ROOT, Start, eventually, run_threads, tc

pytestmark = pytest.mark.multiprocess  # every test runs real daemon processes


def _connect(state: dict[str, Any], **kw: Any) -> shmkv.Client:
    kw.setdefault("timeout", 1.0)
    return shmkv.connect(state["seeds"], n=kw.pop("n", state["n"]), **kw)


def _node(state: dict[str, Any], name: str) -> dict[str, Any]:
    return next(n for n in state["nodes"] if n["name"] == name)


def _owned_by(c: shmkv.Client, name: str, count: int, prefix: str = "k") -> list[bytes]:
    """Keys whose preference list holds ``name`` (so a test knows where its keys live)."""
    assert c.ring is not None
    out = []
    for i in range(100_000):
        k = f"{prefix}{i}".encode()
        if name in c.ring.preference_list(k, c.n):
            out.append(k)
            if len(out) == count:
                return out
    raise AssertionError("not enough keys")


def test_quorum_success_then_loud_failure_with_nodes_sigkilled(cluster: Start) -> None:
    st = cluster(3)
    with _connect(st) as c:
        for i in range(50):
            c.put(f"key{i}", b"v%d" % i)
        assert all(c.get(f"key{i}") == b"v%d" % i for i in range(50))
        assert c.get(b"absent") is None
        tc.kill(st["dir"], "n3")  # SIGKILL: one of three down, W=R=2 still met
        for i in range(50):
            assert c.get(f"key{i}") == b"v%d" % i
            c.put(f"key{i}", b"w%d" % i)
        tc.kill(st["dir"], "n2")  # two down: every request fails, loudly
        outcomes = []
        for i in range(10):
            with pytest.raises(shmkv.QuorumError) as ei:
                c.put(f"key{i}", b"x")
            outcomes.append(type(ei.value))
            assert "replicas" in str(ei.value) or "coordinator" in str(ei.value)
        # The first writes may meet the dead node (applied on the live one: MaybeApplied); once
        # the coordinator knows, nothing is written and the error says so.
        assert outcomes[-1] is shmkv.QuorumError
        with pytest.raises(shmkv.QuorumError, match="R=2 needed"):
            c.get("key1")
        assert c.get("key1", r=1) in (b"w1", b"x")  # the live replica, alone


def test_per_request_consistency(cluster: Start) -> None:
    st = cluster(3)
    with _connect(st) as c:
        c.put("a", b"1", w=3)
        assert c.get("a", r=3) == b"1"
        assert c.get("a", r=1) == b"1"
        tc.kill(st["dir"], "n2")
        c.put("b", b"2", w=1)
        c.put("b", b"3", w=2)
        assert c.get("b", r=2) == b"3"
        with pytest.raises(shmkv.QuorumError):  # W=3 cannot be met with a node down
            c.put("b", b"4", w=3)
            c.put("b", b"4", w=3)
        with pytest.raises(shmkv.QuorumError, match="R=3"):
            c.get("b", r=3)
            c.get("b", r=3)
        with pytest.raises(ConfigError, match="W=4 > N=3"):
            c.put("b", b"x", w=4)
        with pytest.raises(ConfigError, match="R=0|R must be"):
            c.get("b", r=0)


def test_siblings_and_resolution_through_two_clients(cluster: Start) -> None:
    st = cluster(3)
    with _connect(st) as alice, _connect(st) as bob:
        alice.put("cart", b"base")
        seen = alice.get_versions("cart")
        assert seen.values == [b"base"]
        alice.put("cart", b"base+milk", context=seen.context)
        bob.put("cart", b"base+eggs", context=seen.context)  # the same context: concurrent
        with pytest.raises(shmkv.Conflict) as ei:
            bob.get("cart")
        assert sorted(ei.value.values) == [b"base+eggs", b"base+milk"]
        # Bob resolves by hand with the conflict's context...
        bob.put("cart", b"base+eggs+milk", context=ei.value.context)
        assert alice.get("cart") == b"base+eggs+milk"
        # ...and a client with resolve= merges and writes back on read.
        ctx = bob.get_versions("tags").context  # both start from what was there: nothing
        alice.put("tags", b"a", context=ctx)
        bob.put("tags", b"b", context=ctx)
        bob.put("tags", b"c", context=ctx)
        calls: list[list[bytes | None]] = []

        def union(values: list[bytes | None]) -> bytes:
            calls.append(values)
            return b",".join(sorted({p for v in values if v for p in v.split(b",")}))

        with _connect(st, resolve=union) as carol:
            assert carol.get("tags") == b"a,b,c"
        assert len(calls) == 1
        assert alice.get("tags") == b"a,b,c"  # written back: the siblings are gone


def test_counters_and_batches(cluster: Start) -> None:
    st = cluster(3)
    with _connect(st) as c, _connect(st) as d:
        assert c.incr("hits", 3) == 3
        assert d.incr("hits", 4) == 7
        assert c.incr("hits", -1) == 6
        data = {f"m{i}": b"%d" % i for i in range(300)}
        c.put_many(data)
        got = d.get_many(list(data) + ["missing"])
        assert got == {k.encode(): v for k, v in data.items()}


def test_client_errors_are_clear(cluster: Start) -> None:
    st = cluster(3)
    with pytest.raises(ConfigError, match="N=5 replicas asked for, but the cluster has 3 nodes"):
        shmkv.connect(st["seeds"], n=5, w=2, r=2)
    with pytest.raises(ConfigError, match="runs with N=3"):
        shmkv.connect(st["seeds"], n=2, w=1, r=1)
    with pytest.raises(ConfigError, match="W=3 > N=2"):
        shmkv.connect(st["seeds"], n=2, w=3, r=1)
    port = tc.free_ports(1)[0]
    with pytest.raises(NoSeedReachable, match="no seed"):
        shmkv.connect([f"127.0.0.1:{port}"], timeout=0.3)


@pytest.mark.slow
def test_restart_with_path_keeps_data(cluster: Start) -> None:
    st = cluster(3, persist=True)
    with _connect(st) as c:
        for i in range(200):
            c.put(f"p{i}", b"value %d" % i, w=3)
        c.incr("ctr", 42)
    # SIGKILL every node and remove its memory tier, as a host reboot would: only --path remains.
    for node in st["nodes"]:
        tc.kill(st["dir"], node["name"])
        tc._unlink_store(node)
    for node in st["nodes"]:
        tc.restart(st["dir"], node["name"], wait=False)
    tc.wait_ready(st["dir"])
    with _connect(st) as c:
        assert all(c.get(f"p{i}", r=3) == b"value %d" % i for i in range(200))
        assert c.incr("ctr", 0) == 42
        # a clean stop and start keeps them too
    tc.stop(st["dir"])
    for node in st["nodes"]:
        tc.restart(st["dir"], node["name"], wait=False)
    tc.wait_ready(st["dir"])
    with _connect(st) as c:
        assert c.get("p7", r=3) == b"value 7"


def test_garbage_on_the_port_leaves_the_node_serving(cluster: Start) -> None:
    st = cluster(3)
    addr = st["seeds"][0]
    host, port = addr.rsplit(":", 1)
    payloads = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\xff\xff\xff\xff" + b"x" * 100,  # a 4 GiB length: refused after 4 bytes
        b"\x00\x00\x00\x05\x09abcd",  # unknown wire version
        b"\x00\x00\x00\x03\x01\xc1\xc1",  # malformed msgpack
        os.urandom(4096),
    ]
    for p in payloads:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(p)
            s.settimeout(5)
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except (ConnectionResetError, TimeoutError):
                pass
        # the node says why (ERR_BAD_REQUEST) or just hangs up; either way it keeps serving
    with _connect(st) as c:
        c.put("still", b"here", w=3)
        assert c.get("still", r=3) == b"here"
    assert tc._alive(_node(st, "n1"))


@pytest.mark.slow
def test_sixteen_concurrent_clients(cluster: Start) -> None:
    st = cluster(3)
    per = 40

    def worker(i: int) -> None:
        with _connect(st, timeout=2.0) as c:
            for j in range(per):
                c.put(f"c{i}:{j}", b"%d:%d" % (i, j))
                c.incr("total", 1)
            for j in range(per):
                assert c.get(f"c{i}:{j}") == b"%d:%d" % (i, j)

    assert run_threads(worker, 16, timeout=120) == []
    with _connect(st) as c:
        assert c.incr("total", 0, w=3) == 16 * per
        got = c.get_many([f"c{i}:{j}" for i in range(16) for j in range(per)], r=3)
        assert len(got) == 16 * per


def test_one_client_shared_by_threads(cluster: Start) -> None:
    st = cluster(3)
    with _connect(st) as c:

        def worker(i: int) -> None:
            for j in range(30):
                c.put(f"t{i}:{j}", b"x")
                assert c.get(f"t{i}:{j}") == b"x"

        assert run_threads(worker, 8) == []


@pytest.mark.slow
def test_conflicting_node_config_is_refused_and_the_cluster_keeps_serving(cluster: Start) -> None:
    st = cluster(3)
    d = st["dir"]
    tc.kill(d, "n3", signal.SIGTERM)
    tc.restart(d, "n3", wait=False, extra=["--n", "2", "--w", "1", "--r", "1"])
    n3 = _node(tc._load(d), "n3")
    _wait_exit(n3)
    log = Path(n3["log"]).read_text()
    assert "config conflict" in log and "N=2" in log and "N=3" in log
    tc.restart(d, "n3", wait=False, extra=["--name", "n1"])
    n3 = _node(tc._load(d), "n3")
    _wait_exit(n3)
    assert "the name 'n1'" in Path(n3["log"]).read_text()
    with _connect(st) as c:  # n1, n2 serve on
        c.put("ok", b"1")
        assert c.get("ok") == b"1"


def _wait_exit(node: dict[str, Any], timeout: float = 30.0) -> None:
    proc = tc._CHILDREN.get(node["pid"])
    assert proc is not None
    assert proc.wait(timeout) == 2


def test_sigterm_answers_in_flight_requests_and_closes_the_store(cluster: Start) -> None:
    st = cluster(3)
    d = st["dir"]
    with _connect(st) as c:
        keys = _owned_by(c, "n1", 20)
        stop = threading.Event()
        results: list[str] = []

        def load() -> None:
            while not stop.is_set():
                try:
                    c.put(keys[len(results) % 20], b"v", w=1)
                    results.append("ok")
                except shmkv.Error as e:
                    results.append(type(e).__name__)

        t = threading.Thread(target=load)
        t.start()
        time.sleep(0.5)
        n1 = _node(st, "n1")
        tc.kill(d, "n1", signal.SIGTERM)
        proc = tc._CHILDREN.get(n1["pid"])
        stop.set()
        t.join(30)
        assert not t.is_alive()
    assert proc is None or proc.returncode == 0
    log = Path(n1["log"]).read_text()
    assert "stopping: draining" in log
    assert "Traceback" not in log
    assert not os.path.exists(f"/dev/shm/shmkv.{n1['store']}")  # the store was closed and removed
    assert results.count("ok") > 0


def test_cluster_status_cli(cluster: Start) -> None:
    st = cluster(3, weights=[1.0, 1.0, 2.0])
    seeds = ",".join(st["seeds"])
    with _connect(st) as c:
        for i in range(30):
            c.put(f"s{i}", b"v")
    out = subprocess.run(
        [sys.executable, "-m", "shmkv.cli", "cluster", "status", "--seeds", seeds, "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["epoch"] == 1 and s["n"] == 3 and s["up"] == 3
    by = {m["name"]: m for m in s["members"]}
    assert by["n3"]["weight"] == 2.0
    assert 0.4 < by["n3"]["share"] < 0.6  # about twice the others' share
    assert all(m["keys"] == 30 for m in s["members"])  # N=3 of 3 nodes: every node holds all
    tc.kill(st["dir"], "n2")
    out = subprocess.run(
        [sys.executable, "-m", "shmkv.cli", "cluster", "status", "--seeds", seeds],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "2/3 members up" in out.stdout and "down" in out.stdout


def test_tools_cluster_cli_start_and_stop(tmp_path: Path) -> None:
    d = tmp_path / "cli"
    try:
        out = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "cluster.py"), "start", "--nodes", "3", "--dir", str(d)],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        state = json.loads((d / "cluster.json").read_text())
        assert out.stdout.strip() == ",".join(state["seeds"])
        with shmkv.connect(state["seeds"]) as c:
            c.put("x", b"y")
            assert c.get("x") == b"y"
    finally:
        out = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "cluster.py"), "stop", "--dir", str(d)],
            capture_output=True, text=True, timeout=60,
        )
    assert out.returncode == 0, out.stderr
    for node in json.loads((d / "cluster.json").read_text())["nodes"]:
        assert not tc._alive(node)


def test_a_client_with_a_stale_ring_is_told_wrong_epoch_and_refreshes(cluster: Start) -> None:
    from shmkv.cluster.ring import Member, Ring

    st = cluster(3)
    with _connect(st) as c:
        assert c.ring is not None
        real = c.ring
        # A ring from another configuration: other epoch, other weights (keys map elsewhere).
        c.ring = Ring([Member(m.name, m.addr, 1.0 + i) for i, m in enumerate(real.members.values())], 0)
        for i in range(20):
            c.put(f"e{i}", b"v")
        assert c.ring == real
        assert all(c.get(f"e{i}") == b"v" for i in range(20))


def test_oversized_values_and_bad_input_are_refused_by_name(cluster: Start) -> None:
    st = cluster(3, size="16MiB")
    with _connect(st) as c:
        with pytest.raises(shmkv.Error, match="too large|larger|limit"):
            c.put("big", b"x" * (2 << 20))
        with pytest.raises(shmkv.InvalidType):
            c.put("k", 42)
        with pytest.raises(shmkv.InvalidType):
            c.get(b"")
        c.put("small", b"fine")
        assert c.get("small") == b"fine"
        assert c.get("big") is None  # nothing was written


def test_a_client_connected_before_fork_works_in_the_child(cluster: Start) -> None:
    st = cluster(3)
    with _connect(st) as c:
        c.put("before", b"fork")
        pid = os.fork()
        if pid == 0:  # the child: a fresh loop and connections on first use
            code = 1
            try:
                c.put("child", b"wrote")
                code = 0 if c.get("before") == b"fork" else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert c.get("child") == b"wrote"  # and the parent's client still works


def test_replicas_sigstopped_make_a_write_maybe_applied_and_it_was(cluster: Start) -> None:
    st = cluster(3)
    d = st["dir"]
    with _connect(st, timeout=0.5) as c:
        key = _owned_by(c, "n1", 1)[0]
        assert c.ring is not None
        others = [n for n in c.ring.preference_list(key, 3) if n != c.ring.preference_list(key, 3)[0]]
        pids = [_node(st, n)["pid"] for n in others]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            # The requests reach the paused replicas' sockets; no ack comes back in time.
            with pytest.raises(shmkv.MaybeApplied, match="may have been applied"):
                c.put(key, b"paused", w=2)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        # The resumed nodes apply what waited in their sockets; the coordinator's probe (every
        # 0.5 s) stops suspecting them. Until then an R=3 read is refused: retry, bounded.
        assert eventually(lambda: c.get(key, r=3), shmkv.QuorumError) == b"paused"
    assert all(tc._alive(n) for n in tc._load(d)["nodes"])


def test_serve_refuses_bad_flags_and_a_taken_port_with_a_message(cluster: Start) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shmkv.cli", "serve", "--size", "16MiB", "--join-timeout", "2", *args],
            capture_output=True, text=True, timeout=60,
        )

    a, b = (f"127.0.0.1:{p}" for p in tc.free_ports(2))
    out = serve("--listen", a, "--seeds", f"{a},{b}")
    assert out.returncode == 2 and "N=3 replicas need at least 3 nodes, --seeds lists 2" in out.stderr
    out = serve("--listen", a, "--seeds", f"{a},{b}", "--n", "2", "--w", "3")
    assert out.returncode == 2 and "W=3 > N=2" in out.stderr
    st = cluster(3)
    taken = st["seeds"][0]
    out = serve("--listen", taken, "--seeds", ",".join(st["seeds"]), "--name", "intruder")
    assert out.returncode == 2 and f"cannot listen on {taken}" in out.stderr
    out = serve("--listen", a, "--seeds", ",".join(st["seeds"]))
    assert out.returncode == 2 and f"--listen {a} is not in --seeds" in out.stderr
    with _connect(st) as c:  # the cluster never noticed
        c.put("k", b"v", w=3)


def test_batches_go_around_a_dead_coordinator(cluster: Start) -> None:
    st = cluster(3)
    with _connect(st) as c:
        data = {f"b{i}": b"%d" % i for i in range(60)}
        c.put_many(data, w=3)
        tc.kill(st["dir"], "n1")  # the coordinator of about a third of the keys
        assert c.get_many(list(data)) == {k.encode(): v for k, v in data.items()}
        more = {f"m{i}": b"x%d" % i for i in range(60)}
        c.put_many(more)  # W=2 of the two live replicas
        assert c.get_many(list(more)) == {k.encode(): v for k, v in more.items()}
        with pytest.raises(shmkv.QuorumError):
            c.put_many(more, w=3)
