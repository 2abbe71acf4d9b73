"""Anti-entropy: Merkle trees over this node's replica sets, compared with peers on a schedule.

A thin asyncio loop over merkle.py. Read repair (coordinator.py) fixes the keys somebody reads;
this fixes the rest -- a replica that lost its data (a wiped ``--path``, a memory-only node
restarted, keys removed from its Store behind its back) converges with the others within a
bounded time, and the bytes exchanged grow with the difference, not with the data set.

Trees. One :class:`~shmkv.cluster.merkle.MerkleTree` per *replica set* this node belongs to (the
sorted names of a key's preference list: exactly what two of those nodes must agree on). An item
is a store key -- ``b"v" + key`` (a VersionSet) or ``b"c" + key`` (a PN-counter), so counters are
repaired too -- and its stored bytes, whose encodings are canonical (equal states, equal bytes).
The trees are kept current as writes land: :class:`~shmkv.cluster.replica.Replica` calls
``on_change`` after every write that changed a copy (one blake2b and ``depth + 1`` additions, no
rescan per round). They are built from the Store at start-up, and rebuilt every ``rebuild``
seconds (``--ae-rebuild``), which is what notices keys removed behind the daemon's back (no write
announced it). A build is a scan of the Store in chunks of BUILD_CHUNK items, yielding to the
event loop between chunks: bounded by the Store's size, and foreground requests keep being
served. A write that lands during a build is applied to the live trees and remembered; the new
trees re-read those keys from the Store before they replace the old ones, so no write is missed
whatever the scan's order.

Trees grow with their range. A tree starts at ``depth`` (the least, 3) and is regrown -- its
digests copied into a deeper tree, chunked like a build, writes meanwhile remembered and
re-applied -- once it averages more than merkle.LEAF_KEYS keys per leaf (:meth:`grow`, each
round): 4,096 leaves up to 131 k keys, 65,536 up to 2 M. Nodes of different depths compare down
to the shallower tree's leaves (a node's hash does not depend on the depth, merkle.py).

Exchange (the initiator I, a peer P, every ``interval`` seconds, peers in name order)::

    I -> P  AE_ROOTS     {from: I}                 P: [[range, root], ...] of the sets I shares,
                                                   their depths, P's --ae-rate and
                                                   --ae-bytes-rate
    I -> P  AE_CHILDREN  {range, level, idxs}      P: 16 child hashes per node. A child both
                                                   hold and that differs: descend; one only P
                                                   holds: pull its span; one only I holds: push
            ... down to the shallower tree's leaves
    I -> P  AE_LEAVES    {range, level, idxs}      P: the (key, digest) items under those nodes
    I -> P  AE_PULL      {range, spans, after}     P: its copies under the spans, in token order,
                                                   up to PULL_BATCH keys / BATCH_BYTES, and the
                                                   cursor to resume at; I merges them
    I -> P  AE_SYNC      {range, items}            I's copies -- of the differing leaves' keys
                                                   (None: I has none) and of the spans P lacks;
                                                   P merges each and answers its copy where it
                                                   differs from the one sent, which I merges

A wiped replica (root 0, or a root 0 on the peer) is one span, the whole ring: no walk at all,
each copy travels once (its store key, its bytes, a few bytes of framing -- about 137 bytes a
key for 100-byte values). An exchange keeps WINDOW requests in flight to its peer, so the next
batch travels while this one is merged. Small differences walk as before: one round trip per
level (of up to MAX_IDXS nodes) plus the differing leaves' keys; equal roots cost one small
message. Merges are the ordinary version merges (versions.py, crdt.py): anti-entropy never
decides between values, it only makes both sides hold the join of what they held.

One repair at a time per node (:meth:`round`): a node whose own exchange is moving copies
answers other peers' AE_ROOTS "busy", and one serving a peer's repair (it got a non-root AE
request within SERVING_S) skips its own round -- so a wiped node is filled by one peer once,
not by each of them with the same copies.

The rate limits (``rate``, ``--ae-rate``, keys/s; ``byte_rate``, ``--ae-bytes-rate``, bytes/s):
two token buckets (:class:`TokenBucket`, in the loop's clock) pace every merge of a peer's
copies on this node, the ones its exchanges bring and the ones peers' AE_SYNC push -- the
repairing side, whose event loop also serves the foreground. A merge waits for both: a key
costs one key token and its store key + copy + 16 bytes (:func:`_cost`, what it weighs on the
wire) of byte tokens. Why two and not bytes alone: a merge has a fixed cost (decode, merge,
store write, tree update, ~30 us) that small values make the bound -- a bytes-only limit set for
the link would let 100-byte copies through at 60,000 merges/s, a whole core -- while large
values make the link and the Store's write bandwidth the bound, which a key count cannot see
(10,000 keys/s of 64 KiB values is 650 MB/s). Merges run YIELD_EVERY keys between yields; a
pull asks for at most ``rate / 4`` keys a batch, and a pusher sizes its AE_SYNC batches from the
receiver's limits (AE_ROOTS says them; a peer that says no ``byte_rate`` is taken as having
none) so that waiting for the buckets stays well inside the request time-out. 0: no limit.

Tombstones and the grace rule. A delete is a tombstone sibling with a dot (versions.py); merging
it into an older live copy kills that copy, so a tombstone that reaches every replica is what
keeps a delete deleted. A tombstone is therefore kept ``grace`` seconds (``--tombstone-grace``)
after this node first stored it, then collected: removed from the Store atomically only if it
still holds exactly that tombstone (a ``cas`` that sets the entry to expire at once -- the Store
has no compare-and-delete, and an expired entry is absent to every reader and to ``cas``), and
from the tree. The time travels with the tombstone in AE_SYNC and a receiver keeps the earliest
it has heard, so all replicas collect within about one interval of each other; a tombstone past
its grace is not stored again by a replica that has already dropped the key (no ping-pong). THE
RULE: a replica that was away (down, partitioned) longer than ``grace`` must not rejoin with its
old data -- wipe it first (it then converges by anti-entropy like any wiped replica) -- because
its copies of keys deleted meanwhile would come back. Within the grace nothing resurrects: the
tombstone is still on the others and wins the merge. Tombstone times live in the owner's memory;
after a restart they restart at the build (a later collection, never an earlier one).

Workers. With ``--workers K`` the K processes share one Store, and exactly one -- worker 0, the
*owner* -- keeps the trees, collects tombstones and runs exchanges; the others are *relays*. A
relay (a) remembers the store keys its own writes changed and sends them to the owner in
AE_NOTIFY batches every NOTIFY_INTERVAL (the owner re-reads those keys from the Store: the Store
is the truth, the message only says where to look), and (b) forwards AE requests that peers'
connections brought to it (SO_REUSEPORT picks the worker) to the owner. The owner serves both on
a private listener on 127.0.0.1, its address published under ``b"m" + b"ae.owner"`` in the
shared Store. Why this and not a change log in the Store: a log is two extra store writes per
replica write plus an ordering protocol between K writers and one reader (and a cleanup of
entries a killed worker left half-written); a set of keys in the relay's memory costs one set
insertion per write, batches duplicates away, and needs no new store layout. What it gives up:
keys a relay changed but had not sent when it was SIGKILLed, or more than NOTIFY_MAX pending
while the owner is unreachable (the relay then sends ``overflow`` and the owner rebuilds) --
caught by the owner's next build, as keys removed behind the daemon's back are. Rejected: every
worker keeping its own trees (K times the memory, and each would see only its own writes), and
dirty-bucket flags in shared memory (the owner would still have to find the bucket's keys -- a
scan).

Invariant: every tree equals the Store's b"v"/b"c" entries of its replica set, except for the
writes of the last NOTIFY_INTERVAL (relays) and entries changed without a write (found by the
next build).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

from ..errors import Error
from . import wire
from .crdt import PNCounter
from .errors import ClusterError, ProtocolError, WrongEpoch
from .merkle import (
    FANOUT,
    MAX_DEPTH,
    TOKENS,
    Cursor,
    MerkleTree,
    Span,
    classify_children,
    coalesce,
    depth_for,
    differing_keys,
)
from .replica import AE_OWNER_KEY, COUNTER, VERSIONS
from .versions import VersionSet
from .wire import BadRequest, Message, Overloaded

if TYPE_CHECKING:
    from .coordinator import Node
    from .ring import Ring

log = logging.getLogger("shmkv.cluster")

DEFAULT_INTERVAL = 10.0
DEFAULT_GRACE = 86400.0
DEFAULT_REBUILD = 3600.0
DEFAULT_DEPTH = 3  # the *least* depth of a tree; a range of many keys gets more (merkle.depth_for)
#: keys per second a node merges from anti-entropy (--ae-rate; 0: no limit), module docstring
DEFAULT_RATE = 10_000.0
#: bytes per second of copies a node merges from anti-entropy (--ae-bytes-rate; 0: no limit):
#: 8 MB/s is about 6 % of a 1 Gbit/s link, and binds only for copies above ~800 bytes at the
#: default key rate
DEFAULT_BYTE_RATE = 8_000_000.0
#: the least non-zero --ae-bytes-rate (daemon.check_options): a pushed copy larger than rate x
#: the AE time-out (320 KB at this rate and 5 s) waits past its request's time-out, so lower
#: rates would fail exchanges on ordinary values
MIN_BYTE_RATE = 65_536.0
#: Store items per build step before yielding to the event loop
BUILD_CHUNK = 1000
#: tree nodes per AE_CHILDREN / AE_LEAVES request
MAX_IDXS = 1024
#: keys per AE_SYNC request (and the receiver's bound is 4x), and its copies' bytes
SYNC_BATCH = 1024
BATCH_BYTES = 1 << 20
#: AE_PULL: keys per reply (at most; the receiver asks fewer under a rate limit), spans per
#: request (a longer list is streamed as several)
PULL_BATCH = 4096
MAX_SPANS = 256
#: requests one exchange keeps in flight to one peer: the next batch travels while this one
#: is merged (both sides work at once)
WINDOW = 2
#: seconds after a peer's last AE request (past its roots) that this node counts as serving that
#: peer's repair: longer than the gap between an exchange's requests, short enough that the
#: node's own rounds resume soon after the exchange ends
SERVING_S = 2.0
#: merges between yields to the event loop (and the rate limit's unit of work)
YIELD_EVERY = 32
#: a relay's flush period and its bound on keys waiting for the owner
NOTIFY_INTERVAL = 0.2
NOTIFY_MAX = 100_000
#: the TTL that makes a collected tombstone expire at once (the Store's cas cannot delete)
_EXPIRE_NOW = 1e-6
AE_CODES = frozenset({wire.AE_ROOTS, wire.AE_CHILDREN, wire.AE_LEAVES, wire.AE_SYNC, wire.AE_NOTIFY,
                      wire.AE_PULL})

Range = tuple[str, ...]


@dataclass
class Settings:
    """``interval``: seconds between rounds (0: no exchanges, trees still kept); ``grace``:
    seconds a tombstone is kept before it is collected; ``rebuild``: seconds between builds of
    the trees from the Store (0: only at start-up); ``depth``: the least tree depth (a range
    with more keys gets a deeper tree); ``timeout``: per AE request; ``rate``: keys per second
    this node merges from exchanges, its own and its peers' (0: no limit); ``byte_rate``: bytes
    per second of those copies (:func:`_cost`; 0: no limit)."""

    interval: float = DEFAULT_INTERVAL
    grace: float = DEFAULT_GRACE
    rebuild: float = DEFAULT_REBUILD
    depth: int = DEFAULT_DEPTH
    timeout: float = 5.0
    rate: float = DEFAULT_RATE
    byte_rate: float = DEFAULT_BYTE_RATE


@dataclass
class Stats:
    rounds: int = 0
    exchanges: int = 0
    failed: int = 0
    differing_keys: int = 0
    repaired: int = 0  # keys whose copy here changed by an AE_SYNC (sent or received)
    collected: int = 0  # tombstones collected
    builds: int = 0
    last_build_s: float = 0.0
    notified: int = 0  # keys received from relays
    bytes_sent: int = 0  # frame bytes of the exchanges this node started: its requests...
    bytes_received: int = 0  # ...and the peers' replies
    per_peer: dict[str, int] = field(default_factory=dict)
    streamed: int = 0  # keys sent or received whole, under a span one side lacks (no leaf walk)
    throttled_s: float = 0.0  # seconds merges waited for the rate limits (keys and bytes)
    busy: int = 0  # rounds skipped, or peers' exchanges refused, while another repair ran
    regrown: int = 0  # trees copied into a deeper one as their range grew


class TokenBucket:
    """``rate`` units per second, in the loop's clock (the simulator's virtual one in tests).
    A taker reserves its units at once and sleeps off the debt, so concurrent takers are paced
    in turn; a burst of ``rate * BURST_S`` (at least ``least_burst``) accumulates while idle.
    ``rate`` <= 0: unlimited."""

    BURST_S = 0.05

    def __init__(self, rate: float, least_burst: float = float(YIELD_EVERY)) -> None:
        self.rate = rate
        self.burst = max(least_burst, rate * self.BURST_S)
        self.tokens = self.burst
        self.waited = 0.0
        self._t: float | None = None

    async def take(self, n: int) -> None:
        if self.rate <= 0 or n <= 0:
            return
        now = asyncio.get_running_loop().time()
        if self._t is not None:
            self.tokens = min(self.burst, self.tokens + (now - self._t) * self.rate)
        self._t = now
        self.tokens -= n
        if self.tokens < 0:
            wait = -self.tokens / self.rate
            self.waited += wait
            await asyncio.sleep(wait)


def _h(x: int) -> bytes:
    return x.to_bytes(16, "big")


def _unh(b: Any) -> int:
    if not isinstance(b, bytes) or len(b) != 16:
        raise ProtocolError("a Merkle hash is 16 bytes")
    return int.from_bytes(b, "big")


class AntiEntropy:
    """The trees and the exchange loop of one node (or its owner worker); see the module
    docstring. ``clock``: wall-clock seconds for tombstone times (the simulator passes its
    virtual clock)."""

    def __init__(
        self, node: Node, settings: Settings | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.node = node
        self.settings = settings or Settings()
        self.clock = clock
        self.stats = Stats()
        self.trees: dict[Range, MerkleTree] = {}
        self.tombs: dict[bytes, float] = {}
        self.ready = False  # the first build is done: the trees may be compared
        self._dirty: set[bytes] | None = None  # keys written during a build
        self._growing: set[bytes] | None = None  # keys written while a tree is being regrown
        self._built_epoch: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._rebuild_now = False
        self._rng = random.Random(node.config.name)  # deterministic jitter, per node
        self.bucket = TokenBucket(self.settings.rate)
        self.byte_bucket = TokenBucket(self.settings.byte_rate, least_burst=MIN_BYTE_RATE * TokenBucket.BURST_S)
        #: the peer this node's own exchange is repairing with (None: none running)
        self._repairing: str | None = None
        #: loop time until which this node counts as serving a peer's repair
        self._serving_until = -1.0
        self._serving_peer: str | None = None
        self._ranges: tuple[Any, tuple[Range | None, ...]] | None = None  # (ring, per-vnode range)
        self._last: tuple[bytes, Range | None] | None = None  # the last key's range, that ring
        node.replica.on_change = self._changed

    # -- keeping the trees -------------------------------------------------------------------

    def _range(self, skey: bytes) -> Range | None:
        """The replica set of store key ``skey`` if this node is in it. One bisect: the sets
        are tabled per vnode for the current ring (Ring.vnode_preference_lists), not walked
        per key -- this runs for every write and every key an exchange moves."""
        ring = self.node.ring
        if ring is None or len(skey) < 2:
            return None
        if self._ranges is None or self._ranges[0] is not ring:
            n, me = self.node.config.n, self.node.config.name
            self._ranges = (ring, ring.derived(("ae_ranges", n, me), lambda: _range_table(ring, n, me)))
            self._last = None
        last = self._last  # a merge asks for its key's range twice: the check, then on_change
        if last is not None and last[0] == skey:
            return last[1]
        rng = self._ranges[1][ring.vnode_index(skey[1:])]
        self._last = (skey, rng)
        return rng

    def _mark(self, skey: bytes) -> None:
        """A tree entry of ``skey`` changed: a build or a regrow under way must look again."""
        if self._dirty is not None:
            self._dirty.add(skey)
        if self._growing is not None:
            self._growing.add(skey)

    def _changed(self, skey: bytes, raw: bytes, value: object) -> None:
        """Replica.on_change: a write landed on this node."""
        if skey[:1] not in (VERSIONS, COUNTER):
            return
        self._mark(skey)
        tomb = isinstance(value, VersionSet) and value.is_deleted
        self._apply(self.trees, self.tombs, skey, raw, tomb)

    def _apply(
        self, trees: dict[Range, MerkleTree], tombs: dict[bytes, float], skey: bytes,
        raw: bytes | None, tomb: bool, since: float | None = None, depths: dict[Range, int] | None = None,
    ) -> None:
        rng = self._range(skey)
        if rng is None:
            return
        tree = trees.get(rng)
        if tree is None:
            if raw is None:
                return
            tree = trees[rng] = MerkleTree((depths or {}).get(rng, self.settings.depth))
        tree.update(skey, raw)
        if raw is not None and tomb:
            t = tombs.get(skey)
            start = self.clock() if since is None else since
            tombs[skey] = start if t is None else min(t, start)
        else:
            tombs.pop(skey, None)

    def refresh(self, skeys: Iterable[bytes]) -> None:
        """Re-read these store keys and bring the trees up to date (a relay's notification)."""
        store = self.node.replica.store
        for skey in skeys:
            if skey[:1] not in (VERSIONS, COUNTER) or len(skey) < 2:
                continue
            raw = store.get(skey)
            self._mark(skey)
            self._apply(self.trees, self.tombs, skey, raw, _is_tomb(skey, raw), self.tombs.get(skey))
            self.stats.notified += 1

    async def build(self) -> None:
        """(Re)build every tree from the Store, in chunks; see the module docstring."""
        t0 = time.monotonic()
        store = self.node.replica.store
        self._dirty = set()
        trees: dict[Range, MerkleTree] = {}
        tombs: dict[bytes, float] = {}
        old = self.tombs
        epoch = self.node.ring.epoch if self.node.ring is not None else None
        # each range starts at the depth its last tree's size calls for (no regrow after)
        depths = {r: depth_for(len(t), self.settings.depth) for r, t in self.trees.items()}
        try:
            for chunk in _chunks(store, BUILD_CHUNK):
                for skey, raw in chunk:
                    if skey[:1] in (VERSIONS, COUNTER) and isinstance(raw, bytes):
                        self._apply(trees, tombs, skey, raw, _is_tomb(skey, raw), old.get(skey), depths)
                await asyncio.sleep(0)
            for rng, tree in list(trees.items()):  # not live yet: the dirty pass below covers it
                if depth_for(len(tree), self.settings.depth) > tree.depth:
                    trees[rng] = await self._regrown(tree)
            for skey in sorted(self._dirty):  # written while the scan ran: the Store decides
                raw = store.get(skey)
                self._apply(trees, tombs, skey, raw, _is_tomb(skey, raw), old.get(skey))
        finally:
            self._dirty = None
        self.trees, self.tombs = trees, tombs
        self._built_epoch = epoch
        self.ready = True
        self.stats.builds += 1
        self.stats.last_build_s = time.monotonic() - t0
        log.info("%s: anti-entropy trees built: %d keys in %d replica sets, %d tombstones, %.2f s",
                 self.node.config.name, sum(len(t) for t in trees.values()), len(trees), len(tombs),
                 self.stats.last_build_s)

    # -- collecting tombstones --------------------------------------------------------------

    def collect(self) -> int:
        """Remove the tombstones older than the grace (atomically: only if unchanged)."""
        now = self.clock()
        store = self.node.replica.store
        grace = self.settings.grace
        if getattr(self.node, "test_bug", None) == "tombstone-early-gc":  # DELIBERATE BUG, tests only
            grace = 0.0  # (coordinator.TEST_BUG_ENV): collected without waiting for the grace
        due = sorted(k for k, t in self.tombs.items() if t + grace <= now)
        done = 0
        for skey in due:
            raw = store.get(skey)
            if raw is not None and not _is_tomb(skey, raw):
                self.tombs.pop(skey, None)  # a write superseded it: a live key now
                continue
            if raw is None or store.cas(skey, raw, raw, ttl=_EXPIRE_NOW):
                self._mark(skey)
                rng = self._range(skey)
                if rng is not None and rng in self.trees:
                    self.trees[rng].update(skey, None)
                self.tombs.pop(skey, None)
                done += 1
        self.stats.collected += done
        return done

    # -- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        await _cancelled(self._task)
        self._task = None

    async def run(self) -> None:
        """Build, then every ``interval`` (with up to 10 % jitter, so peers do not all start
        together): collect, regrow trees that outgrew their depth, exchange with a peer;
        rebuild every ``rebuild`` seconds."""
        loop = asyncio.get_running_loop()
        s = self.settings
        await self.build()
        last_build = loop.time()
        period = s.interval if s.interval > 0 else 1.0
        while True:
            _raise_if_cancelled()
            await asyncio.sleep(period * (0.9 + 0.2 * self._rng.random()))
            ring = self.node.ring
            if self._rebuild_now or (ring is not None and ring.epoch != self._built_epoch) or (
                s.rebuild > 0 and loop.time() - last_build >= s.rebuild
            ):
                self._rebuild_now = False
                await self.build()
                last_build = loop.time()
            self.collect()
            await self.grow()
            if s.interval > 0:
                await self.round()

    # -- regrowing a tree whose range grew ---------------------------------------------------

    async def _regrown(self, tree: MerkleTree) -> MerkleTree:
        """A copy of ``tree`` at the depth its size calls for: its digests, leaf by leaf, about
        BUILD_CHUNK keys between yields (no hashing, no Store reads)."""
        new = MerkleTree(depth_for(len(tree), self.settings.depth))
        done = 0
        for li in tree.leaf_ids():
            leaf = tree.leaf(li)
            for k, d in leaf.items():
                new.set_digest(k, d)
            done += len(leaf)
            if done >= BUILD_CHUNK:
                done = 0
                await asyncio.sleep(0)
        return new

    async def grow(self) -> None:
        """Replace every tree that outgrew its depth (merkle.depth_for) by a deeper copy. Writes
        that land meanwhile go to the live tree and are remembered; the copy takes their
        digests from it just before it replaces it, so none is missed."""
        for rng, tree in sorted(self.trees.items()):
            if depth_for(len(tree), self.settings.depth) <= tree.depth:
                continue
            self._growing = set()
            try:
                new = await self._regrown(tree)
                if self.trees.get(rng) is not tree:
                    continue  # a build replaced it meanwhile
                for skey in self._growing:
                    new.set_digest(skey, tree.digest_of(skey))
            finally:
                self._growing = None
            self.trees[rng] = new
            self.stats.regrown += 1
            log.info("%s: anti-entropy tree of %s regrown to depth %d (%d keys)",
                     self.node.config.name, list(rng), new.depth, len(new))

    # -- exchanges --------------------------------------------------------------------------

    async def round(self) -> None:
        """One exchange, with the next peer in turn (peers in name order, each node starting at
        its own place in the ring's member list): every pair meets within ``len(peers)`` rounds.
        One repair at a time per node: a node serving a peer's repair skips its own round, and
        one repairing refuses other peers' exchanges (AE_ROOTS answers "busy") -- a wiped node
        is then filled once, by one peer, not by all of them at once with the same copies (one
        push-pull exchange repairs both sides). Riak runs one exchange at a time, too."""
        self.stats.rounds += 1
        peers = self.peers()
        if not peers:
            return
        if self._serving():
            self.stats.busy += 1
            return
        ring = self.node.ring
        assert ring is not None
        offset = sorted(ring.members).index(self.node.config.name) if self.node.config.name in ring.members else 0
        for peer in [peers[(self.stats.rounds + offset) % len(peers)]]:
            try:
                await self.exchange(peer)
                self.stats.exchanges += 1
            except (Error, OSError) as e:
                self.stats.failed += 1
                log.debug("%s: anti-entropy with %s failed: %s", self.node.config.name, peer, e)

    def _serving(self, other_than: str | None = None) -> bool:
        """Whether a peer (other than ``other_than``) is repairing with this node right now."""
        return (self._serving_peer not in (None, other_than)
                and asyncio.get_running_loop().time() < self._serving_until)

    def peers(self) -> list[str]:
        me = self.node.config.name
        ring = self.node.ring
        if ring is None:
            return []
        return sorted(m for m in ring.members if m != me and m not in self.node.suspects)

    async def _ask(self, peer: str, code: int, fields: dict[str, Any]) -> Message:
        ring = self.node.ring
        assert ring is not None
        fields["epoch"] = ring.epoch
        msg = Message(code, 0, fields)
        self.stats.bytes_sent += len(wire.encode(msg))
        reply = await self.node.transport.request(ring.members[peer].addr, msg, self.settings.timeout)
        self.stats.bytes_received += len(wire.encode(reply))
        return wire.raise_for_error(reply)

    async def _many(self, peer: str, reqs: Sequence[tuple[int, dict[str, Any]]]) -> list[Message]:
        """Independent requests to one peer, WINDOW in flight; the replies in order."""
        out: list[Message] = []
        pending: deque[asyncio.Future[Message]] = deque()
        try:
            for code, fields in reqs:
                pending.append(asyncio.ensure_future(self._ask(peer, code, fields)))
                if len(pending) >= WINDOW:
                    out.append(await pending.popleft())
            while pending:
                out.append(await pending.popleft())
        finally:
            for t in pending:
                _discard(t)
        return out

    async def exchange(self, peer: str) -> int:
        """Compare every replica set shared with ``peer`` and repair what differs, both ways;
        returns how many keys were found differing (streamed ones included)."""
        if not self.ready:
            return 0
        me = self.node.config.name
        reply = await self._ask(peer, wire.AE_ROOTS, {"from": me})
        theirs: dict[Range, tuple[int, int]] = {}
        roots = _list(reply.fields.get("roots"), "roots")
        depths = reply.fields.get("depths")
        if depths is None:
            depths = [DEFAULT_DEPTH] * len(roots)  # a peer from before trees grew: fixed depth
        if len(_list(depths, "depths")) != len(roots):
            raise ProtocolError("AE_ROOTS answered a depth per root")
        for item, depth in zip(roots, depths, strict=True):
            if not (isinstance(item, list) and len(item) == 2):
                raise ProtocolError("a root is [range, hash]")
            if type(depth) is not int or not 1 <= depth <= MAX_DEPTH:
                raise ProtocolError(f"a tree depth is an int in 1..{MAX_DEPTH}, got {depth!r}")
            theirs[_check_range(item[0], me, peer)] = (_unh(item[1]), depth)
        their_rate = _rate(reply.fields.get("rate"))
        their_bytes = _rate(reply.fields.get("byte_rate"))  # absent (an older peer): no limit
        shared = sorted({r for r in self.trees if peer in r} | set(theirs))
        total = 0
        for rng in shared:
            mine = self.trees.get(rng)
            root, depth = theirs.get(rng, (0, self.settings.depth))
            if (mine.root if mine is not None else 0) == root:
                continue
            self._repairing = peer
            try:
                total += await self._sync_range(peer, rng, root, depth, (their_rate, their_bytes))
            finally:
                self._repairing = None
        self.stats.per_peer[peer] = self.stats.per_peer.get(peer, 0) + total
        return total

    async def _sync_range(
        self, peer: str, rng: Range, their_root: int, their_depth: int, their_rate: tuple[float, float]
    ) -> int:
        """Walk the differing branches of one replica set's trees (merkle.compare over the
        wire), then move the copies: spans one side lacks whole are streamed (AE_PULL from the
        peer, AE_SYNC to it), keys of differing leaves synced both ways (AE_SYNC)."""
        me = self.node.config.name
        tree = self._tree(rng)
        pull: list[Span] = []
        push: list[Span] = []
        keys: list[bytes] = []
        if tree.root == 0:
            pull = [(0, TOKENS)]  # nothing here (a wiped replica): no walk, stream it all
        elif their_root == 0:
            push = [(0, TOKENS)]
        else:
            depth = min(tree.depth, their_depth)  # node hashes agree at every common level
            idxs = [0]
            for level in range(depth):
                parts = list(_batches(idxs, MAX_IDXS))
                replies = await self._many(peer, [
                    (wire.AE_CHILDREN, {"from": me, "range": list(rng), "level": level, "idxs": p}) for p in parts
                ])
                tree = self._tree(rng)  # looked up again: a build may have replaced it meanwhile
                if tree.depth < depth:
                    return 0  # rebuilt shallower meanwhile: the next round walks it afresh
                nxt: list[int] = []
                for part, reply in zip(parts, replies, strict=True):
                    blobs = _list(reply.fields.get("children"), "children")
                    if len(blobs) != len(part):
                        raise ProtocolError("AE_CHILDREN answered a different number of nodes")
                    d, pl, ps = classify_children(level, part, tree.children(level, part),
                                                  [_unpack_children(b) for b in blobs])
                    nxt += d
                    pull += pl
                    push += ps
                idxs = nxt
                if not idxs:
                    break
            else:
                parts = list(_batches(idxs, MAX_IDXS))
                replies = await self._many(peer, [
                    (wire.AE_LEAVES, {"from": me, "range": list(rng), "level": depth, "idxs": p}) for p in parts
                ])
                tree = self._tree(rng)
                if tree.depth < depth:
                    return 0
                for part, reply in zip(parts, replies, strict=True):
                    leaves = _list(reply.fields.get("leaves"), "leaves")
                    if len(leaves) != len(part):
                        raise ProtocolError("AE_LEAVES answered a different number of leaves")
                    keys += differing_keys(tree.subtree(depth, part), [_unpack_leaf(x) for x in leaves])
        self.stats.differing_keys += len(keys)
        total = len(keys)
        if pull:
            total += await self._pull(peer, rng, coalesce(pull))
        if push:
            total += await self._push(peer, rng, coalesce(push), their_rate)
        if keys:
            size, nbytes = self._sync_batch(their_rate)
            await self._send(peer, rng, _batches(keys, size), nbytes)
        return total

    def _sync_batch(self, their_rate: tuple[float, float]) -> tuple[int, int]:
        """Keys and bytes per AE_SYNC to a peer merging at ``their_rate`` (keys/s, bytes/s):
        its WINDOW batches in flight must fit well within the request time-out while it waits
        for its limits. (One copy larger than the byte bound still travels alone.)"""
        keys, nbytes = their_rate
        share = self.settings.timeout / (4 * WINDOW)
        return (SYNC_BATCH if keys <= 0 else max(1, min(SYNC_BATCH, int(keys * share))),
                BATCH_BYTES if nbytes <= 0 else max(1, min(BATCH_BYTES, int(nbytes * share))))

    async def _pull(self, peer: str, rng: Range, spans: list[Span]) -> int:
        """Stream the peer's copies under ``spans`` (this node holds none there) and merge them:
        AE_PULL batches resumed at a cursor, the next one requested before this one is merged."""
        me = self.node.config.name
        rate = self.settings.rate
        limit = PULL_BATCH if rate <= 0 else max(YIELD_EVERY, min(PULL_BATCH, int(rate / 4)))
        got = 0
        for group in _batches(spans, MAX_SPANS):
            fields = {"from": me, "range": list(rng), "spans": [[lo, hi - 1] for lo, hi in group], "max": limit}
            task: asyncio.Future[Message] | None = asyncio.ensure_future(self._ask(peer, wire.AE_PULL, dict(fields)))
            try:
                while task is not None:
                    reply = await task
                    task = None
                    items = [_check_item(x) for x in _list(reply.fields.get("items"), "items")]
                    if len(items) > limit:
                        raise ProtocolError(f"AE_PULL answered {len(items)} items, {limit} asked")
                    nxt = _cursor(reply.fields.get("next"))
                    if nxt is not None:
                        task = asyncio.ensure_future(self._ask(peer, wire.AE_PULL, {**fields, "after": list(nxt)}))
                    await self._merge(rng, items)
                    got += len(items)
            finally:
                if task is not None:
                    _discard(task)
        self.stats.streamed += got
        self.stats.differing_keys += got
        return got

    async def _push(self, peer: str, rng: Range, spans: list[Span], their_rate: tuple[float, float]) -> int:
        """Stream this node's copies under ``spans`` (the peer holds none there) to it."""
        size, nbytes = self._sync_batch(their_rate)

        def batches() -> Iterator[list[bytes]]:
            after: Cursor | None = None
            while True:
                got = self._tree(rng).scan(spans, after, size)
                if not got:
                    return
                after = got[-1]
                yield [k for _, k in got]
                if len(got) < size:
                    return

        sent = await self._send(peer, rng, batches(), nbytes)
        self.stats.streamed += sent
        self.stats.differing_keys += sent
        return sent

    async def _send(self, peer: str, rng: Range, batches: Iterable[list[bytes]], nbytes: int = BATCH_BYTES) -> int:
        """AE_SYNC this node's copies of these keys to ``peer`` (None for a key it lacks),
        WINDOW requests in flight, at most ``nbytes`` of copies each; merge what it answers --
        its copy wherever that differs from the one sent. Returns the keys sent."""
        me = self.node.config.name
        count = 0
        pending: deque[tuple[asyncio.Future[Message], dict[bytes, bytes | None]]] = deque()
        try:
            for keys in batches:
                for part in _by_bytes([self._item(k) for k in keys], nbytes):
                    sent = {item[0]: item[1] for item in part}
                    req = asyncio.ensure_future(
                        self._ask(peer, wire.AE_SYNC, {"from": me, "range": list(rng), "items": part}))
                    pending.append((req, sent))
                    count += len(part)
                    while len(pending) >= WINDOW:
                        await self._merge_back(rng, *pending.popleft())
            while pending:
                await self._merge_back(rng, *pending.popleft())
        finally:
            for task, _ in pending:
                _discard(task)
        return count

    async def _merge_back(self, rng: Range, task: asyncio.Future[Message], sent: dict[bytes, bytes | None]) -> None:
        reply = await task
        todo = []
        for skey, raw, since in (_check_item(x) for x in _list(reply.fields.get("items"), "items")):
            # only the keys asked about; a copy equal to the one sent changes nothing here
            if skey in sent and raw != sent[skey]:
                todo.append((skey, raw, since))
            elif skey in sent and since is not None and skey in self.tombs:  # the same tombstone: earliest time
                self.tombs[skey] = min(self.tombs[skey], since)
        await self._merge(rng, todo)

    async def _merge(self, rng: Range, items: Sequence[tuple[bytes, bytes | None, float | None]]) -> None:
        """Merge a peer's copies into this node's, YIELD_EVERY between yields to the event loop
        and paced by the rate limits (``--ae-rate``, ``--ae-bytes-rate``) -- what keeps
        foreground requests served while a wiped replica fills."""
        for i in range(0, len(items), YIELD_EVERY):
            chunk = items[i : i + YIELD_EVERY]
            await self._pace(chunk)
            for skey, raw, since in chunk:
                if self._range(skey) != rng:
                    raise ProtocolError(f"{skey[:64]!r} is not in replica set {list(rng)}")
                self._take(skey, raw, since)
            await asyncio.sleep(0)

    async def _pace(self, chunk: Sequence[tuple[bytes, bytes | None, float | None]]) -> None:
        """Wait for the tokens of merging ``chunk`` (its copies; None costs nothing: nothing
        is merged). The two waits overlap: the byte bucket refills while the key bucket's
        debt is slept off, so the slower limit is what holds."""
        copies = [(k, raw) for k, raw, _ in chunk if raw is not None]
        before = self.bucket.waited + self.byte_bucket.waited
        await self.bucket.take(len(copies))
        await self.byte_bucket.take(sum(_cost(k, raw) for k, raw in copies))
        self.stats.throttled_s += self.bucket.waited + self.byte_bucket.waited - before

    def _tree(self, rng: Range) -> MerkleTree:
        tree = self.trees.get(rng)
        return MerkleTree(self.settings.depth) if tree is None else tree

    def _item(self, skey: bytes) -> list[Any]:
        raw = self.node.replica.store.get(skey)
        return [skey, raw, self.tombs.get(skey) if raw is not None else None]

    def _take(self, skey: bytes, raw: bytes | None, since: float | None) -> Any:
        """Merge a peer's copy of ``skey`` into this node's (and its tombstone time); returns
        this node's stored copy after it (bytes, or None)."""
        store = self.node.replica.store
        before = store.get(skey)
        if raw is None:
            return before
        replica = self.node.replica
        if skey[:1] == VERSIONS:
            vs = VersionSet.decode(raw)
            deleted = vs.is_deleted
            if (deleted and since is not None and since + self.settings.grace <= self.clock()
                    and (before is None or (skey not in self.tombs and _is_tomb(skey, before)))):
                # collected here already (or about to be everywhere): not stored again. A
                # tombstone collect() just expired can still be read until the Store's next
                # millisecond (a ttl is rounded up to whole ms): ``before`` is then that
                # tombstone, already out of self.tombs, and merging into it would store it
                # again for a whole new grace (seen: 1 exchange in ~160 right after a collect)
                return None
            replica.merge(skey[1:], vs)
            if deleted and since is not None and skey in self.tombs:
                self.tombs[skey] = min(self.tombs[skey], since)
        elif skey[:1] == COUNTER:
            replica.merge_counter(skey[1:], PNCounter.decode(raw))
        else:
            raise ProtocolError(f"not a replica's store key: {skey[:16]!r}")
        after = store.get(skey)
        if after != before:
            self.stats.repaired += 1
        return after

    # -- serving peers ----------------------------------------------------------------------

    async def handle(self, code: int, f: Any) -> Message:
        """Answer one AE request of a peer (or a relay's AE_NOTIFY)."""
        if code == wire.AE_NOTIFY:
            if f.get("overflow"):
                self._rebuild_now = True
            self.refresh(_keys(f["keys"]))
            return Message(wire.OK, 0, {})
        node = self.node
        ring = node.ring
        if ring is None or not self.ready:  # a rebuild keeps the live trees: only the first waits
            raise Overloaded("anti-entropy trees are being built")
        if f["epoch"] != ring.epoch:
            raise WrongEpoch(f"{node.config.name} is at ring epoch {ring.epoch}, the request at {f['epoch']}",
                             expected=ring.epoch, got=f["epoch"])
        me = node.config.name
        if code == wire.AE_ROOTS:
            peer = f["from"]
            if peer not in ring.members:
                raise BadRequest(f"{peer!r} is not a member of ring epoch {ring.epoch}")
            if self._repairing not in (None, peer) or self._serving(other_than=peer):
                self.stats.busy += 1
                raise Overloaded(f"{me} is repairing with {self._repairing or self._serving_peer}: one at a time")
            shared = [(r, t) for r, t in sorted(self.trees.items()) if peer in r]
            # depths and rate: fields of their own, so the roots keep their [range, hash] shape
            return Message(wire.OK, 0, {"roots": [[list(r), _h(t.root)] for r, t in shared],
                                        "depths": [t.depth for _, t in shared], "rate": self.settings.rate,
                                        "byte_rate": self.settings.byte_rate})
        rng = _check_range(f["range"], me, None)
        peer = f.get("from")
        if isinstance(peer, str):
            if peer not in rng:
                raise BadRequest(f"{peer!r} holds no copies of replica set {list(rng)}")
            self._serving_peer = peer  # a peer found a difference: it is repairing with us
            self._serving_until = asyncio.get_running_loop().time() + min(SERVING_S, self.settings.timeout)
        elif code in (wire.AE_SYNC, wire.AE_PULL):
            raise BadRequest(f"{wire.NAMES[code]} names its sender (from)")
        tree = self._tree(rng)
        depth = tree.depth
        if code == wire.AE_CHILDREN:
            level = f["level"]
            if not 0 <= level < depth:
                raise BadRequest(f"level {level} outside 0..{depth - 1} (tree depth {depth})")
            idxs = _check_idxs(f["idxs"], FANOUT**level)
            return Message(wire.OK, 0, {"children": [_pack_children(c) for c in tree.children(level, idxs)]})
        if code == wire.AE_LEAVES:
            level = f.get("level", depth)
            if type(level) is not int or not 0 <= level <= depth:
                raise BadRequest(f"leaf level {level!r} outside 0..{depth} (tree depth {depth})")
            idxs = _check_idxs(f["idxs"], FANOUT**level)
            leaves = [[[k, _h(d)] for k, d in sorted(leaf.items())] for leaf in tree.subtree(level, idxs)]
            return Message(wire.OK, 0, {"leaves": leaves})
        if code == wire.AE_SYNC:
            items = [_check_item(x) for x in _list(f["items"], "items")]
            if len(items) > 4 * SYNC_BATCH:
                raise BadRequest(f"at most {4 * SYNC_BATCH} items per AE_SYNC")
            for skey, _raw, _since in items:
                if self._range(skey) != rng:
                    raise BadRequest(f"{skey[:64]!r} is not in replica set {list(rng)}")
            out = []
            for i in range(0, len(items), YIELD_EVERY):  # foreground requests between chunks
                chunk = items[i : i + YIELD_EVERY]
                await self._pace(chunk)
                for skey, raw, since in chunk:
                    now = self._take(skey, raw, since)
                    t = self.tombs.get(skey) if now is not None else None
                    # answered only where the sender's copy is not already the merged one
                    if now != raw or (t is not None and (since is None or t < since)):
                        out.append([skey, now, t])
                await asyncio.sleep(0)
            return Message(wire.OK, 0, {"items": out})
        if code == wire.AE_PULL:
            spans = _check_spans(f["spans"])
            after = _cursor(f.get("after"), BadRequest)
            limit = f.get("max") or PULL_BATCH
            if type(limit) is not int or not 1 <= limit <= PULL_BATCH:
                raise BadRequest(f"AE_PULL max {limit!r} outside 1..{PULL_BATCH}")
            return Message(wire.OK, 0, self._pull_reply(tree, spans, after, limit))
        raise BadRequest(f"{wire.NAMES.get(code, code)} is not an anti-entropy request")

    def _pull_reply(self, tree: MerkleTree, spans: list[Span], after: Cursor | None, limit: int) -> dict[str, Any]:
        """Up to ``limit`` keys (and BATCH_BYTES of copies) under ``spans`` after the cursor, in
        token order, each as [store key, copy, tombstone time]; ``next``: the cursor to resume
        at, None when the spans are done."""
        store = self.node.replica.store
        got = tree.scan(spans, after, limit)
        items: list[list[Any]] = []
        size = 0
        for i, (t, k) in enumerate(got):
            raw = store.get(k)
            if isinstance(raw, bytes):  # None: gone since the tree saw it (the next build drops it)
                items.append([k, raw, self.tombs.get(k)])
                size += len(k) + len(raw) + 16
            if size >= BATCH_BYTES and i + 1 < len(got):
                return {"items": items, "next": [t, k]}
        nxt = [got[-1][0], got[-1][1]] if len(got) >= limit else None
        return {"items": items, "next": nxt}

    def status(self) -> dict[str, Any]:
        s = self.stats
        return {
            "ready": self.ready, "keys": sum(len(t) for t in self.trees.values()),
            "replica_sets": len(self.trees), "tombstones": len(self.tombs), "rounds": s.rounds,
            "exchanges": s.exchanges, "failed": s.failed, "differing_keys": s.differing_keys,
            "repaired": s.repaired, "collected": s.collected, "builds": s.builds,
            "last_build_s": round(s.last_build_s, 3), "bytes_sent": s.bytes_sent,
            "bytes_received": s.bytes_received, "notified": s.notified,
            "streamed": s.streamed, "rate": self.settings.rate, "byte_rate": self.settings.byte_rate,
            "throttled_s": round(s.throttled_s, 3),
            "busy": s.busy, "regrown": s.regrown,
            "depths": sorted({t.depth for t in self.trees.values()}),
            # the sum of every root: equal on nodes that hold the same copies of the same sets
            "digest": _h(sum(t.root for t in self.trees.values()) % (1 << 128)).hex(),
        }


class Relay:
    """A non-owner worker's side (module docstring): announce this worker's writes to the owner,
    forward peers' AE requests to it."""

    def __init__(self, node: Node, timeout: float = 5.0) -> None:
        self.node = node
        self.timeout = timeout
        self.pending: set[bytes] = set()
        self.overflow = False
        self._task: asyncio.Task[None] | None = None
        node.replica.on_change = self._changed

    def _changed(self, skey: bytes, raw: bytes, value: object) -> None:
        if skey[:1] not in (VERSIONS, COUNTER):
            return
        if len(self.pending) >= NOTIFY_MAX:
            self.overflow = True
            self.pending.clear()
        self.pending.add(skey)

    def _owner(self) -> str:
        raw = self.node.replica.store.get(AE_OWNER_KEY)
        if not isinstance(raw, bytes):
            raise Overloaded("this node's anti-entropy owner is not running")
        return raw.decode()

    async def handle(self, code: int, f: Any) -> Message:
        return await self.node.transport.request(self._owner(), Message(code, 0, dict(f)), self.timeout)

    async def flush(self) -> None:
        if not self.pending and not self.overflow:
            return
        keys = sorted(self.pending)
        overflow = self.overflow
        self.pending = set()
        self.overflow = False
        try:
            owner = self._owner()
            for part in _batches(keys, 4096):
                fields: dict[str, Any] = {"keys": part}
                if overflow:
                    fields["overflow"] = 1
                    overflow = False
                await self.node.transport.request(owner, Message(wire.AE_NOTIFY, 0, fields), self.timeout)
        except (Error, OSError):
            for k in keys:  # kept for the next flush (bounded by NOTIFY_MAX)
                self._changed(k, b"", None)
            self.overflow = self.overflow or overflow

    async def run(self) -> None:
        while True:
            _raise_if_cancelled()
            await asyncio.sleep(NOTIFY_INTERVAL)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        await _cancelled(self._task)
        self._task = None
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.flush(), self.timeout)



