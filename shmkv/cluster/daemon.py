"""`shmkv serve`: one federation node. Wiring and shutdown only -- the logic is elsewhere.

Start: open the node's local Store (memory, plus the LSM with ``--path``), listen, learn the ring
from the seeds (membership.py), start failure handling (gossip.py's detector, handoff.py's hints:
:func:`_start_failures`, the one place the background loops of issue 12 start), then serve
(coordinator.py) and probe suspected peers.

Stop (SIGTERM or SIGINT): new requests are answered "overloaded: shutting down", the requests in
flight are answered (or fail with their own timeout) within a grace period, background read
repairs finish or are cancelled, then the transport closes and the store is closed. A node that is
not ready yet (still joining) stops at once. A memory-only node's segment is removed at a clean
stop -- its copies are gone with it, and a restart mints under a fresh actor (replica.py); with
``--path`` the segment is removed too and the copies come back from the LSM, so nothing is left
behind in /dev/shm either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import Error
from .config_hook import ConfigHook
from .config_hook import wanted as config_wanted
from .coordinator import Config, Node
from .levels import Level, check_level
from .membership import join_static
from .replica import RETIRED_KEY, Replica
from .transport import TcpTransport, pinned_source, run, split_addr

if TYPE_CHECKING:
    from ..store import Store
    from .antientropy import Service as AntiEntropyService
    from .gossip import Gossip
    from .handoff import Handoff
    from .metrics import Metrics, MetricsServer
    from .resp_server import RespServer
    from .wire import Message
    from .workers import Worker

log = logging.getLogger("shmkv.cluster")

PROBE_INTERVAL = 0.5
DRAIN_GRACE = 5.0


@dataclass
class Options:
    listen: str
    seeds: list[str]
    size: str = "256MiB"
    path: str | None = None
    durability: str = "fsync"
    name: str | None = None
    weight: float = 1.0
    n: int = 3
    w: Level = 2  # a count or a consistency level (levels.py)
    r: Level = 2
    timeout: float = 1.0
    join_timeout: float = 30.0
    store: str | None = None
    resp: str | None = None
    metrics: str | None = None
    #: worker processes accepting on the one port (SO_REUSEPORT) over one shared Store;
    #: None: one per core (os.cpu_count()). 1 runs the node in this process, unsupervised.
    workers: int | None = None
    #: failure handling (gossip.py, handoff.py): seconds between gossip rounds; strict: hinted
    #: fallbacks do not count toward W (False: sloppy, the default); the bound on the hints kept
    #: per worker process
    gossip_interval: float = 1.0
    strict: bool = False
    max_hints: int = 1_000_000
    #: the configuration group (config_service.py, config_hook.py): a voter's Raft log
    #: directory; without it and without ``join`` the ring is the static one of --seeds
    raft_dir: str | None = None
    config_voters: list[str] | None = None
    join: str | None = None  # a member's host:port: join the running cluster through it
    await_add: bool = False  # with join: wait for `shmkv cluster add` instead of adding itself
    dc: str | None = None
    #: ``etcd://HOST:PORT[,...][/PREFIX]``: the configuration is kept in etcd (etcd_config.py)
    #: instead of the built-in group; excludes raft_dir, join and config_voters
    config: str | None = None
    #: the replication map (--n-per-dc dc1:2,dc2:1): replicas per key per DC; N is its sum
    n_per_dc: dict[str, int] | None = None

    #: anti-entropy (antientropy.py): seconds between rounds (0: no exchanges), tombstone grace,
    #: seconds between rebuilds of the trees from the store (0: at start-up only)
    ae_interval: float = 10.0
    tombstone_grace: float = 86400.0
    ae_rebuild: float = 3600.0
    #: load-aware balance (balance.py, autobalance.py): the configuration leader re-weights
    #: nodes whose load stays uneven; bounds are factors of each node's configured weight
    auto_balance: bool = False
    balance_threshold: float = 0.25
    balance_window: float = 60.0
    balance_cooldown: float = 120.0
    balance_bounds: tuple[float, float] = (0.5, 2.0)
    balance_metric: str = "ops"
    balance_interval: float = 1.0
    #: keys per second this node merges from anti-entropy exchanges (0: no limit)
    ae_rate: float = 10_000.0
    #: bytes per second of those copies (antientropy._cost; 0: no limit)
    ae_bytes_rate: float = 8_000_000.0
    #: bytes per second a node pushes to new owners after a ring change (rebalance.py)
    stream_rate: float = 20_000_000.0


def store_name(name: str, listen: str) -> str:
    """The local Store's name: the node name made segment-safe, plus the port (two nodes on one
    host never share a segment)."""
    _, port = split_addr(listen)
    return f"cluster.{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:64]}.{port}"


def check_options(o: Options) -> None:
    """:raises Error: bad flags, named (before anything is opened)."""
    from .errors import ConfigError
    from .quorum import check_quorum

    split_addr(o.listen)
    for extra in (o.resp, o.metrics):
        if extra is not None:
            split_addr(extra)
    for s in o.seeds + ([o.join] if o.join else []):
        split_addr(s)
    for level, what in ((o.w, "W"), (o.r, "R")):
        check_level(level, what)
        if isinstance(level, int):
            check_quorum(o.n, level, what)
    if o.n_per_dc is not None and o.n != sum(o.n_per_dc.values()):
        raise ConfigError(f"--n {o.n} differs from the sum of --n-per-dc {o.n_per_dc} "
                          f"({sum(o.n_per_dc.values())}): N is the replicas of every DC together")
    if o.config is not None:
        _check_etcd(o)
    if o.auto_balance and not (o.raft_dir or o.join):
        raise ConfigError("--auto-balance needs the configuration group (--raft-dir): its leader makes the changes")
    if not 0.05 <= o.balance_interval <= 60:
        raise ConfigError(f"--balance-interval must be 0.05..60 seconds, got {o.balance_interval}")
    from .autobalance import settings_of

    settings_of(o)  # the --balance-* flags, checked together
    if o.n_per_dc is not None and o.dc is None:
        raise ConfigError("--n-per-dc needs --dc on every node (this node has none)")
    if not o.join and (o.seeds or not o.config) and o.n > len(set(o.seeds)):
        raise ConfigError(f"N={o.n} replicas need at least {o.n} nodes, --seeds lists {len(set(o.seeds))}")
    if not o.weight > 0:
        raise ConfigError(f"--weight must be > 0, got {o.weight}")
    if o.workers is not None and not 1 <= o.workers <= 256:
        raise ConfigError(f"--workers must be 1..256, got {o.workers}")
    from .gossip import MIN_INTERVAL

    if not MIN_INTERVAL <= o.gossip_interval <= 60:
        raise ConfigError(f"--gossip-interval must be {MIN_INTERVAL}..60 seconds, got {o.gossip_interval}")
    if not o.max_hints >= 1:
        raise ConfigError(f"--max-hints must be >= 1, got {o.max_hints}")
    for flag, v in (("--ae-interval", o.ae_interval), ("--tombstone-grace", o.tombstone_grace),
                    ("--ae-rebuild", o.ae_rebuild)):
        if not v >= 0:
            raise ConfigError(f"{flag} must be >= 0 seconds, got {v}")
    if not (isinstance(o.stream_rate, (int, float)) and 0 < o.stream_rate < float("inf")):
        raise ConfigError(f"--stream-rate must be bytes per second > 0, got {o.stream_rate!r}")
    if not 0 <= o.ae_rate < float("inf"):
        raise ConfigError(f"--ae-rate must be >= 0 keys per second (0: no limit), got {o.ae_rate}")
    from .antientropy import MIN_BYTE_RATE

    if not (o.ae_bytes_rate == 0 or MIN_BYTE_RATE <= o.ae_bytes_rate < float("inf")):
        raise ConfigError(f"--ae-bytes-rate must be 0 (no limit) or at least {MIN_BYTE_RATE:g} bytes per "
                          f"second (64KiB), got {o.ae_bytes_rate:g}")
    if o.ae_interval > 0 and o.tombstone_grace < 2 * o.ae_interval:
        raise ConfigError(f"--tombstone-grace ({o.tombstone_grace} s) must be at least twice --ae-interval "
                          f"({o.ae_interval} s): a tombstone must outlive the rounds that spread it")


def _check_etcd(o: Options) -> None:
    """--config: an etcd:// URL, alone of the configuration flags, and a client to speak it."""
    import importlib.util

    from .errors import ConfigError
    from .etcd_kv import parse_url

    assert o.config is not None
    parse_url(o.config)  # :raises ConfigError: naming the URL
    clash = [flag for flag, v in (("--raft-dir", o.raft_dir), ("--join", o.join),
                                  ("--config-voters", o.config_voters)) if v]
    if clash:
        raise ConfigError(
            f"--config {o.config} keeps the configuration in etcd; {' and '.join(clash)} belong to the "
            "built-in Raft group: give one or the other (a node not in etcd's ring adds itself, "
            "or waits for `shmkv cluster add` with --await-add)"
        )
    if importlib.util.find_spec("aetcd") is None:  # found, not imported: gRPC must not start before a fork
        raise ConfigError(f"--config {o.config} needs the etcd client aetcd: pip install 'shmkv[etcd]'")


