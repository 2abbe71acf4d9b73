"""Real daemons on this machine as a :class:`~shmkv.torture.cluster.ClusterUnderTest`.

``shmkv serve`` processes on 127.0.0.1 started and stopped through tools/cluster.py (the same
functions the integration tests use), clients from ``shmkv.connect``:

- kill: SIGKILL, restart when the fault ends. The nodes are memory-only, but their segment in
  /dev/shm outlives a SIGKILLed process, so a restarted node keeps its replicas (as a node with
  ``--path`` would) -- a restart that lost them would need a fresh actor, which the daemon
  draws when its store is gone;
- pause: SIGSTOP / SIGCONT of the node's pid (connections still open, nothing answers);
- strictness: every daemon runs with ``--strict`` (hinted fallbacks never count toward W, the
  daemon's default being sloppy), so the run's ``"sloppy": False`` -- which lets the checkers
  judge linearizability when R + W > N -- is true of the cluster, whatever the node count;
  ``strict=False`` runs the daemons sloppy and records ``"sloppy": True`` (linearizability is
  then skipped, with the reason);
- settle: anti-entropy's, not read repair's. The daemons run with ``--ae-interval`` 0.5 s (grace
  600 s: at least twice the interval, as the daemon requires, and no tombstone is collected
  during a run -- anti-entropy's documented gap); :meth:`LocalCluster.settle` reads nothing
  through a coordinator: it polls every node's stored copies (as :meth:`final_states` does)
  until each key's replicas hold equal copies, for at most ``SETTLE_LIMIT`` seconds (then the
  convergence checker says what is left, and ``settled`` records that it timed out);
- final states: each node's replicas are read straight from its shared-memory store (the
  zero-hop path: ``b"v" + key`` holds the key's encoded VersionSet, ``b"c" + key`` a counter's
  PN-state, cluster/replica.py);
- leftovers: libfaketime leaves ``/dev/shm/faketime_shm_<pid>`` and
  ``/dev/shm/sem.faketime_sem_<pid>`` behind for a SIGKILLed process; :meth:`stop` removes that
  pair for every daemon pid this cluster started (``started_pids``), and only for those.

- partition / loss (netns.py): inside the harness' private network namespace each node
  listens on its own 127.0.0.x and the faults are nftables rules between those addresses;
  outside one the run is refused with the reason (the CLI re-executes itself inside one);
- delay / hold / reset (proxy.py, why in its docstring): inside the namespace an nftables nat
  rule sends every node-to-node connection through one asyncio proxy in the harness process
  (started before the daemons, stopped after them; client connections stay direct). ``delay``
  adds ``DELAY_SECONDS`` plus up to ``DELAY_JITTER`` to every chunk the node sends and to
  every chunk sent to it; ``hold`` forwards nothing to or from the node until the fault ends
  (then the held bytes flow); ``reset`` resets the node's open connections with SO_LINGER 0
  and every new one until the fault ends. The fault log records a delay's parameters, the
  history's metadata the proxy's counters (``proxy``: connections accepted, bytes forwarded,
  resets, failed dials);
- skew: every node runs under libfaketime (LD_PRELOAD, a timestamp file per node,
  FAKETIME_DONT_FAKE_MONOTONIC=1 so asyncio's timers are untouched); the fault writes
  ``+SKEW_SECONDS`` into that node's file -- its wall clock jumps ahead while it runs -- and
  the heal writes ``+0``. Refused with the reason where libfaketime is not installed.
- scale (live scaling, the configuration group's ``add``/``remove``): the fault starts one more
  daemon with ``--join`` (it adds itself to the ring; same strictness and anti-entropy flags as
  the others) and waits, at most ``SCALE_WAIT`` s, until the group reports the add's move over;
  the heal commits ``remove`` of it, waits the same way for that move (as ``shmkv cluster remove
  --wait`` does), then stops the node (SIGTERM). The fault log names the added node. Other
  faults only hit the founding nodes. A run with ``scale`` starts the daemons with the
  configuration group (``raft=True``: tools/cluster.py ``--raft``, each voter's log in
  ``DIR/<name>.raft``); settle and the final states read the ring's current members (a
  fresh client's ring), so a removed node's copies do not count and a member added and still
  there does;
- the group watched (group.py): with the configuration group on, a :class:`GroupWatcher`
  polls every node's CONFIG every 0.2 s during the run, and :meth:`group_history` adds one
  final poll after settle -- the ``raft-group`` checker's input.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from ..cluster.errors import ClusterError
from ..cluster.versions import Context, VersionSet
from ..errors import InvalidArgument

VERSIONS_PREFIX = b"v"  # cluster/replica.py: the store key of a key's VersionSet
COUNTER_PREFIX = b"c"  # ... and of a counter's PN-state
SKEW_SECONDS = 120
#: a delay fault's added latency per direction: a peer request's round trip gains 0.2-0.3 s,
#: under the daemons' 1 s peer timeout, so most requests are slow, and some, queued behind
#: others, time out
DELAY_SECONDS = 0.1
DELAY_JITTER = 0.05
#: anti-entropy of the daemons a run starts: a round every 0.5 s; the grace (>= twice the
#: interval, daemon.check_options) outlives any run, so no tombstone is collected mid-run
AE_FLAGS = ("--ae-interval", "0.5", "--tombstone-grace", "600")
SCALE_WAIT = 40.0  # seconds a scale fault waits for its move (the add's, the remove's) to end
SETTLE_LIMIT = 30.0  # seconds settle waits for anti-entropy to converge the stored copies
FAKETIME_LEFTOVERS = ("/dev/shm/faketime_shm_{pid}", "/dev/shm/sem.faketime_sem_{pid}")
LIBFAKETIME = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
               "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
               "/usr/lib/faketime/libfaketime.so.1")


def libfaketime() -> str | None:
    return next((p for p in LIBFAKETIME if os.path.exists(p)), None)


def unsupported(kinds: Iterable[str]) -> dict[str, str]:
    """kind -> why this machine cannot inject it into real daemons (empty: all can be)."""
    from . import netns

    out: dict[str, str] = {}
    for k in kinds:
        if k in netns.NET_KINDS:
            why = netns.unavailable() or (
                None if netns.in_netns() else
                "network faults need the run inside a private network namespace "
                "(the shmkv torture CLI re-executes itself in one: unshare -rn)"
            )
            if why:
                out[k] = why
        elif k == "skew" and libfaketime() is None:
            out[k] = "clock skew needs libfaketime (apt-get install faketime)"
        elif k == "crash":
            out[k] = ("a host crash (losing what a node had not synced) is simulated only: "
                      "use --simulate; kill is the real daemons' crash")
    return out


def _tools() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "tools" / "cluster.py"
    if not path.exists():
        raise InvalidArgument(
            f"--cluster local needs tools/cluster.py from a source checkout ({path} is missing)"
        )
    spec = importlib.util.spec_from_file_location("shmkv_tools_cluster", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class LocalClient:
    """shmkv.connect's client in the KVClient shape (contexts in, contexts out)."""

    def __init__(self, seeds: list[str], n: int, w: int, r: int, timeout: float) -> None:
        import shmkv

        self.c = shmkv.connect(seeds, n=n, w=w, r=r, timeout=timeout)

    def get_versions(self, key: bytes) -> tuple[list[bytes | None], Context]:
        got = self.c.get_versions(key)
        return list(got.values), got.context

    def put(self, key: bytes, value: bytes, context: Context | None) -> Context:
        return self.c.put(key, value, context=context)

    def delete(self, key: bytes, context: Context | None) -> Context | None:
        self.c.delete(key, context=context)
        return None

    def incr(self, key: bytes, delta: int) -> int:
        return self.c.incr(key, delta)

    def read_counter(self, key: bytes) -> int:
        # No counter read in the client yet: an increment by 0 answers the value merged from
        # W replicas (recorded as a read; it adds nothing).
        return self.c.incr(key, 0)

    def close(self) -> None:
        self.c.close()


