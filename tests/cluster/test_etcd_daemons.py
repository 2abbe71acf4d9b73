"""``shmkv serve --config etcd://`` in real daemons against a real etcd (etcd_server.py).

Three daemons founded on an empty etcd, a client's keys, a fourth node started with
``--config etcd://... --await-add`` and added with ``shmkv cluster add``: every node follows
etcd to epoch 2, the moved ranges stream and the old owners' reports end the move (epoch 5), every key is readable afterwards, and ``cluster
status --json`` names the source. A node added under a write load moves its ranges as with
the built-in group (the move kept in etcd), reads checked throughout. Every process is stopped by PID at the end (tools/cluster.py,
EtcdServer). Times are polled with generous deadlines, never asserted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import shmkv
from shmkv.cluster.config_client import group_status

from .etcd_server import EtcdServer
from .local_cluster import cli as _cli
from .local_cluster import poll as _poll
from .local_cluster import tc
from .test_scaling_daemons import VALUE, Load, _check_all, _moving

PRELOAD = 3000

pytestmark = pytest.mark.slow


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_three_daemons_on_etcd_add_a_fourth_and_every_key_stays_readable(etcd: EtcdServer, tmp_path: Path) -> None:
    url = etcd.url("/itest")
    d = tmp_path / "c"
    try:
        state = tc.start(3, d, join_timeout=20.0, extra=["--config", url])
        seeds = state["seeds"]
        keys = {f"k{i}".encode(): f"v{i}".encode() for i in range(400)}
        with shmkv.connect(seeds, n=3, timeout=2.0) as c:
            c.put_many(keys)
        node = tc.add_node(d, config=url, await_add=True, wait=False)
        out = _poll("cluster add", lambda: (r := _cli("cluster", "add", "--seeds", seeds[1], node["addr"]))
                    .returncode == 0 and r, within=30)
        assert "ring epoch 2" in out.stdout
        tc.wait_ready(d, [node["name"]], timeout=30)
        everyone = seeds + [node["addr"]]
        # epoch 2: the add; 3..5: each old owner's report that it streamed its copies (the move over)
        _poll("every node at epoch 5, streaming done", lambda: (s := group_status(everyone, 0.5))
              and len(s["nodes"]) == 4 and all(v["epoch"] == 5 for v in s["nodes"].values()) and not s["moving"]
              and all((v.get("rebalance") or {}).get("state", "idle") == "idle" for v in s["nodes"].values()),
              within=60)
        with shmkv.connect(seeds, n=3, timeout=2.0) as c:
            assert c.ring is not None and c.ring.epoch == 5 and len(c.ring.members) == 4
            got = c.get_many(list(keys))
        missing = [k for k, v in keys.items() if got.get(k) != v]
        assert not missing, f"{len(missing)} keys not readable after the add, e.g. {missing[:3]}"
        st = _cli("cluster", "status", "--seeds", seeds[0], "--json")
        assert st.returncode == 0, st.stderr
        cfg = json.loads(st.stdout)["config"]
        assert cfg["source"] == "etcd" and cfg["endpoint"] == url and cfg["key"] == "/itest/config"
        assert cfg["epoch"] == 5 and cfg["revision"] > 0 and cfg["moving"] is None
        assert all(v["connected"] for v in cfg["nodes"].values())
        text = _cli("cluster", "status", "--seeds", seeds[0])
        assert f"configuration: {url} key /itest/config revision {cfg['revision']} epoch 5" in text.stdout
    finally:
        tc.stop(d, grace=5)
        for n in json.loads((d / "cluster.json").read_text())["nodes"]:
            assert not tc._alive(n), n


def test_a_node_added_under_writes_moves_through_etcd_and_every_acknowledged_key_stays_readable(
        etcd: EtcdServer, tmp_path: Path) -> None:
    """As test_scaling_daemons' add, with ``--config etcd://``: the add records a move in etcd,
    a reader checks acknowledged keys throughout it (some of its reads while the move is on), a
    ring change meanwhile is refused by name, status shows the move and the transfers, the three
    old owners' reports end it (epoch 2 + 3), and every acknowledged write reads back after."""
    url = etcd.url("/scale")
    d = tmp_path / "c"
    try:
        state = tc.start(3, d, join_timeout=20.0, extra=["--config", url, "--stream-rate", "50K"])
        seeds = state["seeds"]
        acked = {f"pre{i}".encode(): VALUE + str(i).encode() for i in range(PRELOAD)}
        with shmkv.connect(seeds, n=3, timeout=2.0) as c:
            keys = list(acked)
            for i in range(0, len(keys), 500):
                c.put_many({k: acked[k] for k in keys[i:i + 500]})
        with Load(seeds, acked) as load:
            time.sleep(0.5)
            node = tc.add_node(d, config=url)  # not in the key's ring: it adds itself
            everyone = seeds + [node["addr"]]
            _poll("a move under way", lambda: _moving(everyone) is not None, within=20)
            load.moving.set()
            refused = _cli("cluster", "weight", "--seeds", seeds[0], "n1", "2")
            text = _cli("cluster", "status", "--seeds", seeds[0]).stdout
            _poll("the move over", lambda: _moving(everyone) is None, within=60)
            load.moving.clear()
            time.sleep(0.5)
        print(f"reads {load.reads}, {load.reads_moving} during the move ({load.retried} retried); "
              f"{len(acked) - PRELOAD} writes acknowledged, {load.failed_writes} not")
        assert refused.returncode == 1 and "a configuration change is in progress" in refused.stderr, refused.stderr
        assert "moving: the change of epoch 2 (from epoch 1)" in text and " transfer " in text, text
        assert load.reads_moving > 0  # reads were checked while the move was on
        assert not load.wrong, load.wrong[:3]
        assert not load.unreadable, load.unreadable[:3]
        _check_all(seeds, acked)
        st = group_status(everyone, 1.0)
        assert st is not None and st["source"] == "etcd" and st["moving"] is None
        assert st["epoch"] == 5  # the add, then one committed report per old owner
    finally:
        tc.stop(d, grace=5)
        for n in json.loads((d / "cluster.json").read_text())["nodes"]:
            assert not tc._alive(n), n


def test_serve_refuses_config_etcd_with_raft_dir_and_a_bad_url(tmp_path: Path) -> None:
    out = _cli("serve", "--listen", "127.0.0.1:1", "--seeds", "127.0.0.1:1", "--n", "1", "--w", "1", "--r", "1",
               "--config", "etcd://127.0.0.1:2379", "--raft-dir", str(tmp_path / "r"))
    assert out.returncode == 2 and "--raft-dir belong to the built-in Raft group" in out.stderr, out.stderr
    out = _cli("serve", "--listen", "127.0.0.1:1", "--n", "1", "--w", "1", "--r", "1", "--config", "etcd:/oops")
    assert out.returncode == 2 and "'etcd:/oops'" in out.stderr and "etcd://HOST:PORT" in out.stderr, out.stderr
