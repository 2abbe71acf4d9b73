"""`shmkv serve --workers K` over real daemons (tools/cluster.py): K processes on one port sharing
one Store. Every supervisor and every worker is stopped by PID in the teardown and checked gone."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import shmkv
from shmkv.cluster.versions import Context

from .local_cluster import Start, tc

pytestmark = pytest.mark.multiprocess


@pytest.fixture
def cluster(cluster: Start) -> Start:
    """The shared factory (conftest.py), one node by default, N/W/R fitted to the node count."""

    def start(nodes: int = 1, **kw: Any) -> dict[str, Any]:
        kw.setdefault("n", min(3, nodes))
        kw.setdefault("w", min(2, kw["n"]))
        kw.setdefault("r", min(2, kw["n"]))
        return cluster(nodes, **kw)

    return start


def _clients_on_distinct_workers(state: dict[str, Any], k: int) -> list[shmkv.Client]:
    """One client per worker of the (single) node: SO_REUSEPORT hashes each connection to one
    worker, and STATUS over a client's pooled connection says which."""
    by_worker: dict[int, shmkv.Client] = {}
    spare = []
    for _ in range(64):
        c = shmkv.connect(state["seeds"], n=state["n"], w=state["w"], r=state["r"], timeout=2.0)
        wk = c.status()[0]["worker"]
        if wk in by_worker:
            spare.append(c)
        else:
            by_worker[wk] = c
        if len(by_worker) == k:
            break
    for c in spare:
        c.close()
    assert len(by_worker) == k, f"64 connections all went to workers {sorted(by_worker)}"
    return [by_worker[i] for i in sorted(by_worker)]