async def _cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (the loop of an owner or a relay) and wait for it to end."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return None

# -- the daemon's hook ----------------------------------------------------------------------

Handler = Callable[[Message], Awaitable[Message]]


class Service:
    """What the daemon starts and stops: the owner's trees (plus, with workers, its private
    listener) or a relay. ``wrap`` puts the AE codes in front of the node's request handler."""

    def __init__(self, node: Node, settings: Settings, owner: bool, workers: int) -> None:
        self.node = node
        self.owner: AntiEntropy | None = AntiEntropy(node, settings) if owner else None
        self.relay: Relay | None = None if owner else Relay(node, settings.timeout)
        self.workers = workers
        self.private: str | None = None

    async def _private(self, msg: Message) -> Message:
        try:
            return await self._answer(msg)
        except Error as e:
            return wire.error_reply(msg.rid, e)

    async def _answer(self, msg: Message) -> Message:
        if self.owner is not None:
            return await self.owner.handle(msg.code, msg.fields)
        assert self.relay is not None
        return await self.relay.handle(msg.code, msg.fields)

    def wrap(self, handler: Handler) -> Handler:
        async def handle(msg: Message) -> Message:
            if msg.code in AE_CODES:
                if self.node.draining:
                    raise Overloaded("node is shutting down")
                return await self._answer(msg)
            return await handler(msg)

        return handle

    async def start(self) -> None:
        if self.owner is not None:
            if self.workers > 1:  # the relays' way in; on loopback, never the cluster's port
                self.private = await self.node.transport.serve("127.0.0.1:0", self._private)
                self.node.replica.store.put(AE_OWNER_KEY, self.private.encode())
            self.node.status_extra["antientropy"] = self.owner.status
            self.owner.start()
        elif self.relay is not None:
            relay = self.relay
            self.node.status_extra["antientropy"] = lambda: {"relay": True, "pending": len(relay.pending)}
            relay.start()

    async def stop(self) -> None:
        if self.owner is not None:
            await self.owner.stop()
        if self.relay is not None:
            await self.relay.stop()

    def status(self) -> dict[str, Any]:
        return self.owner.status() if self.owner is not None else {"relay": True}


