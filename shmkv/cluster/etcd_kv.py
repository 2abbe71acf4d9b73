"""The one key shmkv keeps in etcd, read, created, compared-and-swapped and watched (aetcd).

``--config etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`` names an etcd cluster (any of its members'
client addresses) and a key prefix (default ``/shmkv``; one prefix per shmkv cluster, so several
can share one etcd). The configuration lives in ONE key, ``PREFIX/config``, whose value is
cluster_config.ClusterConfig.encode() (msgpack: the ring with its epoch, and N/W/R).

Why one key and its ``mod_revision``. etcd gives every write of a key a new, larger revision;
shmkv raises the epoch with every write of this key. So "the key's mod_revision is still R" is
exactly "the configuration is still the epoch it was when it was read at R", and a change is a
transaction ``IF mod_revision(key) == R THEN put(key, new)``: two changes checked against the
same epoch cannot both commit -- the second finds another revision and fails
(:class:`~shmkv.cluster.errors.ConcurrentChange`), it never overwrites the first. The first write
is ``IF create_revision(key) == 0`` (the key is absent), so a cluster is initialised once however
many nodes start at the same time. The value also carries the epoch, so the compare could be on
the value; the revision is the cheaper compare and means the same here.

Failure: every call has a deadline (``timeout``) and raises :class:`EtcdUnavailable` naming the
endpoint when etcd does not answer in it; the client then moves to the next endpoint of the URL
for the next call. Nothing here retries: the caller (etcd_config.py) decides, with backoff.

aetcd is imported on first use, not at import: a ``--workers K`` supervisor checks the URL
before it forks, and gRPC must not have started threads in a process that then forks.

Invariant: a revision handed out by this module is never smaller than one handed out before
by the same EtcdKV (etcd's revisions only grow; a restarted etcd keeps them in its data dir).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .errors import ClusterError, ConcurrentChange, ConfigError

log = logging.getLogger("shmkv.cluster.etcd")

DEFAULT_PREFIX = "/shmkv"
SCHEME = "etcd://"
#: seconds a single etcd call (get, txn, watch create) may take before it counts as unavailable
CALL_TIMEOUT = 2.0
#: gRPC keepalive on the channel, so a watch on a half-open connection (etcd's host gone, no
#: RST) ends within ~15 s instead of waiting forever for events. Not more often, and never
#: without a call open: etcd's server refuses pings closer than its --grpc-keepalive-min-time
#: (5 s) or without a stream, with a GOAWAY "too_many_pings" that stalls every call on the channel.
_CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 10000,
    "grpc.keepalive_timeout_ms": 5000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}


def _failures() -> tuple[type[BaseException], ...]:
    """What an etcd call raises when etcd is not there (aetcd's errors, a raw gRPC one)."""
    import aetcd
    from aetcd import rpc

    return (aetcd.ClientError, rpc.AioRpcError, asyncio.TimeoutError, OSError)


class EtcdUnavailable(ClusterError):
    """etcd did not answer within the call's deadline (the message names the endpoint)."""


@dataclass(frozen=True)
class EtcdURL:
    endpoints: tuple[tuple[str, int], ...]
    prefix: str = DEFAULT_PREFIX

    @property
    def key(self) -> bytes:
        return f"{self.prefix}/config".encode()

    def __str__(self) -> str:
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints)
        return f"{SCHEME}{hosts}{self.prefix}"


def is_etcd_url(value: str | None) -> bool:
    return bool(value) and str(value).startswith(SCHEME)


