"""Real daemons on this machine as a :class:`~shmkv.torture.cluster.ClusterUnderTest`.

``shmkv serve`` processes on 127.0.0.1 started and stopped through tools/cluster.py (the same
functions the integration tests use), clients from ``shmkv.connect``:

- kill: SIGKILL, restart when the fault ends. The nodes are memory-only, but their segment in
  /dev/shm outlives a SIGKILLed process, so a restarted node keeps its replicas (as a node with
  ``--path`` would) -- a restart that lost them would need a fresh actor, which the daemon
  draws when its store is gone;
- pause: SIGSTOP / SIGCONT of the node's pid (connections still open, nothing answers);
- settle: every key is read at R = N (which repairs every stale replica), twice, with a pause
  for the background repairs to land -- the daemons' anti-entropy (rounds 10 s apart by
  default) is not waited for;
- final states: each node's replicas are read straight from its shared-memory store (the
  zero-hop path: ``b"v" + key`` holds the key's encoded VersionSet, cluster/replica.py).

- partition / loss (netns.py): inside the harness' private network namespace each node
  listens on its own 127.0.0.x and the faults are nftables rules between those addresses;
  outside one the run is refused with the reason (the CLI re-executes itself inside one);
- skew: every node runs under libfaketime (LD_PRELOAD, a timestamp file per node,
  FAKETIME_DONT_FAKE_MONOTONIC=1 so asyncio's timers are untouched); the fault writes
  ``+SKEW_SECONDS`` into that node's file -- its wall clock jumps ahead while it runs -- and
  the heal writes ``+0``. Refused with the reason where libfaketime is not installed.
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

from ..cluster.versions import Context, VersionSet
from ..errors import InvalidArgument

VERSIONS_PREFIX = b"v"  # cluster/replica.py: the store key of a key's VersionSet
SKEW_SECONDS = 120
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
        elif k == "delay":
            out[k] = ("message delay needs netem (not in this kernel) or a delaying proxy: "
                      "use --simulate for delays")
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
                 nemesis: Iterable[str] = ("kill", "pause")) -> None:
        self.tools = _tools()
        self.kinds = list(nemesis)
        bad = unsupported(self.kinds)
        if bad:
            raise InvalidArgument("; ".join(f"nemesis {k}: {why}" for k, why in bad.items()))
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.config: dict[str, Any] = {"n": n, "w": w, "r": r, "sloppy": False}
        self._own_dir = dir is None
        self.dir = Path(dir or tempfile.mkdtemp(prefix="shmkv-torture-"))
        self.size = size
        self._clients: list[LocalClient] = []
        self._paused: set[str] = set()
        self.net: Any = None
        self.hosts: list[str] | None = None
        if any(k in ("partition", "loss") for k in self.kinds):
            from .netns import NetFaults

            self.net = NetFaults()
            self.hosts = [f"127.0.0.{i + 2}" for i in range(nodes)]
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
        self.tools.start(len(self.nodes), self.dir, n=c["n"], w=c["w"], r=c["r"], size=self.size,
                         hosts=self.hosts, envs=self.envs)

    def stop(self) -> None:
        if self.net is not None:
            self.net.heal()
        for name in list(self._paused):
            self.resume(name)
        for cl in self._clients:
            try:
                cl.close()
            except Exception:  # noqa: BLE001 -- closing a client of a dead cluster
                pass
        self.tools.stop(self.dir, grace=5.0)

    def kill(self, node: str) -> None:
        self.tools.kill(self.dir, node, signal.SIGKILL)

    def restart(self, node: str) -> None:
        self.tools.restart(self.dir, node)

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

    def skew(self, node: str) -> None:
        (self.dir / f"{node}.faketime").write_text(f"+{SKEW_SECONDS}\n")

    def unskew(self, node: str) -> None:
        (self.dir / f"{node}.faketime").write_text("+0\n")

    def client(self, timeout: float) -> LocalClient:
        c = self.config
        cl = LocalClient(self.seeds, c["n"], c["w"], c["r"], timeout)
        self._clients.append(cl)
        return cl

    def settle(self, keys: Iterable[bytes]) -> None:
        keys = list(keys)
        cl = self.client(2.0)
        for _ in range(2):
            for k in keys:
                try:
                    cl.c.get_versions(k, r=self.config["n"])
                except Exception:  # noqa: BLE001 -- convergence will say what is left
                    pass
            time.sleep(0.5)

    def final_states(self, keys: Iterable[bytes]) -> dict[str, dict[bytes, VersionSet]]:
        from .. import store as store_mod

        keys = list(keys)
        out: dict[str, dict[bytes, VersionSet]] = {}
        for name in self.nodes:
            held: dict[bytes, VersionSet] = {}
            with store_mod.attach(self._node(name)["store"], create=False) as kv:
                for k in keys:
                    raw = kv.get(VERSIONS_PREFIX + k)
                    if raw is not None:
                        held[k] = VersionSet.decode(raw)
            out[name] = held
        return out
