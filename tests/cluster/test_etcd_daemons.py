"""``shmkv serve --config etcd://`` in real daemons against a real etcd (etcd_server.py).

Three daemons founded on an empty etcd, a client's keys, a fourth node started with
``--config etcd://... --await-add`` and added with ``shmkv cluster add``: every node follows
etcd to epoch 2, the moved ranges stream, every key is readable afterwards, and ``cluster
status --json`` names the source. Every process is stopped by PID at the end (tools/cluster.py,
EtcdServer). Times are polled with generous deadlines, never asserted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import shmkv
from shmkv.cluster.config_client import group_status

from .etcd_server import EtcdServer
from .local_cluster import cli as _cli
from .local_cluster import poll as _poll
from .local_cluster import tc

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
        _poll("every node at epoch 2, streaming done", lambda: (s := group_status(everyone, 0.5))
              and len(s["nodes"]) == 4 and all(v["epoch"] == 2 for v in s["nodes"].values())
              and all((v.get("rebalance") or {}).get("state", "idle") == "idle" for v in s["nodes"].values()),
              within=60)
        with shmkv.connect(seeds, n=3, timeout=2.0) as c:
            assert c.ring is not None and c.ring.epoch == 2 and len(c.ring.members) == 4
            got = c.get_many(list(keys))
        missing = [k for k, v in keys.items() if got.get(k) != v]
        assert not missing, f"{len(missing)} keys not readable after the add, e.g. {missing[:3]}"
        st = _cli("cluster", "status", "--seeds", seeds[0], "--json")
        assert st.returncode == 0, st.stderr
        cfg = json.loads(st.stdout)["config"]
        assert cfg["source"] == "etcd" and cfg["endpoint"] == url and cfg["key"] == "/itest/config"
        assert cfg["epoch"] == 2 and cfg["revision"] > 0
        assert all(v["connected"] for v in cfg["nodes"].values())
        text = _cli("cluster", "status", "--seeds", seeds[0])
        assert f"configuration: {url} key /itest/config revision {cfg['revision']} epoch 2" in text.stdout
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
