"""The daemon's Prometheus endpoint (``shmkv serve --metrics HOST:PORT``), via prometheus_client.

``GET /metrics`` (or ``/``) answers the text exposition format; anything else on the port is a
400/404 and a closed connection. The HTTP side is a few lines of asyncio on the daemon's own loop
(rejected: prometheus_client's ``start_http_server``, a thread that would read the node's
counters and the store concurrently with the loop).

What is exported:

    shmkv_requests_total{op}              requests the node handled, by wire op (client and
                                          replica requests; RESP commands count as the ops
                                          they become)
    shmkv_request_seconds{op}             latency histogram of the wire requests, per op
    shmkv_resp_command_seconds{command}   latency histogram of the RESP commands, per command
    shmkv_resp_errors_total{command,kind} RESP commands answered with an error (quorum,
                                          maybe_applied, conflict, overloaded, bad_request,
                                          internal)
    shmkv_quorum_failures_total, shmkv_maybe_applied_total, shmkv_read_repairs_total,
    shmkv_forwarded_total                 from the node's own counters
    shmkv_in_flight, shmkv_suspects, shmkv_ring_epoch, shmkv_resp_connections
    shmkv_store_<stat>                    the local store's counters and gauges (items, gets,
                                          hits, misses, puts, deletes, evictions, expired,
                                          pages used/total, segment bytes, store_full...)
    shmkv_peers{state}                    peers this node's gossip holds up / suspect / down
    shmkv_peer_phi{peer}                  the phi-accrual value of each peer (down at >= 8)
    shmkv_gossip_rejected_total           gossip entries / messages refused (malformed, forged)
    shmkv_hints_pending, shmkv_hints_bytes  hints this process keeps for down nodes
    shmkv_hints_added_total, shmkv_hints_delivered_total, shmkv_hints_dropped_total
    shmkv_hints_refused_total             hints refused because the bound (--max-hints) was hit
    shmkv_member_weight{member}           each member's weight in the ring this node serves by
                                          (auto-balance's changes show here)
    shmkv_member_configured_weight{member}  the weight an operator gave it (configuration group)
    shmkv_balance_adjustments_total       auto-balance weight changes this node committed as
                                          the configuration leader (--auto-balance)
    shmkv_balance_load{member}            the leader's view of each member's relative load
                                          (1.0: its fair share; balance.py)

With ``--workers K`` the node is K processes, and each keeps its own requests, histograms, hints
and suspects. Only worker 0 listens on the metrics port -- one scrape must see the whole node,
which K listeners behind SO_REUSEPORT would not (each scrape would land on one worker and every
counter would jump between workers' values). Every worker publishes its own series (the text
exposition) to the node's board (gossip.py's ``<store>.live``) once a second; worker 0 answers a
scrape with its own series fresh and the others' as last published (at most ``PUBLISH_EVERY``
old; a worker silent for ``STALE_AFTER`` is left out), each sample labelled ``worker="<i>"``
(``sum without (worker)`` gives the node), and the shared store's ``shmkv_store_*`` once, without
the label. Rejected: prometheus_client's multiprocess mode -- its files hold only the library's
own Counter/Histogram objects, not the node's counters that the collectors read at scrape time.

Cost. Counters the node keeps anyway (its ``Stats``) and the store's are read at scrape time by
a collector, at no cost per request. Only the histograms cost per request: one
``Histogram.observe`` (a lock and a bisect over the buckets, about 1 us; measured in
bench/RESULTS.md), and only when ``--metrics`` is given.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from . import wire
from .transport import split_addr

if TYPE_CHECKING:
    from ..store import Store
    from .autobalance import AutoBalance
    from .coordinator import Node
    from .gossip import StoreBoard
    from .resp_server import RespServer

#: Latency buckets (seconds): 50 us .. 2.5 s, dense where a local or quorum request lands.
BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5,
)

#: Store stats exported as counters (they only grow) -- the rest of the numeric ones are gauges.
_STORE_COUNTERS = frozenset({
    "gets", "hits", "misses", "puts", "deletes", "evictions", "expired", "store_full",
    "automoves", "reclaimed", "repairs", "lock_waits",
})
_STORE_GAUGES = ("items", "pages_used", "pages_total", "segment_bytes", "buckets", "processes")

Handler = Callable[[wire.Message], Awaitable[wire.Message]]

#: seconds between a worker's publications of its series (the staleness of a scrape's others)
PUBLISH_EVERY = 1.0
#: a worker whose last publication is older than this is left out of the scrape (dead or stalled)
STALE_AFTER = 10.0


class Metrics:
    """The node's registry; ``observe_*`` are the per-request hooks."""

    def __init__(self, node: Node, store: Store) -> None:
        self.node = node
        self.store = store
        self.resp: RespServer | None = None
        self.balance: AutoBalance | None = None  # set by the daemon with the configuration group
        self.registry = CollectorRegistry(auto_describe=False)
        self._wire_hist = Histogram(
            "shmkv_request_seconds", "Latency of wire requests handled by this node, per op",
            ["op"], registry=self.registry, buckets=BUCKETS,
        )
        self._resp_hist = Histogram(
            "shmkv_resp_command_seconds", "Latency of RESP commands, per command",
            ["command"], registry=self.registry, buckets=BUCKETS,
        )
        self._resp_errors = Counter(
            "shmkv_resp_errors", "RESP commands answered with an error, per command and kind",
            ["command", "kind"], registry=self.registry,
        )
        # labels() costs a dict lookup under a lock; cache the children per label value.
        self._wire_children: dict[int, Any] = {}
        self._resp_children: dict[str, Any] = {}
        self.registry.register(_NodeCollector(self))
        self.registry.register(_FailureCollector(node))
        self.registry.register(_BalanceCollector(self))
        # the store is shared by every worker of the node: its series are exported once
        self.shared = CollectorRegistry(auto_describe=False)
        self.shared.register(_StoreCollector(store))
        self.board: StoreBoard | None = None
        self.index, self.count = 0, 1

    def share(self, board: StoreBoard, index: int, count: int) -> None:
        """This process is worker ``index`` of ``count``: publish through ``board`` (and, for
        worker 0, serve every worker's series)."""
        self.board, self.index, self.count = board, index, count

    def publish(self, now: float | None = None) -> None:
        """Put this worker's own series on the board (a no-op for a lone process)."""
        if self.board is not None:
            self.board.put_metrics(self.index, time.monotonic() if now is None else now,
                                   generate_latest(self.registry))

    async def publish_forever(self, every: float = PUBLISH_EVERY) -> None:
        while True:
            self.publish()
            await asyncio.sleep(every)

    def observe_wire(self, code: int, seconds: float) -> None:
        h = self._wire_children.get(code)
        if h is None:
            h = self._wire_children[code] = self._wire_hist.labels(wire.NAMES.get(code, str(code)))
        h.observe(seconds)

    def observe_resp(self, command: str, seconds: float, error_kind: str | None) -> None:
        h = self._resp_children.get(command)
        if h is None:
            h = self._resp_children[command] = self._resp_hist.labels(command)
        h.observe(seconds)
        if error_kind is not None:
            self._resp_errors.labels(command, error_kind).inc()

    def timed(self, handler: Handler) -> Handler:
        """``handler`` with its latency observed per op (what the daemon serves the wire with)."""
        observe = self.observe_wire
        clock = time.perf_counter

        async def timed_handler(msg: wire.Message) -> wire.Message:
            t0 = clock()
            try:
                return await handler(msg)
            finally:
                observe(msg.code, clock() - t0)

        return timed_handler

    def exposition(self) -> bytes:
        own = generate_latest(self.registry)
        if self.board is None:
            return own + generate_latest(self.shared)
        now = time.monotonic()
        texts = [(self.index, own)]
        for i in range(self.count):
            got = None if i == self.index else self.board.metrics(i)
            if got is not None and now - got[0] <= STALE_AFTER:
                texts.append((i, got[1]))
        merged = CollectorRegistry(auto_describe=False)
        merged.register(_Relabelled(sorted(texts)))
        return generate_latest(merged) + generate_latest(self.shared)


