"""This node's copies of the cluster's keys, kept in the node's local shmkv Store.

One Store per daemon (memory, plus the LSM tier with ``--path`` so the copies survive a restart)
holds three kinds of entries, told apart by a one-byte prefix of the store key:

    b"v" + key   the key's VersionSet (versions.py encoding: siblings, tombstones, clock)
    b"c" + key   the key's PNCounter (crdt.py encoding)
    b"m" + name  this node's own metadata (its actor name; "retired" once the segment is left)

so a user key and a counter of the same name never collide, and ``keys()`` counts only the first
two. Rejected: one entry holding both a VersionSet and a counter -- every put would then have to
decode and re-encode a counter it does not touch.

Atomicity. A replica put is read-merge-write: two concurrent puts of one key must both end up in
the stored set. A node runs K worker processes (``--workers``) over one shared Store, and each
worker is an asyncio thread, so two workers can merge the same key at once. Every
read-merge-write here is therefore a loop: read the stored bytes, merge, ``Store.cas(key,
read_bytes, merged)`` -- which stores only if the bytes are still the ones read, under the key's
stripe lock (and with ``--path`` writes the disk tier in the same locked step) -- and on a
mismatch read again. A mismatch means another worker's write landed, so the loop makes progress;
it is still bounded (CAS_RETRIES), and running out is a loud error, never a dropped version.
Rejected: a lock per key held across the merge (a worker SIGKILLed holding it would stall the
key; the stripe lock is robust and held only for the compare and copy), and an ``update(key, fn)``
running Python under the stripe lock (the merge would hold a shared lock for microseconds of
Python, and a fn that touched the store would deadlock).

The actor. Dots (versions.py) and counter entries (crdt.py) must be minted by a node that holds
every earlier one it minted (their REQUIRES). A store that lost its contents (a memory-only node
restarted after its segment was removed, a wiped ``--path``) must therefore mint under a fresh
name. The actor is ``f"{name}@{incarnation}"``, kept under b"m" + b"actor": found in the store, the
store kept its copies and the actor is reused; missing, a new random incarnation is drawn and
installed with ``cas`` (so K workers starting at once agree on one). All K workers of a node
share that actor: a dot is minted inside the cas loop from the stored set, so a second worker
whose cas fails re-reads the set -- which now holds the first worker's dot -- and mints the next
counter. Two workers can never store different writes under one dot. (Rejected: an actor per
worker -- the clocks would grow by K entries per node, for nothing the cas does not already
give.) Known gap: in a memory-only node, LRU eviction of one key's copy while the node runs is a
loss of that kind too (the next put through this node mints a dot other replicas already saw);
with ``--path`` nothing is lost (evictions spill to the LSM). Memory-only nodes are a cache; say
so (README).

Expiry. A version's expiry lives inside its VersionSet (versions.py, "Expiry"): what serves it
or not is the set, never the Store. The Store entry only gets a TTL so that memory is reclaimed:
every write of a set whose siblings all expire stores it with a Store TTL running until the
latest expiry plus RECLAIM_MARGIN (recomputed from the absolute expiry at each write, so a copy
that read repair or anti-entropy brings back expires again at the same time; a set with a
sibling that never expires -- a plain write, a tombstone -- gets no Store TTL). A merge that
would bring back a set already past that time to a replica holding nothing stores nothing (no
ping-pong with a replica that has not dropped it yet). Known gap, as for collected tombstones
(antientropy.py): once a replica has dropped a key its clock is gone, so a write through it
mints its dots afresh; a replica that still holds the old (expired) set with an overlapping
clock would take the new dot for an old one. RECLAIM_MARGIN keeps this to writes that land
within the replicas' clock skew of each other after the margin, and they all drop the key at
the same absolute time.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from ..errors import Error
from ..store import Store
from .crdt import PNCounter
from .versions import Context, VersionSet

VERSIONS = b"v"
COUNTER = b"c"
META = b"m"
ACTOR_KEY = META + b"actor"
#: set by the node just before it removes its segment at a clean stop (daemon.retire): a
#: zero-hop reader still mapping the removed segment re-attaches when it sees this.
RETIRED_KEY = META + b"retired"
#: where the node's anti-entropy owner (one worker of K) publishes its private address, for the
#: other workers to relay to (antientropy.py)
AE_OWNER_KEY = META + b"ae.owner"

_EMPTY = VersionSet()
KEY_COUNT_TTL = 10.0
#: read-merge-cas attempts before giving up loudly; each failed attempt means another worker's
#: write to the key landed meanwhile, so this is only reached under a pathological write storm.
CAS_RETRIES = 1000
#: seconds past a set's latest expiry before its Store entry is reclaimed (module docstring)
RECLAIM_MARGIN = 60.0
#: the shortest Store TTL given (seconds): a set past its reclaim time rewritten into a replica
#: that still holds the key expires at once
_MIN_TTL = 0.001
#: below the Store's longest TTL (100 years): a version expiring later is never reclaimed early
_MAX_STORE_TTL = 3_000_000_000.0

T = TypeVar("T")


class Contended(Error):
    """A key's read-merge-write lost its compare-and-swap CAS_RETRIES times in a row."""