def service(node: Node, settings: Settings, worker_index: int | None, workers: int) -> Service:
    """The daemon's one call at start-up, right after the ring is known and before requests are
    served: the hook on the replica is installed here, so no write is missed."""
    return Service(node, settings, owner=worker_index in (None, 0), workers=workers)


# -- helpers --------------------------------------------------------------------------------


def _raise_if_cancelled() -> None:
    """A loop that catches a request's errors must still stop when cancelled: asyncio.wait_for
    (under the transports) can lose a cancellation that races the reply's failure and raise
    that failure instead, which the loop would log and carry on from."""
    task = asyncio.current_task()
    if task is not None and getattr(task, "cancelling", lambda: 0)():
        raise asyncio.CancelledError


def _is_tomb(skey: bytes, raw: bytes | None) -> bool:
    if raw is None or skey[:1] != VERSIONS or raw[-1:] != b"\xc0":
        return False  # the last sibling's value is not nil (msgpack 0xc0): not all tombstones
    try:
        return VersionSet.decode(raw).is_deleted
    except ClusterError:
        return False


def _chunks(store: Any, size: int) -> Iterator[list[tuple[bytes, Any]]]:
    """The Store's items in lists of ``size``. Memory only, the scan copies a stripe at a time
    under its lock (safe across writes); with a disk tier each chunk is its own bounded
    ``scan(start)``, materialised before the caller yields, so no LSM iterator stays open
    across other coroutines' writes."""
    if getattr(store, "path", None) is None:
        it = iter(store.items())
        while True:
            chunk = list(islice(it, size))
            if not chunk:
                return
            yield chunk
    start: bytes | None = None
    while True:
        chunk = list(islice(store.scan(start), size))
        if start is not None and chunk and chunk[0][0] == start:
            chunk = chunk[1:]  # start is inclusive: the last key of the previous chunk
        if not chunk:
            return
        yield chunk
        start = chunk[-1][0]


