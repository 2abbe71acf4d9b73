"""The Python client of a shmkv cluster: ``shmkv.connect(seeds, ...)``. Synchronous, ring-aware.

Why synchronous, and how. The users are gunicorn/uWSGI/Celery workers: blocking code. The client
speaks to the nodes over blocking sockets (sync_transport.py): the calling thread takes a pooled
connection to the coordinator, sends the request encoded once with one ``sendall``, reads the
framed reply into the connection's buffer and gives the connection back -- no event loop, no
thread hop, as redis-py does it. Many threads may share one client: each request holds its own
connection while it is in flight (the pool keeps the idle ones per node). Batches (``get_many``,
``put_many``), ``status`` and the local-read facts go to several nodes at once from the one
thread: every request is sent, then every reply read, under one deadline. Rejected: the asyncio
TcpTransport on a private loop thread (what this client was) -- the hop to the loop and back, two
thread switches and a self-pipe write per call, cost more than the round trip to a node on
127.0.0.1 (bench/RESULTS.md, "Cluster": 0.17x redis-py's GET). After ``fork()`` the child forgets
the parent's connections (``os.register_at_fork``) and opens its own on first use (a prefork
server may connect before it forks).

Timeouts. Every attempt at one coordinator is bounded by twice ``timeout`` (the coordinator
waits ``timeout`` for its replicas, the client one more for the answer), connect included. A
read tries the next node of the preference list after a timeout or a broken connection; a write
whose request left whole is never re-sent: its timeout raises :class:`MaybeApplied`.

Routing. The client fetches the ring (RING) from the first seed that answers and sends each
request to the key's coordinator -- the first node of the key's preference list that it does not
suspect -- with the ring's epoch; a node answering "wrong epoch" makes it fetch the ring again and
retry once. A node that cannot be reached (the request never left) is suspected and the next one
of the preference list is tried; a write whose request was sent and not answered is never retried
behind the caller's back -- it raises :class:`MaybeApplied`.

Data centres (``connect(seeds, dc="dc1")``). W and R may be consistency levels (levels.py:
``"one"``, ``"quorum"``, ``"all"``, ``"local_quorum"``, ``"each_quorum"``). A client with a ``dc``
tries the key's replicas in its own DC first, so a local_quorum request is coordinated -- and its
quorum counted -- in that DC; a cut-off remote DC then costs it nothing.

Siblings. ``get`` returns the value when the replicas agree on one. With concurrent versions it
calls ``resolve(values) -> value`` when the client has one (and writes the result back with the
context, so the siblings collapse) or raises :class:`Conflict` with ``.values`` and ``.context``;
``put(key, value, context=conflict.context)`` then supersedes exactly those versions.

Zero-hop local reads (``connect(seeds, local=True)``). A node keeps its copies in its host's
shmkv Store, so a process on that host can read them from shared memory with no request at
all. The client asks every member for its ``local`` facts (RING answers them: node name, store
name, host name) and attaches the store of each member on this host read-side
(``create=False``). Then a get with R=1 of a key whose preference list holds such a node is
served from that node's segment, decoded exactly as a network answer (one value, or siblings
-> ``resolve``/``Conflict``); every other request goes over the network. What that read is: the
R=1 answer of that one replica -- what it holds now, which may be older than a write that W
other replicas acknowledged, and it does no read repair. It never returns a value the replica
does not hold: the segment *is* the replica. A node that stops cleanly marks its segment
retired before removing it (daemon.retire); a local read that sees the mark re-attaches the new
segment (a restarted node) or, failing that, goes over the network with a logged warning, as a
failed attach at connect does. A node SIGKILLed leaves its segment, still its replica's copies
(the restarted node attaches the same one): local reads go on serving them while it is down.
Rejected: asking the node for a lease per read (a hop, the thing this avoids).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgpack

from ..errors import InvalidArgument, InvalidType
from . import wire
from .errors import ClusterError, ConfigError, Conflict, MaybeApplied, QuorumError, WrongEpoch
from .levels import Level, check_level
from .quorum import check_quorum
from .replica import RETIRED_KEY, VERSIONS
from .ring import Ring
from .sync_transport import Pool
from .sync_transport import frame as _frame
from .transport import RequestTimeout, Unreachable
from .versions import MAX_TTL_MS, Context, VersionSet
from .wire import Message, Overloaded

log = logging.getLogger("shmkv.cluster")

#: Seconds a node that failed to answer is routed to last (then it gets its turn again).
SUSPECT_FOR = 2.0
#: Keys whose local-read route (which attached store, if any) a client remembers.
LOCAL_ROUTES = 1 << 16
#: Seconds after which a local node that could not be attached is looked for again.
LOCAL_RETRY = 1.0

Resolver = Callable[[list[bytes | None]], bytes | None]
KeyLike = bytes | bytearray | memoryview | str
LocalSpec = bool | str | Sequence[str]


class Versions(NamedTuple):
    """What ``get_versions`` returns: every concurrent value (``None`` for a concurrent delete;
    empty when the key was never written or is deleted) and the context to write back with."""

    values: list[bytes | None]
    context: Context


class NoSeedReachable(ClusterError, ConnectionError):
    """None of the seeds answered (or none had a ring yet)."""


def _key(key: KeyLike) -> bytes:
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, (bytes, bytearray, memoryview)):
        b = bytes(key)
        if b:
            return b
        raise InvalidType("a key must not be empty")
    raise InvalidType(f"a key must be bytes or str, got {type(key).__name__}")


def _value(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidType(f"a value must be bytes-like, got {type(value).__name__}")


def _context(ctx: Context | bytes | None) -> bytes | None:
    if ctx is None:
        return None
    if isinstance(ctx, Context):
        return ctx.encode()
    if isinstance(ctx, bytes):
        return ctx
    raise InvalidType(f"context must be what get_versions/Conflict gave, got {type(ctx).__name__}")


class Client:
    """A connection to a cluster; see the module docstring. Use :func:`connect`."""

    def __init__(
        self,
        seeds: Sequence[str] | str,
        n: int | None = 3,
        w: Level = 2,
        r: Level = 2,
        timeout: float = 1.0,
        resolve: Resolver | None = None,
        local: LocalSpec = False,
        dc: str | None = None,
    ) -> None:
        """See :func:`connect`; ``n=None`` takes the cluster's N (tools that read no keys)."""
        if isinstance(seeds, str):
            seeds = [s for s in seeds.split(",") if s]
        if not seeds:
            raise ConfigError("connect() needs at least one seed address")
        if n is not None:
            _check(n, w, "W")
            _check(n, r, "R")
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0, got {timeout}")
        self.seeds = list(seeds)
        self.n: int = n  # type: ignore[assignment]  # None only until the ring is fetched
        self.w, self.r = w, r
        self.dc = dc
        self.timeout = float(timeout)
        self._timeout_ms = max(1, int(self.timeout * 1000))  # the coordinator's, on every request
        self.resolve = resolve
        # (the ring, per vnode index of it the preference list of its keys with this client's
        # DC first, and the one preference list of every key when the ring has one member --
        # no hash to route by -- else None): one attribute, so a thread routing while another
        # swaps the ring reads a matching set; the lists are filled as keys are routed
        self._routing: tuple[Ring | None, dict[int, tuple[str, ...]], tuple[str, ...] | None] = (None, {}, None)
        # node -> when it was suspected; a suspect is tried last, for SUSPECT_FOR seconds
        self._suspects: dict[str, float] = {}
        self._net = Pool()
        self._closed = False
        self._retry_timer: threading.Timer | None = None
        if not isinstance(local, (bool, str)) and not all(isinstance(x, str) for x in local):
            raise InvalidType("local must be True/False, a node name or a list of node names")
        self._local_spec: LocalSpec = local
        # node name -> that node's Store attached read-side (zero-hop reads), and per vnode of
        # the ring the attached store of the first local node of its preference list (or None)
        self.local_nodes: dict[str, Any] = {}
        self._local_by_vnode: list[Any] | None = None
        self._local_all: Any = None  # the one store of every entry of _local_by_vnode, if one
        self._local_stale = False
        self._local_keys: dict[bytes, tuple[Any, bytes]] = {}
        self._was_local: set[str] = set()  # nodes ever attached: looked for again when gone
        self._local_warned: set[str] = set()
        _LIVE.add(self)  # weakly held: a forked child resets its connections (_reset_after_fork)
        try:
            self.refresh_ring()
        except BaseException:
            self.close()
            raise

    @property
    def ring(self) -> Ring | None:
        """The ring requests are routed with (None only inside a failed ``connect``)."""
        return self._routing[0]

    @ring.setter
    def ring(self, ring: Ring | None) -> None:
        only: tuple[str, ...] | None = None
        if ring is not None and len(ring.members) == 1 and self.n is not None:
            try:  # what preference_list gives every key; an N it refuses is refused per request
                only = tuple(ring.preference_list(b"k", self.n))
            except ConfigError:
                only = None
        self._routing = (ring, {}, only)

    # -- the network -------------------------------------------------------------------------

    def request(self, addr: str, msg: Message, timeout: float | None = None) -> Message:
        """One request to the node at ``addr``, not routed (tools and tests: one node's STATUS).
        Its OK reply, or the error it carries raised (``wire.raise_for_error``).

        :raises Unreachable: not connected, or the connection broke. :raises RequestTimeout:
            no reply within ``timeout`` (default: the client's).
        """
        rid, frame = _frame(msg.code, dict(msg.fields))
        reply = self._net.request(addr, rid, frame, self.timeout if timeout is None else timeout)
        return wire.raise_for_error(reply)

    def _fan_out(self, code: int, addrs: Sequence[str], timeout: float) -> list[Message | BaseException]:
        """The same field-less request to every address at once; per address its OK reply or
        the error (a transport one, or the one the reply carries)."""
        rid, frame = _frame(code, {})
        out: list[Message | BaseException] = []
        for res in self._net.fan_out([(a, rid, frame) for a in addrs], timeout):
            try:
                out.append(res if isinstance(res, BaseException) else wire.raise_for_error(res))
            except ClusterError as e:
                out.append(e)
        return out

    def close(self) -> None:
        """Close the connections (and stop looking for local stores). Idempotent."""
        if self._closed:
            return
        self._closed = True
        timer = self._retry_timer
        if timer is not None:
            timer.cancel()
        self._net.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the ring --------------------------------------------------------------------------

    def refresh_ring(self) -> Ring:
        """Fetch the ring from the first seed (or known member) that answers.

        :raises NoSeedReachable: none answered. :raises ConfigError: N > nodes, or N other than
            the cluster's.
        """
        ring, defaults = self._fetch_ring()
        if self.n is None:
            self.n = int(defaults.get("n") or 1)
            self.w, self.r = (min(x, self.n) if isinstance(x, int) else x for x in (self.w, self.r))
            _check(self.n, self.w, "W")  # the defaults are checked once: _w/_r trust them
            _check(self.n, self.r, "R")
        if self.n > len(ring.members):
            raise ConfigError(f"N={self.n} replicas asked for, but the cluster has {len(ring.members)} nodes")
        if defaults.get("n") is not None and defaults["n"] != self.n:
            raise ConfigError(
                f"the cluster runs with N={defaults['n']}, the client asked for n={self.n} "
                "(N is fixed per cluster; W and R are per request)"
            )
        self.ring = ring
        if self._local_spec is not False:
            self._attach_local()
        return ring

    # -- zero-hop local reads (module docstring) ---------------------------------------------

    def _wants_local(self, name: str) -> bool:
        spec = self._local_spec
        if spec is True:
            return True
        if isinstance(spec, str):
            return name == spec
        return spec is not False and name in spec

    def _attach_local(self) -> None:
        """Find the members on this host and attach their stores; rebuild the per-vnode map.
        A node wanted but not attachable now (named in ``local=``, or local before: stopped,
        restarting) is looked for again LOCAL_RETRY seconds later, by a timer thread that marks
        the map stale -- the read path itself never looks at a clock."""
        from .. import store as store_mod
        from ..errors import Error

        assert self.ring is not None
        facts = self._local_facts()
        host = socket.gethostname()
        found: dict[str, Any] = {}
        for name, f in facts.items():
            if not self._wants_local(name) or not isinstance(f, dict) or f.get("host") != host:
                continue
            old = self.local_nodes.get(name)
            if old is not None and old.name == f.get("store") and not old.closed and RETIRED_KEY not in old:
                found[name] = old
                continue
            try:
                found[name] = store_mod.attach(str(f["store"]), create=False)
            except (Error, OSError, KeyError) as e:
                self._warn_local(name, f"cannot attach its store {f.get('store')!r} ({e})")
        wanted = set(self._was_local)
        if isinstance(self._local_spec, str):
            wanted.add(self._local_spec)
        elif not isinstance(self._local_spec, bool):
            wanted.update(self._local_spec)
        missing = sorted(wanted - set(found))
        for name in missing:
            self._warn_local(name, "no store of it on this host now")
        for name in found:
            self._local_warned.discard(name)
        self._was_local.update(found)
        self.local_nodes = found
        self._rebuild_local_map()
        if missing and not self._closed:
            timer = threading.Timer(LOCAL_RETRY, self._mark_local_stale)
            timer.daemon = True
            self._retry_timer = timer
            timer.start()

    def _mark_local_stale(self) -> None:
        self._local_stale = True

    def _warn_local(self, name: str, why: str) -> None:
        if name not in self._local_warned:
            self._local_warned.add(name)
            log.warning("zero-hop reads of %s: %s; reading it over the network", name, why)

    def _rebuild_local_map(self) -> None:
        assert self.ring is not None
        self._local_keys.clear()
        self._local_all = None
        if self._local_spec is False:
            self._local_by_vnode = None
            return
        # With local= asked for, the map exists even when no store is attached now: its reads
        # are what notices the retry timer (_local_stale) and looks for the stores again.
        table = [
            next((self.local_nodes[p] for p in prefs if p in self.local_nodes), None)
            for prefs in self.ring.vnode_preference_lists(self.n)
        ]
        self._local_by_vnode = table
        # One store serving every vnode (a local node in every preference list: N = nodes, or
        # one node): get() skips the per-key route, whose miss costs as much as the read.
        first = table[0] if table else None
        if first is not None and all(st is first for st in table):
            self._local_all = first

    def _local_facts(self) -> dict[str, Any]:
        """Every member's ``local`` facts (its RING answer's; None when it did not answer)."""
        assert self.ring is not None
        members = list(self.ring.members.values())
        answers = self._fan_out(wire.RING, [m.addr for m in members], self.timeout)
        return {
            m.name: None if isinstance(a, BaseException) else a.fields.get("local")
            for m, a in zip(members, answers, strict=True)
        }

    def _local_route(self, k: bytes) -> tuple[Any, bytes]:
        """(the store serving ``k``'s local reads or None, its store key), remembered per key
        (a bounded cache: cleared whole when full or when the map is rebuilt)."""
        if len(self._local_keys) >= LOCAL_ROUTES:
            self._local_keys.clear()
        hit = (self._local_store(k), VERSIONS + k)
        self._local_keys[k] = hit
        return hit

    def _local_store(self, k: bytes) -> Any:
        """The attached store that serves ``k``'s R=1 reads, or None (go over the network)."""
        if self._local_stale:
            self._local_stale = False
            self._attach_local()
        table = self._local_by_vnode
        if table is None:
            return None
        assert self.ring is not None
        return table[self.ring.vnode_index(k)]

    def _local_versions(self, k: bytes, st: Any) -> Versions | None:
        """``k``'s versions as the local replica holds them, or None when its segment is retired
        and no new one attaches (then the caller goes over the network)."""
        from ..errors import Error

        for _ in range(2):
            raw = st.get(VERSIONS + k)
            if RETIRED_KEY not in st:  # checked after the read: the value came from a live segment
                if raw is None:
                    return Versions([], Context())
                vs = VersionSet.decode(raw).visible(int(time.time() * 1000))
                return _versions(vs.values, vs.context)
            try:  # the node stopped (and maybe restarted): find its segment again
                self._attach_local()
            except (Error, OSError) as e:
                log.warning("zero-hop reads: cannot re-attach after a node restart (%s)", e)
                self.local_nodes = {}
                self._rebuild_local_map()
            st = self._local_store(k)
            if st is None:
                return None
        return None

    def _fetch_ring(self) -> tuple[Ring, dict[str, Any]]:
        addrs = list(self.seeds)
        if self.ring is not None:
            addrs += [m.addr for m in self.ring.members.values() if m.addr not in addrs]
        errors = []
        # Two passes, 0.1 s apart: a connection accepted by a worker (--workers) at the instant
        # it died is reset, while its siblings on the same port serve the next one. RING is a
        # read, so asking again is safe; a seed that is really down fails both passes.
        for attempt in range(2):
            if attempt:
                time.sleep(0.1)
            for addr in addrs:
                try:
                    reply = self.request(addr, Message(wire.RING, 0, {}))
                    # The cluster's replication map (--n-per-dc) places keys; the ring's wire
                    # layout does not carry it, the RING answer does.
                    ring = Ring.from_wire(reply.fields["ring"]).with_replication(reply.fields.get("n_per_dc"))
                    return ring, dict(reply.fields)
                except (ClusterError, OSError, KeyError) as e:
                    errors.append(f"{addr}: {e}")
        raise NoSeedReachable("no seed of the cluster answered: " + "; ".join(errors))

    def _targets(self, key: bytes) -> tuple[Ring, tuple[str, ...]]:
        """The ring and the nodes to try for ``key``, in order: its preference list (this
        client's DC first), suspects last."""
        ring, routes, prefs = self._routing
        assert ring is not None
        if prefs is not None:  # one member: every key's list
            vnode = -1
        else:
            vnode = ring.vnode_index(key)
            prefs = routes.get(vnode)
        if prefs is None:
            # every key of a vnode has the same preference list: computed once per vnode
            prefs = tuple(ring.preference_list(key, self.n))
            if self.dc is not None:  # this client's DC first: local_quorum is counted there
                prefs = tuple(sorted(prefs, key=lambda p: ring.dc_of(p) != self.dc))
            routes[vnode] = prefs
        suspects = self._suspects
        if suspects:
            now = time.monotonic()
            for node, since in list(suspects.items()):
                if now - since > SUSPECT_FOR:
                    suspects.pop(node, None)
            prefs = tuple(p for p in prefs if p not in suspects) + tuple(p for p in prefs if p in suspects)
        return ring, prefs

    def _suspect(self, node: str) -> None:
        self._suspects[node] = time.monotonic()

    def _failed(self, node: str, e: BaseException, write: bool, fields: dict[str, Any]) -> BaseException:
        """The rules for an attempt at ``node`` that raised ``e`` (one of _RETRY): returns ``e``
        when the request may go to the next node (for WrongEpoch: after a ring refresh); raises
        MaybeApplied for a write that may have reached ``node`` -- never re-sent behind the
        caller's back."""
        if isinstance(e, (WrongEpoch, Overloaded)):  # Overloaded: starting or stopping
            return e
        self._suspect(node)
        if write and (isinstance(e, RequestTimeout) or getattr(e, "sent", False)):
            why = (
                f"no answer within {self.timeout * 2:g} s" if isinstance(e, RequestTimeout)
                else "the connection broke after the request was sent"
            )
            raise MaybeApplied(
                f"write to {node} may have been applied: {why} ({e})",
                needed=_count(fields.get("w") or self.w), answered=0, n=self.n,
            ) from None
        return e

    # -- one request, routed ---------------------------------------------------------------

    def _routed(
        self, key: bytes, code: int, fields: dict[str, Any], write: bool
    ) -> Message:
        """Send to the key's coordinator (the next one on a failure that allows it, _failed);
        its OK reply."""
        refreshes = 0
        net, budget = self._net, self.timeout * 2  # the coordinator's timeout, and one more
        while True:
            # _targets' common case inline: no suspects, the key's vnode routed before (or
            # a 1-member ring)
            ring, routes, targets = self._routing
            if targets is None and ring is not None:
                targets = routes.get(ring.vnode_index(key))
            if targets is None or self._suspects:
                ring, targets = self._targets(key)
            fields["epoch"] = ring.epoch  # type: ignore[union-attr]  # a ring whenever targets
            fields["timeout_ms"] = self._timeout_ms
            rid, frame = _frame(code, fields)  # encoded once, whichever node takes it
            last: BaseException | None = None
            members = ring.members  # type: ignore[union-attr]
            for node in targets:
                try:
                    reply = net.request(members[node].addr, rid, frame, budget)
                    if reply.code in _ERRORS:
                        wire.raise_for_error(reply)
                except _RETRY as e:
                    last = self._failed(node, e, write, fields)
                    if isinstance(e, WrongEpoch):
                        break
                    continue
                if self._suspects:
                    self._suspects.pop(node, None)
                return reply
            if isinstance(last, WrongEpoch) and refreshes < MAX_REFRESHES:
                # the ring fetched may still be the old one (its node had not learnt the change
                # yet, or a move's report raised the epoch meanwhile): a few more, shortly after
                if refreshes:
                    time.sleep(0.05 * refreshes)
                refreshes += 1
                self.ring, _ = self._fetch_ring()
                self._local_stale = self._local_spec is not False  # rebuilt by the next local read
                continue
            raise QuorumError(
                f"no coordinator of the key could be reached ({len(targets)} tried): {last}",
                needed=_count(fields.get("w") or fields.get("r") or 1), answered=0, n=self.n,
            )

    # -- the API ---------------------------------------------------------------------------

    def put(
        self,
        key: KeyLike,
        value: Any,
        *,
        w: Level | None = None,
        context: Context | bytes | None = None,
        strict: bool | None = None,
        ttl: float | None = None,
    ) -> Context:
        """Write ``value``: supersedes what ``context`` saw (what the coordinator holds when
        None). Returns the context of the new version.

        :param ttl: seconds (a positive finite number) the new version is served for; the
            coordinator fixes its expiry as its wall clock + ttl and every replica judges it by
            its own wall clock (README, "TTLs"). None: no expiry.

        :param strict: True: only the key's primaries count toward W -- a fallback holding a
            hint for a down primary does not (R + W > N then holds); False: sloppy; None: the
            cluster's default (``shmkv serve --strict/--sloppy``).
        :raises QuorumError: fewer than W replicas up -- nothing was written.
        :raises MaybeApplied: the write was started and missed W: it may have been applied.
        """
        # bytes as they are (the common call; _key and _value copy the other bytes-likes)
        k = key if type(key) is bytes and key else _key(key)
        fields: dict[str, Any] = {
            "key": k, "value": value if type(value) is bytes else _value(value),
            "w": self.w if w is None else self._w(w),
        }
        if ttl is not None:
            fields["ttl_ms"] = _ttl_ms(ttl)
        if strict is not None:
            fields["strict"] = int(bool(strict))
        if context is not None:
            fields["context"] = _context(context)
        reply = self._routed(k, wire.PUT, fields, True)
        return Context.decode(reply.fields["context"])

    def delete(
        self, key: KeyLike, *, w: Level | None = None, context: Context | bytes | None = None,
        strict: bool | None = None,
    ) -> None:
        """Delete ``key`` (a tombstone with a version; supersedes what ``context`` saw);
        ``strict`` as for :meth:`put`."""
        k = _key(key)
        fields: dict[str, Any] = {"key": k, "w": self._w(w)}
        if strict is not None:
            fields["strict"] = int(bool(strict))
        c = _context(context)
        if c is not None:
            fields["context"] = c
        self._routed(k, wire.DELETE, fields, True)

    def get_versions(self, key: KeyLike, *, r: Level | None = None) -> Versions:
        """Every concurrent value of ``key`` and the context to resolve them with."""
        k = _key(key)
        values, ctx = self._read(k, self._r(r))
        return _versions(values, ctx if isinstance(ctx, Context) else Context.decode(ctx))

    def _read(self, k: bytes, rr: Level) -> tuple[list[bytes | None], Context | bytes]:
        """``k``'s versions: from the local replica (R=1, zero-hop) or over the network; the
        context stays encoded until someone needs it (a get of one value does not)."""
        if rr == 1 and self._local_by_vnode is not None:
            st = self._local_store(k)
            if st is not None:
                got = self._local_versions(k, st)
                if got is not None:
                    return got.values, got.context
        f = self._routed(k, wire.GET_VERSIONS, {"key": k, "r": rr}, False).fields
        return f["values"], f["context"]

    def get(self, key: KeyLike, default: Any = None, *, r: Level | None = None) -> Any:
        """The value of ``key`` (``default`` when absent or deleted).

        :raises Conflict: concurrent values and no ``resolve=`` (``.values``, ``.context``).
        """
        if self._local_by_vnode is not None and (r == 1 or (r is None and self.r == 1)):
            # zero hops: the fast path of an R=1 read (module docstring); kept inline and flat --
            # every call and attribute costs here, where a read is about a microsecond
            k = key if type(key) is bytes and key else _key(key)
            st = self._local_all
            if st is not None and not self._local_stale:
                sk = VERSIONS + k  # every key's: no route to look up
            else:
                hit = self._local_keys.get(k)
                if hit is None or self._local_stale:
                    hit = self._local_route(k)
                st, sk = hit
            if st is not None:
                raw = st.get(sk)
                if RETIRED_KEY not in st:  # after the read: the value came from a live segment
                    if raw is None:
                        return default
                    w = _unpack_local(raw)
                    if w is not None:  # exactly one version: its value, or deleted
                        return default if w is _DELETED else w
        else:  # over the network (what _read does then, inline: the common get)
            k = key if type(key) is bytes and key else _key(key)
            f = self._routed(k, wire.GET_VERSIONS, {"key": k, "r": self.r if r is None else self._r(r)}, False).fields
            values = f["values"]
            if len(values) == 1:  # the common answer: one version (its value, or deleted)
                v = values[0]
                return default if v is None else v
            return self._one(k, _versions(values, Context.decode(f["context"])), default)
        values, ctx = self._read(k, self.r if r is None else self._r(r))
        if len(values) == 1:  # the common answer: one version (its value, or deleted)
            v = values[0]
            return default if v is None else v
        return self._one(k, _versions(values, ctx if isinstance(ctx, Context) else Context.decode(ctx)), default)

    def incr(self, key: KeyLike, delta: int = 1, *, w: Level | None = None) -> int:
        """Add ``delta`` to the PN-counter ``key`` (its own namespace, apart from put/get);
        returns its value as merged from W replicas. Concurrent increments through any nodes
        all count."""
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise InvalidType(f"delta must be an int, got {type(delta).__name__}")
        k = _key(key)
        reply = self._routed(k, wire.INCR, {"key": k, "delta": delta, "w": self._w(w)}, True)
        return int(reply.fields["value"])

    def get_many(self, keys: Iterable[KeyLike], *, r: Level | None = None) -> dict[bytes, Any]:
        """Values of the present keys (absent and deleted ones are left out): one request per
        coordinator, which asks each replica once for all its keys."""
        ks = list(dict.fromkeys(_key(k) for k in keys))
        if not ks:
            return {}
        rr = self._r(r)
        got: dict[bytes, Versions] = {}
        if rr == 1 and self._local_by_vnode is not None:
            for k in ks:
                st = self._local_store(k)
                if st is not None:
                    lv = self._local_versions(k, st)
                    if lv is not None:
                        got[k] = lv
        remote = [k for k in ks if k not in got]
        if remote:
            results = self._batched(remote, None, rr)
            for k in remote:
                values, ctx = results[k]
                got[k] = _versions(values, Context.decode(ctx))
        out: dict[bytes, Any] = {}
        for k in ks:
            v = self._one(k, got[k], None)
            if v is not None:
                out[k] = v
        return out

    def put_many(self, mapping: Mapping[Any, Any] | Iterable[tuple[Any, Any]], *, w: Level | None = None) -> None:
        """Write every pair (no contexts: each supersedes what its coordinator holds)."""
        items = mapping.items() if isinstance(mapping, Mapping) else mapping
        pairs = {_key(k): _value(v) for k, v in items}
        if pairs:
            self._batched(list(pairs), pairs, self._w(w))

    def _batched(self, keys: list[bytes], values: dict[bytes, bytes] | None, need: Level) -> dict[bytes, Any]:
        """One GET_MANY (PUT_MANY) per coordinator, all sent at once; the keys of a coordinator
        that could not take its batch (_failed let it go) are then routed one by one, each on
        its own preference list (_routed). GET_MANY: key -> [values, context]."""
        ring = self._routing[0]
        assert ring is not None
        write = values is not None
        groups: dict[str, list[bytes]] = {}
        for k in keys:
            groups.setdefault(self._targets(k)[1][0], []).append(k)
        timeout_ms = self._timeout_ms
        sends: list[tuple[str, int, bytes]] = []
        fields: list[dict[str, Any]] = []
        for node, group in groups.items():
            f: dict[str, Any] = {"epoch": ring.epoch, "timeout_ms": timeout_ms}
            if write:
                f["w"], f["items"] = need, [[k, values[k]] for k in group]  # type: ignore[index]
            else:
                f["r"], f["keys"] = need, group
            fields.append(f)
            sends.append((ring.members[node].addr, *_frame(wire.PUT_MANY if write else wire.GET_MANY, f)))
        out: dict[bytes, Any] = {}
        reroute: list[bytes] = []
        error: BaseException | None = None
        results = self._net.fan_out(sends, self.timeout * 2)
        for (node, group), f, res in zip(groups.items(), fields, results, strict=True):
            try:
                if not isinstance(res, Message):
                    raise res
                reply = wire.raise_for_error(res)
            except _RETRY as e:
                try:
                    self._failed(node, e, write, f)
                except MaybeApplied as maybe:
                    error = error or maybe
                reroute += group
                continue
            except ClusterError as e:
                error = error or e
                continue
            if self._suspects:
                self._suspects.pop(node, None)
            if not write:
                out.update(zip(group, reply.fields["results"], strict=False))
        if error is not None:
            raise error
        for k in reroute:  # the group's coordinator is down (or not ready): each key on its own route
            if write:
                self._routed(k, wire.PUT, {"key": k, "value": values[k], "w": need}, True)  # type: ignore[index]
            else:
                m = self._routed(k, wire.GET_VERSIONS, {"key": k, "r": need}, False)
                out[k] = [m.fields["values"], m.fields["context"]]
        return out

    def status(self) -> list[dict[str, Any]]:
        """Every member's STATUS answer (``{"name", "addr", "error"}`` for one that did not answer)."""
        assert self.ring is not None
        members = list(self.ring.members.values())
        out = []
        for m, res in zip(members, self._fan_out(wire.STATUS, [m.addr for m in members], self.timeout), strict=True):
            if isinstance(res, BaseException):
                out.append({"name": m.name, "addr": m.addr, "error": str(res)})
                continue
            st = dict(res.fields.get("status") or {})
            st.pop("ring", None)
            out.append(st)
        return out

    # -- helpers ---------------------------------------------------------------------------

    def _w(self, w: Level | None) -> Level:
        if w is None:
            return self.w  # checked once, by connect
        _check(self.n, w, "W")
        return w

    def _r(self, r: Level | None) -> Level:
        if r is None:
            return self.r
        _check(self.n, r, "R")
        return r

    def _one(self, key: bytes, got: Versions, default: Any) -> Any:
        if not got.values:
            return default
        if len(got.values) == 1:
            v = got.values[0]
            return default if v is None else v
        if self.resolve is None:
            raise Conflict(
                f"{len(got.values)} concurrent versions of {key!r}; pass resolve= to connect(), or "
                "put(key, value, context=e.context) with the value you choose",
                values=got.values,
                context=got.context,
            )
        merged = self.resolve(list(got.values))
        if merged is None:
            self.delete(key, context=got.context)
            return default
        self.put(key, merged, context=got.context)
        return merged