def parse_url(url: str) -> EtcdURL:
    """``etcd://HOST:PORT[,HOST:PORT...][/PREFIX]``. :raises ConfigError: naming ``url``."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"--config {url!r}: {why} (expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX])")

    if not isinstance(url, str) or not url.startswith(SCHEME):
        raise bad("not an etcd:// URL")
    rest = url[len(SCHEME):]
    hosts, slash, path = rest.partition("/")
    prefix = ("/" + path.strip("/")) if slash and path.strip("/") else DEFAULT_PREFIX
    if any(c in prefix for c in " \t\n?#"):
        raise bad(f"bad key prefix {prefix!r}")
    endpoints = []
    for part in hosts.split(","):
        part = part.strip()
        if not part:
            raise bad("an empty endpoint")
        if part.startswith("["):
            host, _, port_s = part[1:].partition("]:")
        else:
            host, _, port_s = part.rpartition(":")
        if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise bad(f"endpoint {part!r} is not HOST:PORT")
        endpoints.append((host, int(port_s)))
    return EtcdURL(tuple(endpoints), prefix)


@dataclass(frozen=True)
class Read:
    """The key as etcd held it at ``revision`` (the store's revision when it answered):
    ``value`` None when absent; ``mod_revision`` the revision of its last write (0: absent)."""

    value: bytes | None
    mod_revision: int
    revision: int
    #: writes of the key since it was created (1: written once); 0 when not known
    version: int = 0


class EtcdKV:
    """The configuration key of one ``etcd://`` URL (module docstring). Not thread-safe: one
    event loop uses it."""

    def __init__(self, url: EtcdURL, timeout: float = CALL_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        self._at = 0  # index of the endpoint in use
        self._client: Any = None
        self._closed = False
        #: open watch calls: a task reading one cannot be cancelled (gRPC's read future ignores
        #: cancel() until a message or the call's end arrives), so close() ends the calls first
        self._calls: set[Any] = set()
        #: the highest etcd revision any answer carried (status: how far this node has seen)
        self.revision = 0

    @property
    def endpoint(self) -> str:
        host, port = self.url.endpoints[self._at]
        return f"{host}:{port}"

    def _connect(self) -> Any:
        if self._closed:
            raise EtcdUnavailable(f"the etcd client of {self.url} is closed")
        if self._client is None:
            import aetcd  # see the module docstring: never before a fork

            host, port = self.url.endpoints[self._at]
            self._client = aetcd.Client(host=host, port=port, timeout=self.timeout,
                                        options=dict(_CHANNEL_OPTIONS))
        return self._client

    async def _failed(self, what: str, e: BaseException) -> EtcdUnavailable:
        """Drop the client (its channel may be wedged) and move to the next endpoint."""
        where = self.endpoint
        await self._drop()
        self._at = (self._at + 1) % len(self.url.endpoints)
        if isinstance(e, asyncio.TimeoutError):
            detail = "no answer in time"
        elif callable(getattr(e, "details", None)):  # a raw gRPC error: its one-line reason
            detail = str(e.details())  # type: ignore[attr-defined]
        else:
            detail = str(e) or type(e).__name__
        return EtcdUnavailable(f"etcd at {where} ({self.url}): {what} failed: {detail}")

    async def _drop(self) -> None:
        for call in list(self._calls):
            call.cancel()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), self.timeout)

    async def _call(self, what: str, fn: Any) -> Any:
        client = self._connect()
        try:
            return await asyncio.wait_for(fn(client), self.timeout + 0.5)
        except _failures() as e:
            raise await self._failed(what, e) from None

    def _seen(self, header: Any) -> int:
        rev = int(header.revision)
        self.revision = max(self.revision, rev)
        return rev

    async def get(self) -> Read:
        """The key now (a linearizable read). :raises EtcdUnavailable:"""
        key = self.url.key

        async def go(c: Any) -> Read:
            # the raw Range call, not Client.get: an absent key's answer still carries the
            # store's revision (what a watch then starts from)
            from aetcd import rpc

            await c.connect()
            resp = await c.kvstub.Range(rpc.RangeRequest(key=key), timeout=self.timeout, metadata=c.metadata)
            rev = self._seen(resp.header)
            if resp.count < 1:
                return Read(None, 0, rev)
            kv = resp.kvs[0]
            return Read(bytes(kv.value), int(kv.mod_revision), rev, int(kv.version))

        return await self._call("get", go)  # type: ignore[no-any-return]

    async def create(self, value: bytes) -> tuple[bool, Read]:
        """Put ``value`` only if the key is absent. Whether this call created it, and the key as
        it is afterwards (this value, or the one another node created first). :raises EtcdUnavailable:"""
        key = self.url.key

        async def go(c: Any) -> tuple[bool, Read]:
            t = c.transactions
            ok, responses = await c.transaction(
                compare=[t.create(key) == 0], success=[t.put(key, value)], failure=[t.get(key)])
            return bool(ok), responses

        created, responses = await self._call("create", go)
        if created:
            rev = self._seen(responses[0].response_put.header)
            return True, Read(value, rev, rev)
        now, meta = responses[0][0]
        return False, Read(bytes(now), int(meta.mod_revision), self._seen(meta.header))

    async def cas(self, value: bytes, mod_revision: int) -> int:
        """Put ``value`` if the key was last written at ``mod_revision``; the new revision.
        :raises ConcurrentChange: it was written since (``current`` holds its value now).
        :raises EtcdUnavailable:"""
        key = self.url.key

        async def go(c: Any) -> tuple[bool, Any]:
            t = c.transactions
            return await c.transaction(  # type: ignore[no-any-return]
                compare=[t.mod(key) == mod_revision], success=[t.put(key, value)], failure=[t.get(key)])

        ok, responses = await self._call("transaction", go)
        if ok:
            return self._seen(responses[0].response_put.header)
        kvs = responses[0] if responses else []
        err = ConcurrentChange(
            f"config changed concurrently: {self.url.key.decode()} was written after revision "
            f"{mod_revision}; retry"
        )
        err.current = bytes(kvs[0][0]) if kvs else None
        raise err

    async def watch(self, start_revision: int) -> AsyncIterator[Read]:
        """Every write of the key from ``start_revision`` on, in revision order (a delete comes
        as ``value`` None). Ends only by raising: :raises EtcdUnavailable: the stream broke
        (etcd restarted or unreachable) or ``start_revision`` was compacted away -- the caller
        re-reads the key and watches again from there."""
        # The raw Watch stream, not aetcd's Watcher: a cancelled Watcher.add_callback can wait
        # forever to re-take its lock (seen when a node closes during a watch's creation); one
        # gRPC call of our own ends cleanly with call.cancel().
        from aetcd import rpc

        client = self._connect()
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=self.url.key, start_revision=start_revision))
            await stop.wait()  # keep the stream open: etcd ends a watch whose client half-closes

        call = None
        try:
            await client.connect()
            call = rpc.WatchStub(client.channel).Watch(requests(), metadata=client.metadata)
            self._calls.add(call)
            async for resp in call:
                if resp.compact_revision:
                    raise EtcdUnavailable(f"etcd at {self.endpoint}: revision {start_revision} was "
                                          f"compacted (now {resp.compact_revision}); re-reading")
                if resp.canceled:
                    raise EtcdUnavailable(f"etcd at {self.endpoint} cancelled the watch: {resp.cancel_reason}")
                self._seen(resp.header)
                for ev in resp.events:
                    rev = int(ev.kv.mod_revision)
                    if ev.type == rpc.Event.EventType.PUT:
                        yield Read(bytes(ev.kv.value), rev, rev, int(ev.kv.version))
                    else:
                        yield Read(None, 0, rev)
        except _failures() as e:
            raise await self._failed("watch", e) from None
        finally:
            stop.set()
            if call is not None:
                self._calls.discard(call)
                call.cancel()
        raise await self._failed("watch", EOFError("the watch stream ended"))

    async def close(self) -> None:
        """End the open watches and the channel; every later call raises EtcdUnavailable."""
        self._closed = True
        await self._drop()


__all__ = ["EtcdKV", "EtcdURL", "EtcdUnavailable", "Read", "parse_url", "is_etcd_url", "DEFAULT_PREFIX"]