def _batches(xs: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(xs), size):
        yield list(xs[i : i + size])


def _range_table(ring: Ring, n: int, me: str) -> tuple[Range | None, ...]:
    """Per vnode of ``ring``, the sorted replica set of its keys if ``me`` is in it, else None.
    Kept on the ring (Ring.derived): an owner restarted on the same ring, or several nodes of
    one process (the simulator's), table it once -- ~10 ms for 6,000 vnodes."""
    return tuple(tuple(sorted(p)) if me in p else None for p in ring.vnode_preference_lists(n))


def _cost(skey: bytes, raw: bytes | None) -> int:
    """What one item weighs against the byte limits: its store key, its copy, and 16 bytes of
    framing and tombstone time."""
    return len(skey) + (len(raw) if raw is not None else 0) + 16


def _rate(v: Any) -> float:
    """A peer's advertised limit (AE_ROOTS), or 0.0 (no limit) if it said none or nonsense."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    return float(v) if ok else 0.0


def _by_bytes(items: list[list[Any]], limit: int) -> Iterator[list[list[Any]]]:
    """``items`` ([store key, copy, time]) in runs of at most ``limit`` bytes of keys and
    copies (:func:`_cost`; at least one item each)."""
    part: list[list[Any]] = []
    size = 0
    for item in items:
        n = _cost(item[0], item[1])
        if part and size + n > limit:
            yield part
            part, size = [], 0
        part.append(item)
        size += n
    if part:
        yield part


def _discard(task: asyncio.Future[Any]) -> None:
    """Cancel a request no one will wait for, and retrieve its outcome (no "never retrieved"
    warning when it had failed already)."""
    task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _check_spans(v: Any) -> list[Span]:
    """AE_PULL spans: [[first token, last token], ...] (inclusive on the wire -- 2**64 does not
    fit msgpack), sorted and disjoint; returned as half-open [lo, hi)."""
    spans = _list(v, "spans")
    if not spans or len(spans) > MAX_SPANS:
        raise BadRequest(f"an AE_PULL names 1..{MAX_SPANS} token spans")
    out: list[Span] = []
    prev = -1
    for sp in spans:
        if not (isinstance(sp, list) and len(sp) == 2 and all(type(x) is int for x in sp)):
            raise BadRequest("a token span is [first, last], two ints")
        lo, last = sp
        if not prev < lo <= last < TOKENS:
            raise BadRequest(f"token span {sp} is not sorted, disjoint and within 0..2**64-1")
        out.append((lo, last + 1))
        prev = last
    return out


def _cursor(v: Any, error: type[Error] = ProtocolError) -> Cursor | None:
    if v is None:
        return None
    if not (isinstance(v, list) and len(v) == 2 and type(v[0]) is int and 0 <= v[0] < TOKENS
            and isinstance(v[1], bytes)):
        raise error("an AE_PULL cursor is [token, store key]")
    return v[0], v[1]


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise ProtocolError(f"anti-entropy: {what} is not a list")
    return v


def _keys(v: Any) -> list[bytes]:
    return [k for k in _list(v, "keys") if isinstance(k, bytes)]


def _check_range(v: Any, me: str, peer: str | None) -> Range:
    if not (isinstance(v, list) and v and all(isinstance(x, str) for x in v)) or v != sorted(set(v)):
        raise BadRequest("a replica set is a sorted list of distinct node names")
    if me not in v or (peer is not None and peer not in v):
        raise BadRequest(f"replica set {v} does not hold {me if me not in v else peer}")
    return tuple(v)


def _check_idxs(v: Any, limit: int) -> list[int]:
    idxs = _list(v, "idxs")
    if len(idxs) > MAX_IDXS:
        raise BadRequest(f"at most {MAX_IDXS} tree nodes per request")
    for i in idxs:
        if type(i) is not int or not 0 <= i < limit:
            raise BadRequest(f"tree node index {i!r} outside 0..{limit - 1}")
    return idxs


def _check_item(v: Any) -> tuple[bytes, bytes | None, float | None]:
    if not (isinstance(v, list) and len(v) == 3):
        raise BadRequest("an AE_SYNC item is [store key, bytes | None, time | None]")
    skey, raw, since = v
    if not isinstance(skey, bytes) or len(skey) < 2 or skey[:1] not in (VERSIONS, COUNTER):
        raise BadRequest("an AE_SYNC item's key is b'v' or b'c' + a non-empty key")
    if raw is not None and not isinstance(raw, bytes):
        raise BadRequest("an AE_SYNC item's copy is bytes or None")
    if since is not None and (isinstance(since, bool) or not isinstance(since, (int, float))):
        raise BadRequest("an AE_SYNC item's tombstone time is a number or None")
    return skey, raw, None if since is None else float(since)


def _pack_children(hashes: Sequence[int]) -> bytes:
    """Sparse: (child index byte, 16-byte hash) for each non-empty child -- a sparse tree's
    nodes have few, and an absent child is hash 0."""
    return b"".join(bytes([i]) + _h(x) for i, x in enumerate(hashes) if x)


def _unpack_children(b: Any) -> list[int]:
    if not isinstance(b, bytes) or len(b) % 17 or len(b) > 17 * FANOUT:
        raise ProtocolError(f"a node's children are up to {FANOUT} (index, 16-byte hash) pairs")
    out = [0] * FANOUT
    for i in range(0, len(b), 17):
        c = b[i]
        if c >= FANOUT:
            raise ProtocolError(f"child index {c} outside 0..{FANOUT - 1}")
        out[c] = int.from_bytes(b[i + 1 : i + 17], "big")
    return out


def _unpack_leaf(v: Any) -> dict[bytes, int]:
    out = {}
    for item in _list(v, "leaf"):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], bytes)):
            raise ProtocolError("a leaf item is [key, digest]")
        out[item[0]] = _unh(item[1])
    return out


__all__ = ["AntiEntropy", "Relay", "Service", "Settings", "service", "AE_CODES"]