class _NodeCollector:
    """Reads the node's and the store's counters at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        node = self.m.node
        st = node.stats
        req = CounterMetricFamily("shmkv_requests", "Requests handled by this node, per wire op", labels=["op"])
        for op, count in sorted(st.requests.items()):
            req.add_metric([op], count)
        yield req
        for name, value, text in (
            ("shmkv_quorum_failures", st.quorum_failures, "Requests that missed their quorum"),
            ("shmkv_maybe_applied", st.maybe_applied, "Writes that missed W after reaching a replica"),
            ("shmkv_read_repairs", st.read_repairs, "Stale replicas sent a merge by a read"),
            ("shmkv_forwarded", st.forwarded, "Requests forwarded to a replica of the key"),
        ):
            yield CounterMetricFamily(name, text, value=value)
        ring = node.ring
        yield GaugeMetricFamily("shmkv_in_flight", "Client requests being coordinated", value=node.in_flight)
        yield GaugeMetricFamily("shmkv_suspects", "Peers this node suspects down", value=len(node.suspects))
        yield GaugeMetricFamily("shmkv_ring_epoch", "Epoch of this node's ring", value=ring.epoch if ring else 0)
        resp = self.m.resp
        if resp is not None:
            yield GaugeMetricFamily("shmkv_resp_connections", "Open RESP connections", value=len(resp._conns))


class _StoreCollector:
    """The local store's counters and gauges, read at scrape time (shared by all workers)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.store.stats()
        except Exception:  # noqa: BLE001 -- a closing store: export what the node knows
            return
        for key in sorted(_STORE_COUNTERS):
            if isinstance(stats.get(key), int):
                yield CounterMetricFamily(f"shmkv_store_{key}", f"Local store: {key}", value=stats[key])
        for key in _STORE_GAUGES:
            v = stats.get(key)
            if isinstance(v, list):
                v = len(v)
            if isinstance(v, int):
                yield GaugeMetricFamily(f"shmkv_store_{key}", f"Local store: {key}", value=v)


