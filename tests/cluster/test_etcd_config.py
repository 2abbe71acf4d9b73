"""``--config etcd://``: the configuration kept in a real etcd (etcd_kv.py, etcd_config.py).

Nodes here are in-process coordinators on real loopback sockets, each with an
EtcdConfigService, all on one event loop; etcd is a real ``etcd`` process (etcd_server.py),
started with a temporary data dir and free ports and stopped by PID. One etcd serves the
module, each test under its own key prefix; the restart test runs its own. Skipped, naming
what is missing, without etcd or aetcd.

Specs: founders racing on an empty etcd initialise the key once and all serve the winner's
ring; a change checked against a stale epoch fails "config changed concurrently" and changes
nothing, and concurrent changes never lose one; every node's watch applies every change in
order; etcd restarting is survived (serving on, changes refused fast, then followed again);
a node not in the ring adds itself; bad flags are refused at start naming the problem. Moves
as with the built-in group: a ring change records one in the key, a ring change meanwhile is
refused in the same words, each old owner's report is a transaction (retried when it loses the
compare-and-swap to another report), the last ends it, ``cluster status`` shows it and
``cluster finish-move --force`` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.cluster_config import ClusterConfig, check
from shmkv.cluster.coordinator import Config, Node
from shmkv.cluster.daemon import Options, check_options
from shmkv.cluster.errors import ConcurrentChange, ConfigError
from shmkv.cluster.etcd_config import BUSY, EtcdConfigService
from shmkv.cluster.etcd_kv import EtcdKV, EtcdUnavailable, Read, parse_url
from shmkv.cluster.replica import Replica
from shmkv.cluster.ring import Ring
from shmkv.cluster.transport import TcpTransport, run
from shmkv.cluster.wire import Message, Overloaded

from .etcd_server import EtcdServer, free_ports
from .local_cluster import cli as _cli

pytestmark = pytest.mark.slow

_seq = itertools.count()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def url(etcd: EtcdServer) -> str:
    return etcd.url(f"/t{uuid.uuid4().hex[:12]}")


class Cluster:
    """``count`` nodes n1.. with N=3, each a Node on 127.0.0.1 plus an EtcdConfigService;
    ``changes[name]``: the epochs its on_change saw, in order."""

    def __init__(self, url: str, count: int = 3) -> None:
        self.url = parse_url(url)
        self.addrs = [f"127.0.0.1:{p}" for p in free_ports(count)]
        self.nodes: dict[str, Node] = {}
        self.services: dict[str, EtcdConfigService] = {}
        self.changes: dict[str, list[int]] = {}
        self.stores: list[shmkv.Store] = []

    def add(self, name: str, addr: str) -> EtcdConfigService:
        store = shmkv.attach(f"etcdtest.{os.getpid()}.{uuid.uuid4().hex[:8]}.{next(_seq)}", size="16MiB")
        self.stores.append(store)
        node = Node(Config(name, addr, n=3, w=2, r=2, timeout=0.5), TcpTransport(), Replica(store, name))
        seen = self.changes.setdefault(name, [])

        def on_change(_old: Ring | None, new: Ring) -> None:
            seen.append(new.epoch)

        svc = EtcdConfigService(node, node.transport, self.url, on_change=on_change)
        self.nodes[name], self.services[name] = node, svc
        return svc

    async def serve(self, name: str) -> None:
        node = self.nodes[name]
        await node.transport.serve(node.config.addr, node.handle)

    async def found(self, within: float = 10.0) -> list[Ring]:
        """Every node started as a founder (--seeds all of them), concurrently, as the daemon does."""
        for i, addr in enumerate(self.addrs):
            self.add(f"n{i + 1}", addr)
        for name in self.nodes:
            await self.serve(name)
        deadline = asyncio.get_running_loop().time() + within
        rings = await asyncio.gather(*(svc.learn(self.addrs, False, None, deadline)
                                       for svc in self.services.values()))
        for name, ring in zip(self.nodes, rings, strict=True):
            self.nodes[name].ring = ring
            self.services[name].start()
        return rings

    async def close(self) -> None:
        for svc in self.services.values():
            await svc.close()
        for node in self.nodes.values():
            await node.transport.close()
        for store in self.stores:
            name = store.name
            store.close()
            with contextlib.suppress(shmkv.Error, OSError):
                shmkv.unlink(name)


@contextlib.asynccontextmanager
async def cluster(url: str, count: int = 3) -> AsyncIterator[Cluster]:
    c = Cluster(url, count)
    try:
        yield c
    finally:
        await c.close()


async def until(what: str, fn: Any, within: float = 10.0) -> Any:
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not within {within:g} s (last: {last!r})")


def weight(name: str, w: float) -> dict[str, Any]:
    return {"op": "weight", "name": name, "weight": w}


# -- bad flags (no etcd needed) -------------------------------------------------------------


@pytest.mark.parametrize("bad", ["etcd://", "http://127.0.0.1:2379", "etcd://localhost", "etcd://h:99999",
                                 "etcd://h:1,,h:2", "zk://a:1"])
def test_a_bad_config_url_is_refused_at_start_naming_it(bad: str) -> None:
    with pytest.raises(ConfigError, match="etcd://HOST:PORT") as e:
        check_options(Options(listen="127.0.0.1:7000", seeds=["127.0.0.1:7000"], n=1, w=1, r=1, config=bad))
    assert repr(bad) in str(e.value)


def test_config_etcd_with_raft_dir_or_join_is_refused(tmp_path: Path) -> None:
    base: dict[str, Any] = dict(listen="127.0.0.1:7000", seeds=["127.0.0.1:7000"], n=1, w=1, r=1,
                                config="etcd://127.0.0.1:2379")
    with pytest.raises(ConfigError, match="--raft-dir belong to the built-in Raft group"):
        check_options(Options(**base, raft_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="--join"):
        check_options(Options(**base, join="127.0.0.1:7001"))
    check_options(Options(**base))  # alone it is fine


def test_url_forms() -> None:
    u = parse_url("etcd://10.0.0.1:2379,[::1]:2380/prod/kv/")
    assert u.endpoints == (("10.0.0.1", 2379), ("::1", 2380)) and u.key == b"/prod/kv/config"
    assert str(u) == "etcd://10.0.0.1:2379,[::1]:2380/prod/kv"
    assert parse_url("etcd://h:1").key == b"/shmkv/config"


# -- the key (etcd_kv.py) -----------------------------------------------------------------------


def test_kv_cas_lets_one_of_two_changes_of_one_revision_through(url: str) -> None:
    async def go() -> None:
        kv = EtcdKV(parse_url(url))
        try:
            assert (await kv.get()).value is None
            created, first = await kv.create(b"v1")
            assert created and first.value == b"v1"
            again, now = await kv.create(b"other")
            assert not again and now.value == b"v1"  # created once: the second sees the first
            rev = await kv.cas(b"v2", first.mod_revision)
            with pytest.raises(ConcurrentChange, match="config changed concurrently.*retry") as e:
                await kv.cas(b"v3", first.mod_revision)  # checked against the same revision
            assert e.value.current == b"v2"
            got = await kv.get()
            assert got.value == b"v2" and got.mod_revision == rev and got.version == 2
        finally:
            await kv.close()

    run(go())


def test_kv_watch_delivers_every_write_in_revision_order(url: str) -> None:
    async def go() -> None:
        kv, writer = EtcdKV(parse_url(url)), EtcdKV(parse_url(url))
        seen: list[Read] = []
        try:
            start = await kv.get()

            async def watch() -> None:
                async for ev in kv.watch(start.revision + 1):
                    seen.append(ev)

            task = asyncio.get_running_loop().create_task(watch())
            _, rd = await writer.create(b"0")
            rev = rd.mod_revision
            for i in range(1, 20):
                rev = await writer.cas(str(i).encode(), rev)
            await until("20 events", lambda: len(seen) >= 20)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            assert [ev.value for ev in seen] == [str(i).encode() for i in range(20)]
            revs = [ev.mod_revision for ev in seen]
            assert revs == sorted(revs) and len(set(revs)) == 20
        finally:
            await kv.close()
            await writer.close()

    run(go())


def test_kv_watch_from_a_compacted_revision_says_so_and_a_fresh_read_recovers(url: str) -> None:
    async def go() -> None:
        kv = EtcdKV(parse_url(url))
        try:
            _, rd = await kv.create(b"0")
            old = rd.mod_revision
            rev = await kv.cas(b"1", old)
            client = kv._connect()
            await client.compact(rev)
            with pytest.raises(EtcdUnavailable, match=f"revision {old} was compacted"):
                async for _ in kv.watch(old):
                    pass
            assert (await kv.get()).value == b"1"  # what the follower does next
        finally:
            await kv.close()

    run(go())


# -- the service (etcd_config.py) -----------------------------------------------------------------


def test_founders_racing_on_an_empty_etcd_initialise_it_once(url: str) -> None:
    async def go() -> None:
        async with cluster(url) as c:
            rings = await c.found()
            assert {r.epoch for r in rings} == {1} and len({tuple(r.members) for r in rings}) == 1
            assert sorted(rings[0].members) == ["n1", "n2", "n3"]
            rd = await c.services["n1"].kv.get()
            assert rd.version == 1  # one create won; the others adopted it
            cfg = ClusterConfig.decode(rd.value or b"")
            assert cfg is not None and cfg.epoch == 1 and (cfg.n, cfg.w, cfg.r) == (3, 2, 2)
            assert cfg.moves and cfg.moving is None  # ring changes will record moves
            st = c.services["n2"].status()
            assert st["source"] == "etcd" and st["endpoint"] == url and st["epoch"] == 1
            assert st["revision"] == rd.mod_revision and st["connected"]

    run(go())


def test_a_change_checked_against_a_stale_epoch_fails_and_changes_nothing(url: str) -> None:
    async def go() -> None:
        async with cluster(url) as c:
            await c.found()
            n1, n2 = c.services["n1"], c.services["n2"]
            stale = await n1.kv.get()
            assert (await n2.change(weight("n1", 2.0))).epoch == 2
            real_get = n1.kv.get

            async def stale_once() -> Read:  # n1 read the key just before n2's change committed
                n1.kv.get = real_get  # type: ignore[method-assign]
                return stale

            n1.kv.get = stale_once  # type: ignore[method-assign]
            client = TcpTransport()
            try:  # through the wire, as `shmkv cluster weight` sends it: the class crosses
                with pytest.raises(ConcurrentChange,
                                   match=r"config changed concurrently.*epoch 1.*epoch 2 now.*nothing was changed, retry"):
                    wire.raise_for_error(await client.request(
                        n1.node.config.addr, Message(wire.CONFIG_CHANGE, 0, {"cmd": weight("n2", 3.0)}), 5.0))
            finally:
                await client.close()
            cfg = ClusterConfig.decode((await n1.kv.get()).value or b"")
            assert cfg is not None and cfg.epoch == 2
            assert cfg.ring.members["n2"].weight == 1.0 and cfg.ring.members["n1"].weight == 2.0

    run(go())


def test_concurrent_changes_never_lose_one(url: str) -> None:
    async def go() -> None:
        async with cluster(url) as c:
            await c.found()
            svcs = list(c.services.values())
            wanted = {"n1": 2.0, "n2": 3.0, "n3": 4.0}
            results = await asyncio.gather(*(svc.change(weight(name, w)) for svc, (name, w)
                                             in zip(svcs, wanted.items(), strict=True)), return_exceptions=True)
            ok = [name for name, r in zip(wanted, results, strict=True) if isinstance(r, ClusterConfig)]
            refused = [r for r in results if not isinstance(r, ClusterConfig)]
            # lost the compare-and-swap, or read the winner's move: each change starts a move,
            # so exactly one of them commits (cluster_config.py, "Moves")
            assert all(isinstance(r, ConcurrentChange) or (isinstance(r, ConfigError) and BUSY in str(r))
                       for r in refused), refused
            cfg = ClusterConfig.decode((await svcs[0].kv.get()).value or b"")
            assert cfg is not None and cfg.epoch == 2 and len(ok) == 1
            assert cfg.moving is not None and cfg.moving.epoch == 2
            for name, w in wanted.items():  # every committed change is there; no refused one is
                assert cfg.ring.members[name].weight == (w if name in ok else 1.0)

    run(go())


def test_every_node_applies_every_change_in_order(url: str) -> None:
    async def go() -> None:
        async with cluster(url) as c:
            await c.found()
            for i in range(5):  # each change starts a move; the operator ends it (finish-move --force)
                cfg = await c.services["n1"].change(weight("n2", 2.0 + i))
                assert cfg.epoch == 2 + 2 * i and cfg.moving is not None
                cfg = await c.services["n1"].change({"op": "streamed", "force": True, "move": cfg.epoch})
                assert cfg.moving is None
            await until("every node at epoch 11", lambda: all(
                n.ring is not None and n.ring.epoch == 11 for n in c.nodes.values()))
            for name in ("n2", "n3"):  # the watchers: each configuration, in order
                assert c.changes[name] == sorted(set(c.changes[name])) and c.changes[name][-1] == 11
            assert c.nodes["n3"].ring is not None and c.nodes["n3"].ring.members["n2"].weight == 6.0
            assert c.nodes["n3"].config.w == 2

    run(go())


def test_a_node_not_in_the_ring_adds_itself_and_an_empty_etcd_without_seeds_is_an_error(url: str) -> None:
    async def go() -> None:
        async with cluster(url) as c:
            await c.found()
            addr = f"127.0.0.1:{free_ports(1)[0]}"
            svc = c.add("n4", addr)
            await c.serve("n4")
            loop = asyncio.get_running_loop()
            ring = await svc.learn([], False, None, loop.time() + 10)
            assert ring.epoch == 2 and ring.members["n4"].addr == addr
            await until("the others see n4", lambda: all(
                n.ring is not None and "n4" in n.ring.members for n in c.nodes.values()))
        async with cluster(url + "-empty") as c2:
            svc = c2.add("x1", f"127.0.0.1:{free_ports(1)[0]}")
            with pytest.raises(ConfigError, match="holds no cluster configuration.*not in --seeds"):
                await svc.learn([], False, None, asyncio.get_running_loop().time() + 0.5)

    run(go())


# -- moves (cluster_config.py "Moves", kept in the etcd key) ---------------------------------------


def streamed(name: str, move: int) -> dict[str, Any]:
    return {"op": "streamed", "name": name, "move": move}


def test_a_move_is_kept_in_etcd_refuses_ring_changes_and_ends_with_the_last_report(url: str) -> None:
    """An add records the move in the key (old ring, old owners awaited); every node serves by
    it; a ring change meanwhile is refused in the built-in's words and writes nothing; each old
    owner's report is one transaction, a report that loses the compare-and-swap to another is
    re-checked and retried; the last ends the move; `cluster status` shows one and `cluster
    finish-move --force` ends one."""
    async def go() -> None:
        async with cluster(url) as c:
            await c.found()
            n4 = c.add("n4", f"127.0.0.1:{free_ports(1)[0]}")
            await c.serve("n4")
            await n4.learn([], False, None, asyncio.get_running_loop().time() + 10)
            n4.start()
            kv = c.services["n1"].kv
            rd = await kv.get()
            cfg = ClusterConfig.decode(rd.value or b"")
            assert cfg is not None and cfg.epoch == 2 and "n4" in cfg.ring.members
            mv = cfg.moving
            assert mv is not None and mv.epoch == 2 and mv.ring.epoch == 1
            assert sorted(mv.ring.members) == ["n1", "n2", "n3"] and mv.waiting == {"n1", "n2", "n3"}
            await until("every node serves by the move", lambda: all(
                n.moving is not None and n.moving.epoch == 2 for n in c.nodes.values()))
            # a ring change during the move: cluster_config.check's refusal, nothing written
            want = check(cfg, weight("n1", 2.0))
            assert want is not None and want.startswith(BUSY)
            with pytest.raises(ConfigError) as refused:
                await c.services["n2"].change(weight("n1", 2.0))
            assert str(refused.value) == want and not isinstance(refused.value, ConcurrentChange)
            assert (await kv.get()).mod_revision == rd.mod_revision
            assert c.services["n3"].status()["moving"] == {"epoch": 2, "from_epoch": 1, "waiting": ["n1", "n2", "n3"]}
            # the reports: one transaction each, epoch + 1, one name fewer awaited
            cfg = await c.services["n1"].change(streamed("n1", 2))
            assert cfg.epoch == 3 and cfg.moving is not None and cfg.moving.waiting == {"n2", "n3"}
            with pytest.raises(ConfigError, match="'n1' is not among the owners the move waits for"):
                await c.services["n1"].change(streamed("n1", 2))
            at3 = await kv.get()
            assert (await c.services["n2"].change(streamed("n2", 2))).epoch == 4
            real_get = c.services["n3"].kv.get

            async def stale_once() -> Read:  # n3 read the key just before n2's report committed
                c.services["n3"].kv.get = real_get  # type: ignore[method-assign]
                return at3

            c.services["n3"].kv.get = stale_once  # type: ignore[method-assign]
            cfg = await c.services["n3"].change(streamed("n3", 2))  # lost the CAS once, then committed
            assert cfg.epoch == 5 and cfg.moving is None and sorted(cfg.ring.members) == ["n1", "n2", "n3", "n4"]
            stored = ClusterConfig.decode((await kv.get()).value or b"")
            assert stored is not None and stored.epoch == 5 and stored.moving is None
            await until("every node off the move", lambda: all(
                n.moving is None and n.ring is not None and n.ring.epoch == 5 for n in c.nodes.values()))
            # the next change starts the next move; the operator ends it through the CLI
            cfg = await c.services["n1"].change(weight("n4", 2.0))
            assert cfg.epoch == 6 and cfg.moving is not None and cfg.moving.waiting == {"n1", "n2", "n3", "n4"}
            seed = c.nodes["n2"].config.addr
            await until("n2 at epoch 6", lambda: c.nodes["n2"].ring is not None and c.nodes["n2"].ring.epoch == 6)
            st = await asyncio.to_thread(_cli, "cluster", "status", "--seeds", seed, "--json")
            assert st.returncode == 0, st.stderr
            assert json.loads(st.stdout)["config"]["moving"] == {
                "epoch": 6, "from_epoch": 5, "waiting": ["n1", "n2", "n3", "n4"]}
            out = await asyncio.to_thread(_cli, "cluster", "finish-move", "--seeds", seed, "--force")
            assert out.returncode == 0 and "committed: ring epoch 7" in out.stdout, out.stdout + out.stderr
            stored = ClusterConfig.decode((await kv.get()).value or b"")
            assert stored is not None and stored.epoch == 7 and stored.moving is None
            assert stored.ring.members["n4"].weight == 2.0

    run(go())


def test_a_node_starting_during_a_move_adds_itself_once_the_move_is_over(url: str) -> None:
    async def go() -> None:
        async with cluster(url) as c:
            await c.found()
            cfg = await c.services["n1"].change(weight("n2", 2.0))
            assert cfg.moving is not None
            n4 = c.add("n4", f"127.0.0.1:{free_ports(1)[0]}")
            await c.serve("n4")
            joining = asyncio.ensure_future(n4.learn([], False, None, asyncio.get_running_loop().time() + 15))
            await asyncio.sleep(1.0)  # its add is refused while the move is on: it waits, not fails
            assert not joining.done()
            now = ClusterConfig.decode((await c.services["n1"].kv.get()).value or b"")
            assert now is not None and "n4" not in now.ring.members and now.epoch == 2
            await c.services["n1"].change({"op": "streamed", "force": True, "move": 2})
            ring = await asyncio.wait_for(joining, 15)
            assert ring.epoch == 4 and "n4" in ring.members

    run(go())


def test_a_key_written_before_moves_gets_them_at_its_next_change(url: str) -> None:
    async def go() -> None:
        async with cluster(url) as c:
            await c.found()
            kv = c.services["n1"].kv
            rd = await kv.get()
            old = ClusterConfig.decode(rd.value or b"")
            assert old is not None
            await kv.cas(dataclasses.replace(old, moves=False).encode(), rd.mod_revision)  # the old form
            cfg = await c.services["n2"].change(weight("n1", 2.0))
            assert cfg.moves and cfg.moving is not None and cfg.moving.epoch == 2

    run(go())


def test_etcd_restarting_is_survived(tmp_path: Path) -> None:
    """etcd goes away: the nodes serve on by their ring, a change is refused at once (never
    hangs), status says etcd does not answer; etcd comes back: a change commits and every
    node follows it."""
    server = EtcdServer(tmp_path / "data")
    server.start()

    async def go() -> None:
        async with cluster(server.url("/restart")) as c:
            await c.found()
            server.stop()
            await until("n2 sees etcd gone", lambda: not c.services["n2"].status()["connected"], within=15)
            assert all(n.ring is not None and n.ring.epoch == 1 for n in c.nodes.values())
            t0 = time.monotonic()
            with pytest.raises(Overloaded, match="the change was not made, retry"):
                await c.services["n1"].change(weight("n1", 2.0))
            assert time.monotonic() - t0 < 5
            server.start()
            cfg = None
            for _ in range(50):  # the first calls after the restart may still meet the old channel
                try:
                    cfg = await c.services["n1"].change(weight("n1", 2.0))
                    break
                except Overloaded:
                    await asyncio.sleep(0.2)
            assert cfg is not None and cfg.epoch == 2
            await until("every node follows etcd again", lambda: all(
                n.ring is not None and n.ring.epoch == 2 for n in c.nodes.values()), within=15)
            await until("connected again", lambda: all(s.status()["connected"] for s in c.services.values()))

    try:
        run(go())
    finally:
        server.stop()