class LocalCluster:
    def __init__(self, nodes: int = 3, *, n: int = 3, w: int = 2, r: int = 2,
                 dir: str | None = None, size: str = "32MiB",
                 nemesis: Iterable[str] = ("kill", "pause"), strict: bool = True,
                 raft: bool | None = None) -> None:
        self.tools = _tools()
        self.kinds = list(nemesis)
        bad = unsupported(self.kinds)
        if bad:
            raise InvalidArgument("; ".join(f"nemesis {k}: {why}" for k, why in bad.items()))
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.strict = strict
        #: the configuration group (Raft) on every daemon: needed by scale (add/remove), and
        #: what the raft-group checker watches; default on exactly when scale is asked for
        self.raft = ("scale" in self.kinds) if raft is None else raft
        if "scale" in self.kinds and not self.raft:
            raise InvalidArgument("nemesis scale needs the configuration group (raft=True): "
                                  "add and remove are its commands")
        self.config: dict[str, Any] = {"n": n, "w": w, "r": r, "sloppy": not strict,
                                       **({"raft": True} if self.raft else {})}
        self.watcher: Any = None  # group.GroupWatcher while a run watches the group
        self.started_pids: set[int] = set()  # every daemon pid started (restarts included)
        self.settled: dict[str, Any] = {}  # what the last settle saw: converged, seconds
        self._own_dir = dir is None
        self.dir = Path(dir or tempfile.mkdtemp(prefix="shmkv-torture-"))
        self.size = size
        self._clients: list[LocalClient] = []
        self._paused: set[str] = set()
        self.net: Any = None
        self.hosts: list[str] | None = None
        self.proxy: Any = None
        from .netns import NET_KINDS, PROXY_KINDS

        if any(k in NET_KINDS for k in self.kinds):
            from .netns import NetFaults

            self.net = NetFaults()
            self.hosts = [f"127.0.0.{i + 2}" for i in range(nodes)]
        if any(k in PROXY_KINDS for k in self.kinds):
            from .proxy import MARK, Proxy

            assert self.hosts is not None
            self.proxy = Proxy(seed=nodes)
            self._proxy_mark = MARK
        self.envs: list[dict[str, str]] | None = None
        if "skew" in self.kinds:
            self.dir.mkdir(parents=True, exist_ok=True)
            lib = libfaketime()
            assert lib is not None
            self.envs = []
            for name in self.nodes:
                stamp = self.dir / f"{name}.faketime"
                stamp.write_text("+0\n")
                self.envs.append({"LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": str(stamp),
                                  "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"})

    def _node(self, name: str) -> dict[str, Any]:
        state = self.tools._load(self.dir)
        return next(x for x in state["nodes"] if x["name"] == name)

    @property
    def seeds(self) -> list[str]:
        return list(self.tools._load(self.dir)["seeds"])

    def start(self) -> None:
        c = self.config
        extra = [*AE_FLAGS, "--strict" if self.strict else "--sloppy"]
        if self.proxy is not None:  # before the daemons: their first connections go through it
            self.proxy.start()
            self.net.redirect(self.hosts, self.proxy.port, self._proxy_mark)
        try:
            self.tools.start(len(self.nodes), self.dir, n=c["n"], w=c["w"], r=c["r"], size=self.size,
                             hosts=self.hosts, envs=self.envs, extra=extra, raft=self.raft)
            if self.raft:
                self._wait_leader()
        finally:
            self._record_pids()

    def _record_pids(self) -> None:
        if (self.dir / "cluster.json").exists():
            self.started_pids.update(x["pid"] for x in self.tools._load(self.dir)["nodes"] if x.get("pid"))

    def _extra(self) -> list[str]:
        return [*AE_FLAGS, "--strict" if self.strict else "--sloppy"]

    def _wait_leader(self, within: float = 30.0) -> dict[str, Any]:
        from ..cluster.config_client import group_status

        deadline = time.monotonic() + within
        while True:
            st = group_status(self.seeds, 0.5)
            if st is not None and st.get("leader") and st.get("epoch"):
                return st
            if time.monotonic() > deadline:
                raise ClusterError(f"the configuration group elected no leader within {within:g} s")
            time.sleep(0.2)

    def _addrs(self) -> list[str]:
        return [x["addr"] for x in self.tools._load(self.dir)["nodes"]]

    def _wait_moved(self, epoch: int) -> dict[str, Any] | None:
        """Wait (at most SCALE_WAIT s) until the group's epoch is >= ``epoch`` and no move is on;
        None then, else the move (or status) still seen."""
        from ..cluster.config_client import group_status

        deadline = time.monotonic() + SCALE_WAIT
        while True:
            st = group_status(self._addrs(), 0.5)
            if st is not None and (st.get("epoch") or 0) >= epoch and st.get("moving") is None:
                return None
            if time.monotonic() > deadline:
                return (st or {}).get("moving") or {"epoch": (st or {}).get("epoch")}
            time.sleep(0.2)

    def scale_out(self) -> dict[str, Any]:
        """Start one more node that joins (adds itself); wait for the add's move. The fault
        log's ``node`` becomes the new node's name."""
        t0 = time.monotonic()
        before = self._wait_leader(10.0)["epoch"]
        # in the network namespace each node has its own 127.0.0.x (a fault on one address must
        # not hit two nodes); n4 gets 127.0.0.5 after n1..n3's .2-.4, and so on
        host = f"127.0.0.{len(self.tools._load(self.dir)['nodes']) + 2}" if self.hosts else "127.0.0.1"
        try:
            node = self.tools.add_node(self.dir, host=host, extra=self._extra())
        finally:
            self._record_pids()
        left = self._wait_moved(before + 1)
        if left is not None:
            raise ClusterError(f"added {node['name']}, but its move was not over after {SCALE_WAIT:g} s: {left}")
        return {"node": node["name"], "added_s": round(time.monotonic() - t0, 2)}

    def scale_in(self, name: str) -> dict[str, Any]:
        """``remove`` ``name`` from the ring, wait for the move (as ``cluster remove --wait``),
        then stop the node."""
        from ..cluster.config_client import propose, wait_moved

        t0 = time.monotonic()
        cfg = propose(self.seeds, {"op": "remove", "name": name}, 15.0)
        if cfg.moving is not None:
            left = wait_moved(self._addrs(), cfg.moving.epoch, SCALE_WAIT)
            if left is not None:
                raise ClusterError(f"removed {name}, but its move was not over after {SCALE_WAIT:g} s: {left}")
        self.tools.kill(self.dir, name, signal.SIGTERM)
        return {"removed_s": round(time.monotonic() - t0, 2)}

    def _targets(self) -> list[tuple[str, str, int | None]]:
        return [(x["name"], x["addr"], x.get("pid")) for x in self.tools._load(self.dir)["nodes"] if x.get("pid")]

    def watch(self, t0: float) -> None:
        """Start polling the configuration group (no-op without it)."""
        if not self.raft:
            return
        from .group import GroupWatcher

        self.watcher = GroupWatcher(self._targets, t0)
        self.watcher.start()

    def group_history(self) -> dict[str, Any] | None:
        """Stop the watcher, poll once more (after settle): ``{"observations", "final",
        "errors"}`` for the raft-group checker; None without the group."""
        w = self.watcher
        if w is None:
            return None
        w.stop()
        w.join(10)
        from ..cluster.transport import TcpTransport, run

        async def last() -> list[dict[str, Any]]:
            t = TcpTransport()
            try:
                got: list[dict[str, Any]] = await w.poll_once(t)
                return got
            finally:
                await t.close()

        final = run(last())
        self.watcher = None
        return {"observations": list(w.observations), "final": final, "errors": list(w.errors)}

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher.join(10)
        if self.net is not None:
            self.net.heal()
        for name in list(self._paused):
            self.resume(name)
        for cl in self._clients:
            try:
                cl.close()
            except Exception:  # noqa: BLE001 -- closing a client of a dead cluster
                pass
        if self.proxy is not None:
            self.proxy.clear()
        try:
            self.tools.stop(self.dir, grace=5.0)
        finally:
            self.remove_leftovers()
            if self.proxy is not None:
                self.net.unredirect()
                self.proxy.stop()
                # into the history's metadata (runner.py): proof the peers' traffic went through it
                self.config["proxy"] = dict(self.proxy.stats)

    def remove_leftovers(self) -> list[str]:
        """Remove libfaketime's /dev/shm pair of every daemon pid this cluster started that is
        gone now (a live process -- a reused pid -- keeps its files); the paths removed."""
        import psutil

        removed = []
        for pid in sorted(self.started_pids):
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                continue
            for pattern in FAKETIME_LEFTOVERS:
                path = pattern.format(pid=pid)
                try:
                    os.unlink(path)
                    removed.append(path)
                except FileNotFoundError:
                    pass
        return removed

    def kill(self, node: str) -> None:
        self.tools.kill(self.dir, node, signal.SIGKILL)

    def restart(self, node: str) -> None:
        try:
            self.tools.restart(self.dir, node)
        finally:
            self._record_pids()

    def pause(self, node: str) -> None:
        os.kill(self._node(node)["pid"], signal.SIGSTOP)
        self._paused.add(node)

    def resume(self, node: str) -> None:
        os.kill(self._node(node)["pid"], signal.SIGCONT)
        self._paused.discard(node)

    def _addr_host(self, name: str) -> str:
        return str(self._node(name)["addr"]).rpartition(":")[0]

    def partition(self, node: str, shape: str) -> None:
        others = [self._addr_host(x) for x in self.nodes if x != node]
        self.net.partition(self._addr_host(node), others, shape)

    def loss(self, node: str) -> None:
        self.net.loss(self._addr_host(node), [self._addr_host(x) for x in self.nodes if x != node])

    def heal_network(self) -> None:
        self.net.heal()

    def delay(self, node: str) -> dict[str, float]:
        self.proxy.delay(self._addr_host(node), DELAY_SECONDS, jitter=DELAY_JITTER)
        return {"delay_s": DELAY_SECONDS, "jitter_s": DELAY_JITTER}

    def hold(self, node: str) -> None:
        self.proxy.hold(self._addr_host(node))

    def reset(self, node: str) -> None:
        self.proxy.reset(self._addr_host(node))

    def heal_proxy(self, node: str) -> None:
        self.proxy.clear(self._addr_host(node))

    def skew(self, node: str) -> None:
        (self.dir / f"{node}.faketime").write_text(f"+{SKEW_SECONDS}\n")

    def unskew(self, node: str) -> None:
        (self.dir / f"{node}.faketime").write_text("+0\n")

    def members(self) -> list[str]:
        """The ring's current members (a fresh client's ring), founders when it has none."""
        cl = self.client(2.0)
        ring = cl.c.ring
        if ring is None:
            return list(self.nodes)
        return sorted(ring.members)

    def client(self, timeout: float) -> LocalClient:
        c = self.config
        cl = LocalClient(self.seeds, c["n"], c["w"], c["r"], timeout)
        self._clients.append(cl)
        return cl

    def settle(self, keys: Iterable[bytes]) -> None:
        """Wait (at most ``SETTLE_LIMIT`` s) until anti-entropy -- and hinted handoff -- made
        every key's replicas hold equal stored copies; nothing is read through a coordinator,
        so no read repair helps. A timeout is not an error here: the convergence checker
        judges the final states and names what differs."""
        keys = list(keys)
        cl = self.client(2.0)
        ring = cl.c.ring
        owners = {k: (ring.preference_list(k, self.config["n"]) if ring is not None else self.nodes)
                  for k in keys}
        members = sorted(ring.members) if ring is not None else list(self.nodes)
        t0 = time.monotonic()
        while True:
            stored = self._stored(keys, members)
            differ = [k for k in keys
                      if any(stored[o].get(k) != stored[owners[k][0]].get(k) for o in owners[k][1:])]
            took = time.monotonic() - t0
            if not differ or took > SETTLE_LIMIT:
                self.settled = {"converged": not differ, "seconds": round(took, 2), "differ": len(differ)}
                return
            time.sleep(0.25)

    def _stored(self, keys: list[bytes], members: list[str]) -> dict[str, dict[bytes, tuple[Any, Any]]]:
        """node -> key -> (VersionSet or None, PN-counter or None): its stored copies."""
        from .. import store as store_mod
        from ..cluster.crdt import PNCounter

        out: dict[str, dict[bytes, tuple[Any, Any]]] = {}
        for name in members:
            held: dict[bytes, tuple[Any, Any]] = {}
            with store_mod.attach(self._node(name)["store"], create=False) as kv:
                for k in keys:
                    v, c = kv.get(VERSIONS_PREFIX + k), kv.get(COUNTER_PREFIX + k)
                    held[k] = (None if v is None else VersionSet.decode(v),
                               None if c is None else PNCounter.decode(c))
            out[name] = held
        return out

    def final_states(self, keys: Iterable[bytes]) -> dict[str, dict[bytes, VersionSet]]:
        from .. import store as store_mod

        keys = list(keys)
        out: dict[str, dict[bytes, VersionSet]] = {}
        for name in self.members():
            held: dict[bytes, VersionSet] = {}
            with store_mod.attach(self._node(name)["store"], create=False) as kv:
                for k in keys:
                    raw = kv.get(VERSIONS_PREFIX + k)
                    if raw is not None:
                        held[k] = VersionSet.decode(raw)
            out[name] = held
        return out