def test_two_workers_serve_one_port_and_concurrent_writers_through_both_lose_no_version(
    cluster: Start,
) -> None:
    st = cluster(1, workers=2)
    assert len(tc.worker_pids(st["dir"], "n1")) == 2
    clients = _clients_on_distinct_workers(st, 2)
    statuses = [c.status()[0] for c in clients]
    assert {s["worker"] for s in statuses} == {0, 1}
    assert len({s["pid"] for s in statuses}) == 2  # two processes ...
    assert len({s["actor"] for s in statuses}) == 1  # ... of one node: one actor, one store
    text = Path(st["nodes"][0]["log"]).read_text()
    # each worker's "ready" log line names the worker; the node's "ready" line is printed once
    assert text.count("n1 worker 0/2 ready:") == 1 and text.count("n1 worker 1/2 ready:") == 1, text
    assert text.count("ready n1 ") == 1, text
    rounds = 150
    errors: list[BaseException] = []

    def writer(c: shmkv.Client, tag: bytes) -> None:
        try:
            for i in range(rounds):  # an empty context supersedes nothing: every write stays
                c.put(b"shared", tag + b"%d" % i, context=Context())
                c.incr(b"hits", 1)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(c, t)) for c, t in zip(clients, (b"A", b"B"), strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    got = clients[0].get_versions(b"shared")
    want = sorted(t + b"%d" % i for t in (b"A", b"B") for i in range(rounds))
    assert sorted(v for v in got.values if v is not None) == want
    assert clients[1].get_versions(b"shared").values == got.values  # the other worker: the same
    assert clients[1].incr(b"hits", 0) == 2 * rounds
    for c in clients:
        c.close()


@pytest.mark.slow
def test_two_workers_serve_one_resp_port_and_both_answer_redis_clients(cluster: Start) -> None:
    """--resp with --workers K: every worker binds the RESP port (SO_REUSEPORT), so the node
    starts (it did not: the second worker's bind failed) and connections reach both workers."""
    redis = pytest.importorskip("redis")
    st = cluster(1, workers=2, resp=True)
    host, port = st["nodes"][0]["resp"].rsplit(":", 1)
    pids = set()
    conns = []
    for i in range(32):
        r = redis.Redis(host=host, port=int(port), protocol=2, socket_timeout=5)
        conns.append(r)
        r.set(b"k%d" % i, b"v%d" % i)
        pids.add(r.info("server")["process_id"])
        if len(pids) == 2:
            break
    assert len(pids) == 2, "32 RESP connections all reached one worker"
    for i, _r in enumerate(conns):  # a write through one worker is read through the other
        assert conns[-1 - i].get(b"k%d" % i) == b"v%d" % i
    for r in conns:
        r.close()


def test_sigkill_of_one_worker_leaves_the_node_serving_and_the_supervisor_restarts_it(
    cluster: Start,
) -> None:
    st = cluster(1, workers=2)
    clients = _clients_on_distinct_workers(st, 2)
    try:
        for i in range(20):
            clients[0].put(b"k%d" % i, b"v%d" % i)
        victim = clients[0].status()[0]["pid"]
        survivor = clients[1]
        os.kill(victim, signal.SIGKILL)
        # the other worker serves on its open connection, and sees what the dead one wrote
        assert [survivor.get(b"k%d" % i) for i in range(20)] == [b"v%d" % i for i in range(20)]
        survivor.put(b"after", b"1")
        # new connections are served (by the survivor, or by the restarted worker)
        with shmkv.connect(st["seeds"], n=1, w=1, r=1, timeout=2.0) as fresh:
            assert fresh.get(b"k3") == b"v3"
        deadline = time.monotonic() + 20
        while True:  # the supervisor forks a replacement: two live workers again, the victim gone
            pids = tc.worker_pids(st["dir"], "n1")
            if len(pids) == 2 and victim not in pids:
                break
            assert time.monotonic() < deadline, f"no replacement worker: {pids}"
            time.sleep(0.1)
        assert tc._alive(tc._load(st["dir"])["nodes"][0])  # the node (its supervisor) never went down
        assert "restarted as pid" in Path(st["nodes"][0]["log"]).read_text()
    finally:  # a failure must not leave their sockets to a later test's ResourceWarning
        for c in clients:
            c.close()


def test_three_nodes_of_two_workers_keep_quorums_and_a_sigkilled_supervisor_takes_its_workers(
    cluster: Start,
) -> None:
    st = cluster(3, workers=2)
    with shmkv.connect(st["seeds"], n=3, w=2, r=2, timeout=2.0) as c:
        for i in range(30):
            c.put(b"q%d" % i, b"v%d" % i, w=3)
        assert all(c.get(b"q%d" % i, r=3) == b"v%d" % i for i in range(30))
        workers = tc.worker_pids(st["dir"], "n3")
        assert len(workers) == 2
        tc.kill(st["dir"], "n3")  # SIGKILL of the supervisor: its workers die with it
        deadline = time.monotonic() + 20
        node3 = next(n for n in tc._load(st["dir"])["nodes"] if n["name"] == "n3")
        while tc.workers_alive(node3):
            assert time.monotonic() < deadline, tc.workers_alive(node3)
            time.sleep(0.05)
        assert all(c.get(b"q%d" % i) == b"v%d" % i for i in range(30))  # R=2 of the two left


def test_two_workers_over_a_disk_tier_keep_every_write_across_a_restart_and_serve_local_reads(
    cluster: Start,
) -> None:
    st = cluster(1, workers=2, persist=True, durability="none")
    clients = _clients_on_distinct_workers(st, 2)
    big = b"B" * (200 << 10)  # over the in-memory item limit of a 64 MiB store: disk only
    for i in range(40):
        clients[i % 2].put(b"p%d" % i, b"v%d" % i)
    clients[0].put(b"big", big)
    for c in clients:
        c.close()
    with shmkv.connect(st["seeds"], n=1, w=1, r=1, local=True, timeout=2.0) as loc:
        assert list(loc.local_nodes) == ["n1"]
        assert [loc.get(b"p%d" % i) for i in range(40)] == [b"v%d" % i for i in range(40)]
        assert loc.get(b"big") == big  # read through the node's LSM
        tc.kill(st["dir"], "n1", signal.SIGTERM)
        tc.restart(st["dir"], "n1")
        deadline = time.monotonic() + 15
        while True:  # the new segment is found again; the copies came back from the LSM
            got = loc.get(b"p7")
            if got == b"v7" and "n1" in loc.local_nodes:
                break
            assert time.monotonic() < deadline, (got, loc.local_nodes)
            time.sleep(0.05)
        assert [loc.get(b"p%d" % i) for i in range(40)] == [b"v%d" % i for i in range(40)]
        assert loc.get(b"big") == big


def test_a_taken_port_stops_a_node_of_two_workers_with_status_2_and_leaves_nothing(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        addr = f"127.0.0.1:{s.getsockname()[1]}"
        store = f"wtaken{os.getpid()}"
        p = subprocess.run(
            [sys.executable, "-m", "shmkv.cli", "serve", "--listen", addr, "--seeds", addr, "--n", "1",
             "--w", "1", "--r", "1", "--size", "16MiB", "--workers", "2", "--store", store,
             "--join-timeout", "5"],
            capture_output=True, text=True, timeout=60,
        )
    assert p.returncode == 2
    assert "address already in use" in p.stderr and "could not start" in p.stderr
    assert store not in shmkv.list_stores()  # the supervisor removed the segment it created


def _scrape(addr: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One GET /metrics: sample (name, sorted labels) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.mark.slow
def test_resp_and_metrics_with_two_workers_serve_the_whole_node(cluster: Start) -> None:
    """The default --workers (one per core) with --resp and --metrics: RESP on one port in every
    worker; one scrape shows every worker's requests (labelled worker=i) and the store once."""
    import redis

    st = cluster(1, workers=2, resp=True, metrics=True)
    node = st["nodes"][0]
    host, port = node["resp"].split(":")
    conns = [redis.Redis(host=host, port=int(port), socket_timeout=5) for _ in range(16)]
    try:
        for i, r in enumerate(conns):  # 16 connections: the kernel spreads them over the workers
            assert r.set(f"k{i}", b"v")
            assert r.get(f"k{i}") == b"v"
    finally:
        for r in conns:
            r.close()
    deadline = time.monotonic() + 10.0
    while True:  # the other worker's series are on the board within a publication interval
        got = _scrape(node["metrics"])
        gets = {lab: v for (name, lab), v in got.items() if name == "shmkv_resp_command_seconds_count"
                and dict(lab)["command"] == "GET"}
        if sum(gets.values()) == 16 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sum(gets.values()) == 16, gets
    assert {dict(lab)["worker"] for lab in gets} <= {"0", "1"}
    # the shared store is exported once, without a worker label
    puts = [(lab, v) for (name, lab), v in got.items() if name == "shmkv_store_puts_total"]
    assert len(puts) == 1 and puts[0][0] == () and puts[0][1] >= 16