class _Relabelled:
    """Several workers' text expositions as one set of families, each sample labelled with its
    worker (a family appears once however many workers have it, as the format requires)."""

    def __init__(self, texts: list[tuple[int, bytes]]) -> None:
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for index, text in self.texts:
            try:
                parsed = list(text_string_to_metric_families(text.decode()))
            except Exception:  # noqa: BLE001 -- a torn or foreign publication: leave it out
                continue
            for fam in parsed:
                out = families.get(fam.name)
                if out is None:
                    out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for smp in fam.samples:
                    out.add_sample(smp.name, {**smp.labels, "worker": str(index)}, smp.value, smp.timestamp)
        yield from families.values()


class _FailureCollector:
    """Gossip's verdicts and the hints (node.gossip, node.handoff), read at scrape time."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        g, h = self.node.gossip, self.node.handoff
        if g is not None:
            peers = g.peers()
            states = GaugeMetricFamily("shmkv_peers", "Peers by this node's gossip verdict", labels=["state"])
            for state in ("up", "suspect", "down"):
                states.add_metric([state], sum(1 for v in peers.values() if v.get("state") == state))
            yield states
            phi = GaugeMetricFamily("shmkv_peer_phi", "Phi-accrual suspicion of each peer (down at >= 8)",
                                    labels=["peer"])
            for peer, v in sorted(peers.items()):
                phi.add_metric([peer], float(v.get("phi", 0.0)))
            yield phi
            yield CounterMetricFamily("shmkv_gossip_rejected", "Gossip entries or messages refused",
                                      value=g.rejected)
        if h is not None:
            c = h.counts()
            yield GaugeMetricFamily("shmkv_hints_pending", "Hints kept for down nodes", value=c["pending"])
            yield GaugeMetricFamily("shmkv_hints_bytes", "Encoded bytes of the hints kept", value=c["bytes"])
            for name, text in (("added", "Hints taken"), ("delivered", "Hints handed back and acknowledged"),
                               ("dropped", "Hints dropped: owner no longer in the ring"),
                               ("refused", "Hints refused: the bound (--max-hints) was hit")):
                yield CounterMetricFamily(f"shmkv_hints_{name}", text, value=c[name])


class _BalanceCollector:
    """The ring's weights and auto-balance's counters, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        ring = self.m.node.ring
        if ring is not None:
            w = GaugeMetricFamily("shmkv_member_weight", "Each member's weight in this node's ring",
                                  labels=["member"])
            for name, m in sorted(ring.members.items()):
                w.add_metric([name], m.weight)
            yield w
        bal = self.m.balance
        if bal is None:
            return
        state = bal.service.state if bal.service is not None else None
        if state is not None:
            cw = GaugeMetricFamily("shmkv_member_configured_weight",
                                   "Each member's configured weight (auto-balance moves the ring weight within "
                                   "bounds of it)", labels=["member"])
            for name in sorted(state.ring.members):
                cw.add_metric([name], state.configured_weight(name))
            yield cw
        if bal.enabled:
            yield CounterMetricFamily("shmkv_balance_adjustments", "Auto-balance weight changes this node "
                                      "committed as configuration leader", value=bal.adjustments)
            loads = bal.policy.loads if bal.policy is not None else {}
            lf = GaugeMetricFamily("shmkv_balance_load", "Relative load of each member as the leader sees it "
                                   "(1.0: its fair share)", labels=["member"])
            for name, v in sorted(loads.items()):
                lf.add_metric([name], v)
            yield lf


class MetricsServer:
    """A minimal HTTP/1.0 responder for the scrape (one request per connection)."""

    def __init__(self, metrics: Metrics, *, read_timeout: float = 5.0, reuse_port: bool = False) -> None:
        """``reuse_port``: every worker of a ``--workers K`` node binds the one ``--metrics``
        port (SO_REUSEPORT); a scrape is answered by one of them, with that worker's figures."""
        self.metrics = metrics
        self.reuse_port = reuse_port
        self.read_timeout = read_timeout
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, addr: str) -> str:
        host, port = split_addr(addr)
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=16 * 1024, reuse_port=self.reuse_port or None
        )
        h, p = self._server.sockets[0].getsockname()[:2]
        return f"{h}:{p}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
                writer.write(_response(400, b"bad request\n"))
                return
            line = head.split(b"\r\n", 1)[0].split()
            if len(line) != 3 or line[0] not in (b"GET", b"HEAD") or not line[2].startswith(b"HTTP/"):
                writer.write(_response(400, b"bad request\n"))
                return
            path = line[1].split(b"?", 1)[0]
            if path not in (b"/metrics", b"/"):
                writer.write(_response(404, b"not found: try /metrics\n"))
                return
            body = self.metrics.exposition()
            writer.write(_response(200, b"" if line[0] == b"HEAD" else body, CONTENT_TYPE_LATEST))
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


def _response(status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    return (
        f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


__all__ = ["Metrics", "MetricsServer", "BUCKETS"]