class Replica:
    """This node's copies. Every method is synchronous (it never yields to the event loop) and
    every read-merge-write is a bounded cas loop, atomic across the node's worker processes
    (module docstring)."""

    def __init__(self, store: Store, name: str, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.name = name
        #: wall-clock seconds since the epoch: what expiries are judged by (tests inject one)
        self.clock = clock
        self._counted: tuple[float, int] | None = None
        self.cas_retries = 0  # failed compare-and-swaps (another worker wrote first), for STATUS
        #: called as ``on_change(store key, stored bytes, decoded value)`` after every write
        #: that changed a stored copy, synchronously (antientropy.py keeps its trees by it)
        self.on_change: Callable[[bytes, bytes, object], None] | None = None
        mine = name.encode() + b"@"
        for _ in range(CAS_RETRIES):
            raw = store.get(ACTOR_KEY)
            if isinstance(raw, bytes) and raw.startswith(mine):
                self.actor = raw.decode()
                break
            store.cas(ACTOR_KEY, raw, f"{name}@{secrets.token_hex(4)}".encode())
        else:
            raise Contended(f"{name}: could not install this node's actor name")
        _EMPTY.put(None, None, self.actor)  # :raises ConfigError: not a valid node name (checked once)

    def now_ms(self) -> int:
        """This node's wall clock in integer ms since the epoch."""
        return int(self.clock() * 1000)

    def _store_ttl(self, vs: object) -> float | None:
        """The Store TTL a stored copy ``vs`` gets (module docstring, "Expiry"); 0.0: past it."""
        at = vs.reclaim_at if isinstance(vs, VersionSet) else None
        if at is None:
            return None
        ttl = max(0.0, at / 1000 + RECLAIM_MARGIN - self.clock())
        return None if ttl > _MAX_STORE_TTL else ttl  # beyond the Store's range: kept for good

    def _update(self, skey: bytes, step: Callable[[bytes | None], tuple[bytes | None, T]]) -> T:
        """Atomic read-modify-write of store key ``skey``: ``step(stored bytes or None)`` returns
        (the bytes to store, or None to leave it as it is; the result). Retried while another
        writer changes the key between the read and the cas. A VersionSet result is stored with
        the Store TTL :meth:`_store_ttl` gives it; one past it is not stored where nothing is."""
        for _ in range(CAS_RETRIES):
            raw = self.store.get(skey)
            new, result = step(raw)
            if new is None or new == raw:
                return result
            ttl = self._store_ttl(result)
            if ttl == 0.0 and raw is None:
                return result
            if self.store.cas(skey, raw, new, ttl=None if ttl is None else max(ttl, _MIN_TTL)):
                if self.on_change is not None:
                    self.on_change(skey, new, result)
                return result
            self.cas_retries += 1
        raise Contended(f"{skey[1:65]!r}: {CAS_RETRIES} read-merge-writes in a row lost their "
                        "compare-and-swap to other writers; nothing was written")

    # -- versions ------------------------------------------------------------------------------

    def get(self, key: bytes) -> VersionSet:
        """The stored VersionSet of ``key`` (an empty one when this replica has never seen it)."""
        raw = self.store.get(VERSIONS + key)
        return _EMPTY if raw is None else VersionSet.decode(raw)

    def get_many(self, keys: Iterable[bytes]) -> list[VersionSet]:
        return [self.get(k) for k in keys]

    def merge(self, key: bytes, incoming: VersionSet) -> VersionSet:
        """Merge ``incoming`` into the stored set of ``key`` and store the result (atomic: see the
        module docstring); returns the merged set. A set that changes nothing is not rewritten
        (its Store TTL, a function of the set, is then already the right one)."""

        def step(raw: bytes | None) -> tuple[bytes | None, VersionSet]:
            if raw is None:  # nothing held: the merge is ``incoming`` itself (a wiped replica's case)
                return (incoming.encode() if incoming != _EMPTY else None), incoming
            old = VersionSet.decode(raw)
            new = old.merge(incoming)
            return (new.encode() if new != old else None), new

        return self._update(VERSIONS + key, step)

    def coordinate(
        self, key: bytes, value: bytes | None, context: Context | None, expires: int | None = None
    ) -> VersionSet:
        """The coordinator's own new write: mint a dot under this node's actor on the local copy
        (superseding what ``context`` saw, or everything held here when it is None), store it,
        and return the new set -- the one the coordinator then sends to the other replicas.
        ``expires``: the new version's expiry, wall-clock ms (versions.py, "Expiry").
        The dot is minted inside the cas loop, from the set the cas then replaces: unique across
        the node's workers (module docstring)."""

        skey = VERSIONS + key
        if context is None and (value is None or type(value) is bytes) and expires is None:
            # The common put (RESP SET, a put without context=): VersionSet.put_encoded decodes
            # only the clock it supersedes everything under. The same cas loop as _update.
            store = self.store
            actor = self.actor
            for _ in range(CAS_RETRIES):
                raw = store.get(skey)
                new, enc = VersionSet.put_encoded(raw, value, actor)
                if store.cas(skey, raw, enc):  # no expiry: no Store TTL (_store_ttl is None)
                    if self.on_change is not None:
                        self.on_change(skey, enc, new)
                    return new
                self.cas_retries += 1
            raise Contended(f"{skey[1:65]!r}: {CAS_RETRIES} read-merge-writes in a row lost their "
                            "compare-and-swap to other writers; nothing was written")

        def step(raw: bytes | None) -> tuple[bytes | None, VersionSet]:
            old = _EMPTY if raw is None else VersionSet.decode(raw)
            new = old.put(value, context, self.actor, expires)
            return new.encode(), new

        return self._update(skey, step)

    # -- counters ------------------------------------------------------------------------------

    def counter(self, key: bytes) -> PNCounter:
        raw = self.store.get(COUNTER + key)
        return PNCounter() if raw is None else PNCounter.decode(raw)

    def merge_counter(self, key: bytes, incoming: PNCounter) -> PNCounter:
        def step(raw: bytes | None) -> tuple[bytes | None, PNCounter]:
            old = PNCounter() if raw is None else PNCounter.decode(raw)
            new = old.merge(incoming)
            return (new.encode() if new != old else None), new

        return self._update(COUNTER + key, step)

    def increment(self, key: bytes, delta: int) -> PNCounter:
        """The coordinator's increment of its own entry (atomic, as :meth:`merge`)."""

        def step(raw: bytes | None) -> tuple[bytes | None, PNCounter]:
            new = (PNCounter() if raw is None else PNCounter.decode(raw)).increment(self.actor, delta)
            return new.encode(), new

        return self._update(COUNTER + key, step)

    # -- facts ---------------------------------------------------------------------------------

    def key_count(self, now: float | None = None) -> int:
        """Keys and counters held here (not this node's metadata), for STATUS.

        Memory only, ``len(store)`` is a counter (O(1)). With a disk tier it is a scan of the
        LSM (O(n)) on the event loop, so its result is reused for KEY_COUNT_TTL seconds
        (``now``: a monotonic clock reading, given by the caller; None recounts)."""
        tiered = getattr(self.store, "path", None) is not None
        if tiered and now is not None and self._counted is not None and now - self._counted[0] < KEY_COUNT_TTL:
            return self._counted[1]
        count = max(0, len(self.store) - sum(1 for k in (ACTOR_KEY, RETIRED_KEY, AE_OWNER_KEY) if k in self.store))
        if tiered and now is not None:
            self._counted = (now, count)
        return count


__all__ = ["Replica", "Contended", "RECLAIM_MARGIN", "RETIRED_KEY", "AE_OWNER_KEY", "VERSIONS", "COUNTER", "META", "CAS_RETRIES"]
