"""Start and stop a local shmkv cluster on 127.0.0.1 (for trying it out, tests and benchmarks).

    python tools/cluster.py start --nodes 3 --dir /tmp/c3 [--n 3 --w 2 --r 2] [--size 64MiB]
                                  [--persist] [--weights 1,1,2] [--resp] [--metrics] [--workers 2]
    python tools/cluster.py status --dir /tmp/c3
    python tools/cluster.py stop --dir /tmp/c3

``start`` picks free ports, runs one ``shmkv serve`` per node (its own session, output in
``DIR/<name>.log``, with ``--persist`` its LSM in ``DIR/<name>.data``), waits until every node is
ready, and writes ``DIR/cluster.json``: per node its name, address, pid (and the process's start
time, so a reused pid is never killed), store name and log. It prints the seeds. ``stop`` sends
SIGTERM to each recorded pid, waits for it to exit (SIGKILL after ``--grace`` seconds), and removes
any shared-memory segment a SIGKILLed node left behind.

``--workers K`` (default 1 here, unlike ``shmkv serve``'s one per core, so a test cluster of 3
nodes does not fork 3 x cores processes) runs each node as a supervisor and K worker processes;
the worker pids are recorded in cluster.json too (``workers``: pid and start time each, refreshed
by :func:`worker_pids`), and ``stop`` ends every one of them by PID after its supervisor, so no
worker outlives a stop even when its supervisor was SIGKILLed.

The functions (:func:`start`, :func:`stop`, :func:`kill`, :func:`restart`) are what the
integration tests use; every process they start is recorded in cluster.json before it is waited
for, so a failed start can always be stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

STATE = "cluster.json"


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now (bound, read, released together)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _load(d: Path) -> dict[str, Any]:
    return json.loads((d / STATE).read_text())


def _save(d: Path, state: dict[str, Any]) -> None:
    tmp = d / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, d / STATE)


def _spawn(d: Path, node: dict[str, Any], state: dict[str, Any]) -> None:
    cmd = [
        sys.executable, "-m", "shmkv.cli", "serve",
        "--listen", node["addr"], "--seeds", ",".join(state["seeds"]),
        "--name", node["name"], "--size", state["size"],
        "--n", str(state["n"]), "--w", str(state["w"]), "--r", str(state["r"]),
        "--weight", str(node["weight"]), "--store", node["store"],
        "--timeout", str(state["timeout"]), "--join-timeout", str(state["join_timeout"]),
    ] + (["--workers", str(state.get("workers", 1))]) + list(node.get("extra", []))
    if node.get("path"):
        cmd += ["--path", node["path"], "--durability", state["durability"]]
    if node.get("resp"):
        cmd += ["--resp", node["resp"]]
    if node.get("metrics"):
        cmd += ["--metrics", node["metrics"]]
    log_path = d / f"{node['name']}.log"
    # "ready" is looked for after this offset: an earlier run's line in the same log does not count
    node["log_offset"] = log_path.stat().st_size if log_path.exists() else 0
    log = open(log_path, "ab")
    try:
        env = {**os.environ, **node["env"]} if node.get("env") else None
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=env,
        )
    finally:
        log.close()
    node["pid"] = proc.pid
    node["started"] = psutil.Process(proc.pid).create_time()
    node["log"] = str(d / f"{node['name']}.log")
    _CHILDREN[proc.pid] = proc


#: Popen objects of the nodes this process started (so they are reaped, not left as zombies).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _alive(node: dict[str, Any]) -> bool:
    pid = node.get("pid")
    if not pid:
        return False
    proc = _CHILDREN.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        p = psutil.Process(pid)
        return p.create_time() == node["started"] and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _proc_alive(pid: int, started: float) -> bool:
    try:
        p = psutil.Process(pid)
        return p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def worker_pids(dir: str | os.PathLike[str], name: str) -> list[int]:
    """The live worker processes of node ``name`` (children of its supervisor), recorded in
    cluster.json so that :func:`stop` ends them by PID; [] for a one-process node."""
    d = Path(dir)
    state = _load(d)
    node = next(x for x in state["nodes"] if x["name"] == name)
    if state.get("workers", 1) <= 1 or not _alive(node):
        return []
    try:
        kids = psutil.Process(node["pid"]).children()
    except psutil.Error:
        return []
    live = []
    for k in kids:
        try:
            live.append((k.pid, k.create_time()))
        except psutil.Error:
            continue
    known = {pid: t for pid, t in node.get("workers", [])}
    known.update(live)
    node["workers"] = sorted(known.items())
    _save(d, state)
    return sorted(pid for pid, _ in live)


def _ready(node: dict[str, Any]) -> bool:
    try:
        text = Path(node["log"]).read_text(errors="replace")
    except OSError:
        return False
    return f"ready {node['name']} " in text[node.get("log_offset", 0):]


def wait_ready(d: Path, names: list[str] | None = None, timeout: float = 30.0) -> None:
    """Wait until the named nodes (all by default) logged "ready"; raise naming the laggards."""
    state = _load(d)
    nodes = [n for n in state["nodes"] if names is None or n["name"] in names]
    deadline = time.monotonic() + timeout
    while True:
        waiting = [n for n in nodes if not _ready(n)]
        if not waiting:
            return
        dead = [n for n in waiting if not _alive(n)]
        if dead:
            tails = "; ".join(f"{n['name']}: {Path(n['log']).read_text(errors='replace')[-400:]!r}" for n in dead)
            raise RuntimeError(f"nodes exited before ready: {tails}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nodes not ready after {timeout:g} s: {[n['name'] for n in waiting]}")
        time.sleep(0.05)


def start(
    nodes: int,
    dir: str | os.PathLike[str],
    *,
    n: int = 3,
    w: int | str = 2,
    r: int | str = 2,
    size: str = "64MiB",
    persist: bool = False,
    durability: str = "fsync",
    weights: list[float] | None = None,
    timeout: float = 1.0,
    join_timeout: float = 30.0,
    wait: bool = True,
    resp: bool = False,
    metrics: bool = False,
    workers: int = 1,
    hosts: list[str] | None = None,
    envs: list[dict[str, str]] | None = None,
    raft: bool = False,
    extra: list[str] | None = None,
    dcs: list[str] | None = None,
) -> dict[str, Any]:
    """Start ``nodes`` nodes (``raft``: with the configuration group, each node's Raft log in
    ``DIR/<name>.raft``); returns the state written to DIR/cluster.json. ``resp``/``metrics``:
    give each node a RESP front / a metrics endpoint on a free port too (``node["resp"]``,
    ``node["metrics"]``). ``hosts``: each node's listen address (default 127.0.0.1 for all; the
    torture harness gives each its own 127.0.0.x inside a network namespace). ``envs``: extra
    environment variables per node, kept for restarts (libfaketime's, for clock skew).
    ``extra``: more ``shmkv serve`` flags for every node (kept for restarts). ``dcs``: each
    node's ``--dc`` (node i in ``dcs[i]``)."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    if (d / STATE).exists() and any(_alive(x) for x in _load(d)["nodes"]):
        raise RuntimeError(f"{d} already runs a cluster; stop it first")
    ports = free_ports(nodes * (1 + resp + metrics))
    extra_ports = ports[nodes:]
    ports = ports[:nodes]
    tag = f"{os.getpid()}x{int(time.time() * 1000) % 10**8}"
    state: dict[str, Any] = {
        "seeds": [f"{(hosts or ['127.0.0.1'] * nodes)[i]}:{p}" for i, p in enumerate(ports)],
        "n": n, "w": w, "r": r, "size": size, "durability": durability,
        "timeout": timeout, "join_timeout": join_timeout, "workers": workers,
        "nodes": [],
    }
    for i, port in enumerate(ports):
        name = f"n{i + 1}"
        state["nodes"].append({
            "name": name,
            "addr": f"{(hosts or ['127.0.0.1'] * nodes)[i]}:{port}",
            "weight": (weights or [1.0] * nodes)[i],
            "store": f"tc{tag}.{name}",
            "path": str(d / f"{name}.data") if persist else None,
            **({"extra": list(extra)} if extra else {}),
        })
        if envs is not None and envs[i]:
            state["nodes"][-1]["env"] = dict(envs[i])
        if dcs is not None:
            state["nodes"][-1]["extra"] = [*state["nodes"][-1].get("extra", []), "--dc", dcs[i]]
        if raft:
            state["nodes"][-1]["extra"] = [*state["nodes"][-1].get("extra", []),
                                           "--raft-dir", str(d / f"{name}.raft")]
        if resp:
            state["nodes"][-1]["resp"] = f"127.0.0.1:{extra_ports.pop(0)}"
        if metrics:
            state["nodes"][-1]["metrics"] = f"127.0.0.1:{extra_ports.pop(0)}"
    _save(d, state)
    for node in state["nodes"]:
        _spawn(d, node, state)
        _save(d, state)  # the pid is on disk before anything waits on it
    if wait:
        wait_ready(d, timeout=join_timeout + 5)
        for node in state["nodes"]:
            worker_pids(d, node["name"])
        state = _load(d)
    return state


def add_node(
    dir: str | os.PathLike[str], *, via: str | None = None, weight: float = 1.0, await_add: bool = False,
    wait: bool = True, config: str | None = None, host: str = "127.0.0.1", extra: list[str] | None = None,
) -> dict[str, Any]:
    """Start one more node that joins the running cluster of DIR through ``via`` (default the
    first seed) with ``--join`` (``await_add``: it waits for ``shmkv cluster add``, and ``wait``
    must then be False); ``config``: an ``etcd://`` URL instead, the node learns the ring there.
    ``host``: its listen address; ``extra``: more ``shmkv serve`` flags (kept for restarts). Recorded in cluster.json like the others; returns its entry."""
    d = Path(dir)
    state = _load(d)
    names = {x["name"] for x in state["nodes"]}
    i = len(state["nodes"]) + 1
    while f"n{i}" in names:
        i += 1
    name = f"n{i}"
    port = free_ports(1)[0]
    tag = state["nodes"][0]["store"].rsplit(".", 1)[0]
    node = {
        "name": name, "addr": f"{host}:{port}", "weight": weight, "store": f"{tag}.{name}", "path": None,
        "extra": list(extra or []) + (["--config", config] if config else
                  ["--join", via or state["seeds"][0], "--raft-dir", str(d / f"{name}.raft")])
        + (["--await-add"] if await_add else []),
    }
    state["nodes"].append(node)
    _save(d, state)
    _spawn(d, node, state)
    _save(d, state)
    if wait:
        wait_ready(d, [name], timeout=state["join_timeout"] + 5)
        worker_pids(d, name)
    return node


def _terminate(node: dict[str, Any], sig: int, grace: float) -> None:
    if not _alive(node):
        return
    try:
        os.kill(node["pid"], sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _alive(node) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(node):
        os.kill(node["pid"], signal.SIGKILL)
        while _alive(node):
            time.sleep(0.02)
    proc = _CHILDREN.pop(node["pid"], None)
    if proc is not None:
        proc.wait()


def _end_workers(node: dict[str, Any]) -> None:
    """SIGKILL any recorded worker of ``node`` that is still alive (its supervisor is gone)."""
    for pid, started in node.get("workers", []):
        if _proc_alive(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _proc_alive(pid, started) and time.monotonic() < deadline:
                time.sleep(0.02)


def workers_alive(node: dict[str, Any]) -> list[int]:
    """Recorded workers of ``node`` still running."""
    return [pid for pid, started in node.get("workers", []) if _proc_alive(pid, started)]


def _unlink_store(node: dict[str, Any]) -> None:
    try:
        import shmkv

        shmkv.unlink(node["store"])
    except Exception:  # noqa: BLE001 -- gone already (a clean stop removes it)
        pass
    try:  # the gossip board of a node run with --workers (shmkv/cluster/gossip.py)
        import shmkv

        shmkv.unlink(node["store"] + ".live")
    except Exception:  # noqa: BLE001 -- none, or gone already
        pass


def kill(dir: str | os.PathLike[str], name: str, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to node ``name`` and wait for it to exit (SIGKILL: no cleanup at all)."""
    d = Path(dir)
    worker_pids(d, name)  # recorded first: a SIGKILLed supervisor's workers are still ended by stop
    node = next(x for x in _load(d)["nodes"] if x["name"] == name)
    _terminate(node, sig, 10.0)


def restart(dir: str | os.PathLike[str], name: str, wait: bool = True, extra: list[str] | None = None) -> None:
    """Start node ``name`` again with its recorded flags (it must be stopped)."""
    d = Path(dir)
    state = _load(d)
    node = next(x for x in state["nodes"] if x["name"] == name)
    if _alive(node):
        raise RuntimeError(f"{name} is still running (pid {node['pid']})")
    if extra is not None:
        node["extra"] = extra
    _spawn(d, node, state)
    _save(d, state)
    if wait:
        wait_ready(d, [name], timeout=state["join_timeout"] + 5)
        worker_pids(d, name)


def stop(dir: str | os.PathLike[str], grace: float = 10.0) -> None:
    """SIGTERM every node, wait (SIGKILL after ``grace`` s), remove leftover segments."""
    d = Path(dir)
    if not (d / STATE).exists():
        return
    for node in _load(d)["nodes"]:  # record the current workers (a restarted one is new)
        worker_pids(d, node["name"])
    state = _load(d)
    for node in state["nodes"]:
        if _alive(node):
            try:
                os.kill(node["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
    for node in state["nodes"]:
        _terminate(node, signal.SIGTERM, grace)
        _end_workers(node)
        _unlink_store(node)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start an N-node cluster on 127.0.0.1")
    s.add_argument("--nodes", type=int, default=3)
    s.add_argument("--dir", required=True)
    s.add_argument("--n", type=int, default=3)
    s.add_argument("--w", type=int, default=2)
    s.add_argument("--r", type=int, default=2)
    s.add_argument("--size", default="64MiB")
    s.add_argument("--persist", action="store_true", help="give each node an LSM dir (--path)")
    s.add_argument("--durability", default="fsync", choices=["fsync", "interval", "none"])
    s.add_argument("--weights", default=None, help="comma-separated weights, one per node")
    s.add_argument("--resp", action="store_true", help="give each node a RESP front (--resp)")
    s.add_argument("--metrics", action="store_true", help="give each node a metrics endpoint")
    s.add_argument("--workers", type=int, default=1, help="worker processes per node (shmkv serve --workers)")
    s.add_argument("--raft", action="store_true", help="run the configuration group (--raft-dir per node)")
    t = sub.add_parser("stop", help="stop the cluster recorded in DIR")
    t.add_argument("--dir", required=True)
    t.add_argument("--grace", type=float, default=10.0)
    st = sub.add_parser("status", help="print DIR/cluster.json with liveness")
    st.add_argument("--dir", required=True)
    a = ap.parse_args(argv)
    if a.cmd == "start":
        weights = [float(x) for x in a.weights.split(",")] if a.weights else None
        try:
            state = start(a.nodes, a.dir, n=a.n, w=a.w, r=a.r, size=a.size, persist=a.persist,
                          durability=a.durability, weights=weights, resp=a.resp, metrics=a.metrics, workers=a.workers,
                          raft=a.raft)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            stop(a.dir)
            return 1
        print(",".join(state["seeds"]))
        return 0
    if a.cmd == "stop":
        stop(a.dir, a.grace)
        return 0
    state = _load(Path(a.dir))
    for node in state["nodes"]:
        fronts = "".join(f" {k} {node[k]}" for k in ("resp", "metrics") if node.get(k))
        print(f"{node['name']} {node['addr']} pid {node.get('pid')} {'up' if _alive(node) else 'down'}{fronts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