def open_store(o: Options, sname: str) -> Store:
    """The node's local Store (created here, or attached: every worker of the node shares it)."""
    from .. import store as store_mod

    if o.path is not None:
        return store_mod.attach(sname, size=o.size, path=o.path, durability=o.durability)
    return store_mod.attach(sname, size=o.size)  # memory only: durability is a property of the disk tier


def node_name(o: Options) -> str:
    return o.name or f"node-{split_addr(o.listen)[1]}"


def retire(kv: Store) -> None:
    """Mark the segment as left behind before it is unlinked: a zero-hop reader still mapping it
    (client.py's local reads) sees the mark and re-attaches instead of serving copies the node
    no longer keeps."""
    with contextlib.suppress(Error, OSError):
        kv.put(RETIRED_KEY, b"1")


async def _main(o: Options, worker: Worker | None = None) -> int:
    """One node (``worker`` None), or one worker process of a supervised node (workers.py):
    then the Store is the supervisor's, inherited across fork, and the supervisor -- not this
    process -- says "ready" and removes the segment at the end."""
    from .. import store as store_mod

    name = node_name(o)
    config = Config(name=name, addr=o.listen, weight=o.weight, n=o.n, w=o.w, r=o.r, timeout=o.timeout,
                    strict=o.strict, dc=o.dc, n_per_dc=o.n_per_dc)
    sname = o.store or store_name(name, o.listen)
    kv = worker.store if worker is not None else open_store(o, sname)
    transport = TcpTransport(reuse_port=worker is not None, source=pinned_source(o.listen))  # gossip.py checks it
    node = Node(config, transport, Replica(kv, name))
    node.batch_replica_requests = True  # one REPLICA_GET_MANY / PUT_MANY per replica per loop iteration (coordinator.py)
    node.local = {"name": name, "store": sname, "host": socket.gethostname()}
    if worker is not None:
        node.local.update(worker=worker.index, workers=worker.count)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    rc = 0
    probe_task: asyncio.Task[None] | None = None
    failures: _Failures | None = None
    hook: ConfigHook | None = None
    fronts = _Fronts(o, node, kv, worker)
    ae: AntiEntropyService | None = None
    try:
        bound = await transport.serve(o.listen, _ae_first(lambda: ae, fronts.handler()))
        log.info("%s%s listening on %s (store %s%s)", name, f" worker {worker.index}" if worker else "",
                 bound, sname, f", path {o.path}" if o.path else "")
        deadline = loop.time() + o.join_timeout
        if config_wanted(o):
            hook = ConfigHook(o, node, transport, kv, worker)
        join = loop.create_task(hook.learn(deadline) if hook else join_static(config, o.seeds, transport, deadline))
        stopper = loop.create_task(stop.wait())
        await asyncio.wait({join, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not join.done():
            join.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await join
            return 0
        ring = join.result()  # raises ConfigError on a conflict
        node.ring = ring
        failures = _start_failures(o, node, transport, sname, worker)
        fronts.share(failures)
        ae = _start_antientropy(o, node, worker)  # before any request is served: no write missed
        shares = ring.shares()
        # with --workers each worker logs its own line, naming itself (the supervisor prints
        # the one "ready NAME ADDR workers K" line tools/cluster.py waits for)
        log.info(
            "%s%s ready: ring epoch %d, %d members (%s), N=%d W=%d R=%d",
            name, "" if worker is None else f" worker {worker.index}/{worker.count}",
            ring.epoch, len(ring.members),
            ", ".join(f"{m} {shares[m]:.1%}" for m in ring.members), o.n, o.w, o.r,
        )
        await fronts.start()
        if hook is not None:
            await hook.start()
            if fronts.metrics is not None:
                fronts.metrics.balance = hook.balance
        await ae.start()
        if worker is not None:
            worker.ready()
        else:
            print(f"ready {name} {bound}{fronts.describe()}", flush=True)
        probe_task = loop.create_task(node.probe_forever(PROBE_INTERVAL))
        tune_gc()
        await stopper
        log.info("%s stopping: draining %d requests in flight", name, node.in_flight)
        if not await node.drain(DRAIN_GRACE):
            log.warning("%s: some requests or repairs did not finish within %.0f s", name, DRAIN_GRACE)
    except Error as e:
        log.error("%s: %s", name, e)  # logging goes to stderr: the operator sees why
        rc = 2
    except OSError as e:  # the listen address is taken or not ours
        log.error("%s: cannot listen on %s: %s", name, fronts.starting or o.listen, e)
        rc = 2
    finally:
        if failures is not None:
            await failures.stop()
        if ae is not None:
            await ae.stop()
        await fronts.close()
        if hook is not None:
            await hook.close()
        if probe_task is not None:
            probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe_task
        await transport.close()
        if worker is None:
            retire(kv)
            kv.close()
            with contextlib.suppress(Error, OSError):
                store_mod.unlink(sname)
        else:
            kv.close()  # this process's handle only; the supervisor keeps the segment
    return rc


#: gen0 threshold of the daemon's cyclic GC (Python's default: 700). See tune_gc.
GC_GEN0 = 20_000


def tune_gc() -> None:
    """Move everything the start made (ring tables, modules, the Merkle trees' first build)
    out of the cyclic GC's reach (``gc.freeze``) and collect the youngest generation every
    GC_GEN0 allocations instead of 700.

    Why: the hot path makes no reference cycles (its garbage is freed by reference counting),
    yet a coordinator with 50 requests in flight had the GC run every ~13 requests, promote
    the in-flight requests' objects, and run a full collection over some 60,000 objects a dozen
    times in 20,000 requests: 12 % of its CPU and multi-millisecond pauses in the tail of
    every request then in flight (measured, README "where the daemon's time goes"). With
    the start frozen and in-flight objects given time to die young, a young collection scans
    at most GC_GEN0 objects (well under a millisecond) and full ones become rare and small.
    Rejected: ``gc.disable()`` -- a cycle made anywhere (an exception's traceback, a library)
    would then never be freed.
    """
    import gc

    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0, g1, g2)


class _Failures:
    """Failure handling's loops in this process: gossip (its owner only) and hint delivery."""

    def __init__(self, gossip: Gossip, handoff: Handoff, board_store: Store | None) -> None:
        self.gossip = gossip
        self.handoff = handoff
        self.board_store = board_store

    async def stop(self) -> None:
        await self.gossip.stop()
        await self.handoff.stop()
        self.handoff.hints.close()
        if self.board_store is not None:
            self.board_store.close()  # this process's handle; the supervisor removes it


def _start_failures(o: Options, node: Node, transport: TcpTransport, sname: str, worker: Worker | None) -> _Failures:
    """Gossip (gossip.py) and hinted handoff (handoff.py) for this process, wired into ``node``.
    One process of the node owns gossip (worker 0, or the only one); the workers share the view
    and the verdicts through a small memory-only store (gossip.py says why)."""
    from .. import store as store_mod
    from .gossip import BOARD_SIZE, Gossip, LocalBoard, StoreBoard, board_name
    from .handoff import Handoff, hints_dir, node_counts
    from .hints import HintStore

    ring = node.ring
    assert ring is not None
    index, count = (0, 1) if worker is None else (worker.index, worker.count)
    board_store = None if worker is None else store_mod.attach(board_name(sname), size=BOARD_SIZE)
    board = LocalBoard() if board_store is None else StoreBoard(board_store)
    members = {m.name: m.addr for m in ring.members.values()}
    gossip = Gossip(node.config.name, members, transport, board=board, owner=index == 0,
                    interval=o.gossip_interval)
    path = None if o.path is None else hints_dir(o.path, index)
    hints = HintStore(path, max_hints=o.max_hints, fsync=o.durability == "fsync")
    handoff = Handoff(node.config.name, hints, transport, node._ring,
                      lambda peer: node._alive(peer), n=node.config.n, timeout=max(1.0, o.timeout),
                      board=board if worker is not None else None, index=index)
    handoff.test_bug = node.test_bug  # coordinator.TEST_BUG_ENV: None outside the torture tests
    node.gossip, node.handoff = gossip, handoff

    node.status_extra["members"] = gossip.peers  # this node's gossip view: peer -> state, phi
    node.status_extra["hints"] = (
        handoff.counts if worker is None else lambda: node_counts(board.hints(count))
    )
    gossip.start()
    handoff.start()
    if len(hints):
        log.info("%s: %d hints pending from before the restart: %s", node.config.name, len(hints), hints.owners())
    return _Failures(gossip, handoff, board_store)


def _start_antientropy(o: Options, node: Node, worker: Worker | None) -> AntiEntropyService:
    from .antientropy import Settings, service

    settings = Settings(interval=o.ae_interval, grace=o.tombstone_grace, rebuild=o.ae_rebuild,
                        timeout=max(5.0, 5 * o.timeout), rate=o.ae_rate,
                        byte_rate=o.ae_bytes_rate)
    return service(node, settings, None if worker is None else worker.index,
                   1 if worker is None else worker.count)


def _ae_first(
    ae: Callable[[], AntiEntropyService | None], handler: Callable[[Message], Awaitable[Message]]
) -> Callable[[Message], Awaitable[Message]]:
    """The node's handler with anti-entropy's codes answered first (once it is started)."""
    from .antientropy import AE_CODES

    def handle(msg: Message) -> Awaitable[Message]:
        # a plain function handing on the handler's awaitable: no coroutine of its own per
        # request
        svc = ae()
        if svc is not None and msg.code in AE_CODES:
            return svc.wrap(handler)(msg)
        return handler(msg)

    return handle


class _Fronts:
    """The optional --resp and --metrics listeners (resp_server.py, metrics.py): started once
    the node is ready, closed before the transport. Without the flags nothing here costs.

    With ``--workers K``: every worker serves RESP on the one port (SO_REUSEPORT, as the wire
    port); only worker 0 listens on the metrics port and serves every worker's series, which
    each worker publishes on the node's board (metrics.py says why)."""

    def __init__(self, o: Options, node: Node, kv: Store, worker: Worker | None = None) -> None:
        self.o = o
        self.node = node
        self.worker = worker
        self._publish: asyncio.Task[None] | None = None
        self.starting: str | None = None  # the address being bound (for the error message)
        self.metrics: Metrics | None = None
        self.resp_bound: str | None = None
        self.metrics_bound: str | None = None
        self._servers: list[RespServer | MetricsServer] = []
        if o.metrics is not None:
            from .metrics import Metrics

            self.metrics = Metrics(node, kv)

    def share(self, failures: _Failures) -> None:
        """With workers, publish this worker's series through the node's board."""
        if self.metrics is not None and self.worker is not None and failures.board_store is not None:
            from .gossip import StoreBoard

            self.metrics.share(StoreBoard(failures.board_store), self.worker.index, self.worker.count)

    def handler(self) -> Callable[[Message], Awaitable[Message]]:
        return self.node.handle if self.metrics is None else self.metrics.timed(self.node.handle)

    async def start(self) -> None:
        if self.o.resp is not None:
            from .resp_server import RespServer

            # every worker of a node serves the one RESP port (node.local names the worker)
            srv = RespServer(self.node, self.metrics, reuse_port="worker" in self.node.local)
            self.starting = self.o.resp
            self.resp_bound = await srv.start(self.o.resp, reuse_port=self.worker is not None)
            self._servers.append(srv)
            if self.metrics is not None:
                self.metrics.resp = srv
        if self.metrics is not None and self.metrics.board is not None:
            self._publish = asyncio.get_running_loop().create_task(self.metrics.publish_forever())
        if self.metrics is not None and self.o.metrics is not None and (self.worker is None or self.worker.index == 0):
            from .metrics import MetricsServer

            msrv = MetricsServer(self.metrics)  # worker 0 alone: one scrape sees the whole node
            self.starting = self.o.metrics
            self.metrics_bound = await msrv.start(self.o.metrics)
            self._servers.append(msrv)
        self.starting = None

    def describe(self) -> str:
        return (f" resp {self.resp_bound}" if self.resp_bound else "") + (
            f" metrics {self.metrics_bound}" if self.metrics_bound else ""
        )

    async def close(self) -> None:
        if self._publish is not None:
            self._publish.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publish
            self._publish = None
        for srv in reversed(self._servers):
            await srv.close()
        self._servers.clear()


#: Profiling hook for the speed work (bench/RESULTS.md, "where the daemon's time goes"): with
#: ``SHMKV_PROFILE=PREFIX`` each daemon process runs under cProfile and writes
#: ``PREFIX.<pid>.prof`` when it stops (SIGTERM), timed by the process's CPU clock. Costs
#: nothing unset.
PROFILE_ENV = "SHMKV_PROFILE"


def _run_profiled(main: Coroutine[Any, Any, int]) -> int:
    prefix = os.environ.get(PROFILE_ENV)
    if not prefix:
        return run(main)
    import cProfile
    import time as _time

    # CPU time, not wall time: on a shared machine a wall-clock profile charges a function for
    # the time its process sat preempted (a write syscall that woke the peer, say)
    prof = cProfile.Profile(_time.process_time)
    prof.enable()
    try:
        return run(main)
    finally:
        prof.disable()
        prof.dump_stats(f"{prefix}.{os.getpid()}.prof")


def main_node(o: Options) -> int:
    """Run the node in this process (one worker, unsupervised) until SIGTERM/SIGINT."""
    return _run_profiled(_main(o))


def run_worker(o: Options, worker: Worker) -> int:
    """The body of one forked worker process (workers.py)."""
    return _run_profiled(_main(o, worker))


__all__ = ["Options", "main_node", "store_name", "check_options", "open_store", "run_worker", "retire"]
