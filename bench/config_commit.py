"""Commit latency of a configuration change: the built-in Raft group against ``--config etcd://``.

Run::

    python bench/config_commit.py [--changes 20] [--json bench/results/config_commit.json]

What it starts, on 127.0.0.1, stopped at the end by PID: one etcd (Debian's ``etcd-server``,
tests/cluster/etcd_server.py: a temporary data dir, free ports), then a 3-node shmkv cluster
with ``--raft-dir`` (tools/cluster.py --raft; it waits for a leader), stopped, then a 3-node
cluster with ``--config etcd://`` on that etcd. On each, ``--changes`` times, the time for
``config_client.propose`` of a ``weight`` change sent to n2 to return (committed and applied by
the member that answered: for Raft the leader's apply, n2 forwarding to it when it follows;
for etcd n2's read + compare-and-swap transaction). Median, p90 and max over the changes, and
the etcd/Raft ratio of the medians; every number comes from the same run. Each change starts
a move (cluster_config.py "Moves"), which the old owners' reports end -- quickly here, there is
no data: the bench waits for that end before the next change, untimed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _run import cluster_tool, repo_import

from shmkv.bench.stats import percentile


def measure(kind: str, d: Path, url: str, changes: int) -> dict[str, float]:
    from shmkv.cluster.config_client import group_status, propose, wait_moved

    tc = cluster_tool()  # tools/cluster.py
    try:
        st = tc.start(3, d, join_timeout=20, raft=kind == "raft",
                      extra=["--config", url] if kind == "etcd" else None)
        seeds = st["seeds"]
        deadline = time.monotonic() + 20
        while kind == "raft" and time.monotonic() < deadline:
            g = group_status(seeds, 0.5)
            if g and g.get("leader") and g.get("commit"):
                break
            time.sleep(0.1)
        lat = []
        for i in range(changes):
            t0 = time.perf_counter()
            cfg = propose(seeds[1:2], {"op": "weight", "name": "n1", "weight": 1.0 + (i + 1) / 10}, 15)
            lat.append((time.perf_counter() - t0) * 1000)
            if cfg.moving is not None:  # not timed: the next ring change waits for this move's end
                if wait_moved(seeds, cfg.moving.epoch, 30) is not None:
                    raise SystemExit(f"{kind}: the move of epoch {cfg.moving.epoch} did not end within 30 s")
        lat.sort()
        return {"median_ms": round(statistics.median(lat), 1),
                "p90_ms": round(percentile(lat, 90), 1), "max_ms": round(lat[-1], 1)}
    finally:
        tc.stop(d, grace=5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    EtcdServer = repo_import("tests.cluster.etcd_server").EtcdServer  # relative imports inside
    tmp = Path(tempfile.mkdtemp(prefix="shmkv-config-commit."))
    etcd = EtcdServer(tmp / "etcd")
    etcd.start()
    try:
        out = {kind: measure(kind, tmp / kind, etcd.url("/bench"), a.changes) for kind in ("raft", "etcd")}
    finally:
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # etcd's data, the daemons' Raft logs and state
    out["etcd_over_raft_median"] = round(out["etcd"]["median_ms"] / out["raft"]["median_ms"], 2)
    print(f"{'':6} {'median':>8} {'p90':>8} {'max':>8}   (ms per committed change, {a.changes} changes)")
    for kind in ("raft", "etcd"):
        r = out[kind]
        print(f"{kind:6} {r['median_ms']:>8} {r['p90_ms']:>8} {r['max_ms']:>8}")
    print(f"etcd / raft (medians): {out['etcd_over_raft_median']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