#: Every client of this process, weakly: a forked child forgets their connections.
_LIVE: weakref.WeakSet[Client] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for client in list(_LIVE):
        client._net.reset()


os.register_at_fork(after_in_child=_reset_after_fork)


#: What an attempt at one node may raise and still let the request go on (Client._failed).
_RETRY = (WrongEpoch, Unreachable, RequestTimeout, Overloaded)
_ERRORS = wire.ERRORS  # the codes raise_for_error raises for
#: ring refreshes for one request answered WrongEpoch (a ring change in progress)
MAX_REFRESHES = 4

def _versions(values: list[bytes | None], ctx: Context) -> Versions:
    distinct = list(dict.fromkeys(values))
    if all(v is None for v in distinct):
        distinct = []  # deleted (or never written): nothing to resolve
    return Versions(distinct, ctx)


_DELETED = object()
_unpackb = msgpack.unpackb


def _ttl_ms(ttl: Any) -> int:
    """``put``'s ``ttl`` (seconds) as whole milliseconds, at least 1."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise InvalidType(f"ttl must be a number of seconds or None, got {type(ttl).__name__}")
    if not math.isfinite(ttl) or ttl <= 0:
        raise InvalidArgument(f"ttl must be a positive finite number of seconds, got {ttl!r}")
    ms = max(1, math.ceil(ttl * 1000))
    if ms > MAX_TTL_MS:
        raise InvalidArgument(f"ttl of {ttl!r} s is beyond the longest one, 2**62 ms")
    return ms


def _unpack_local(raw: bytes) -> Any:
    """The fast path of a local read: a stored VersionSet (versions.py's layout, written and
    checked by this node's replica) with exactly one sibling -> its value, or _DELETED for a
    tombstone or an expired version (judged by this host's wall clock); None for anything else (siblings, or a layout this fast path does not know),
    which the caller then decodes in full, as a network answer is.

    ``raw=True``: the clock's node names stay bytes (never looked at here), half the cost of the
    unpack. A value is bytes either way: the replica stores values as msgpack bin, and a str
    where a value goes is no layout versions.py writes."""
    try:
        w = _unpackb(raw, raw=True)
    except Exception:  # noqa: BLE001 -- the full decoder raises the proper ProtocolError
        return None
    if type(w) is list and len(w) == 3 and w[0] == 1 and type(w[2]) is list and len(w[2]) == 1:
        sib = w[2][0]
        if type(sib) is list and (len(sib) == 3 or len(sib) == 4 and type(sib[3]) is int):
            v = sib[2]
            if len(sib) == 4 and sib[3] <= time.time() * 1000:
                return _DELETED  # expired (versions.py, "Expiry"): absent to a reader
            if v is None:
                return _DELETED
            if type(v) is bytes:
                return v
    return None


def _check(n: int, level: Level, what: str) -> None:
    """:raises ConfigError: an unknown level name, or a count outside 1..N."""
    check_level(level, what)
    if isinstance(level, int):
        check_quorum(n, level, what)


def _count(level: Any) -> int:
    return level if isinstance(level, int) else 0


def connect(
    seeds: Sequence[str] | str,
    n: int = 3,
    w: Level = 2,
    r: Level = 2,
    timeout: float = 1.0,
    resolve: Resolver | None = None,
    local: LocalSpec = False,
    dc: str | None = None,
) -> Client:
    """Connect to the cluster that ``seeds`` (``"host:port"`` addresses) belong to.

    :param n: replicas per key; must be the cluster's N (and at most its node count).
    :param w: write acks needed by default (per request: ``put(..., w=)``): a count or a
        consistency level (``"one"``, ``"quorum"``, ``"all"``, ``"local_quorum"``, ``"each_quorum"``).
    :param r: read answers needed by default (per request: ``get(..., r=)``), likewise.
    :param timeout: seconds a coordinator waits for replicas (the client waits twice that).
    :param resolve: ``f(values) -> value`` for concurrent versions; without it ``get`` raises
        :class:`Conflict`.
    :param local: zero-hop reads: ``True`` serves R=1 reads of keys held by a node on this host
        from that node's shared memory (a node name, or a list of them: only those nodes);
        see the module docstring for what such a read gives.
    :param dc: this client's data centre: the key's replicas there are tried first as
        coordinators (local_quorum is the coordinator's DC).
    :raises ConfigError: W or R > N or an unknown level, N > nodes, N other than the cluster's.
    :raises NoSeedReachable: no seed answered.
    """
    return Client(seeds, n=n, w=w, r=r, timeout=timeout, resolve=resolve, local=local, dc=dc)


__all__ = ["Client", "connect", "Versions", "NoSeedReachable"]
