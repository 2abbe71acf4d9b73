"""Merkle trees over key ranges, maintained as writes land (pure: no store, no I/O).

One :class:`MerkleTree` covers one key range -- anti_entropy.py uses one per *replica set* (the
keys whose preference list is the same set of nodes: exactly what two of those nodes must agree
on). The tree has ``depth`` levels below the root, each node with ``FANOUT`` = 16 children; a key
lives in the leaf given by the top ``4 * depth`` bits of its ring token (mmh3, ring.key_token), so
two nodes put the same key in the same leaf.

    level 0:               root
    level 1:        h0    h1   ...   h15
    ...
    level depth:  leaves (16**depth), each the set of (key, digest) that hash there

The hash of a tree node is the **sum modulo 2**128** of the digests of the items below it, an item's
digest being BLAKE2b-128 of (key length, key, the canonical encoding of its value -- versions.py's
encoding is canonical). A sum is what makes the tree incremental: a write changes one item's
digest, and each of the ``depth + 1`` nodes above it is adjusted by (new - old) -- O(depth) per
write, no rebuild, no dirty flags, no rescan per round. Rejected: Riak's hashtree.erl shape (a
hash of the children's hashes, recomputed lazily over dirty segments) -- the same answers, but an
update must mark and a compare must first rebuild; with a sum every node is always current.
Also rejected: XOR instead of a sum -- an item written twice with the same digest would cancel.
Known limit: a set hash by addition is not collision-resistant against an adversary who chooses
many keys and values to make two different sets sum alike; against chance it is as good as any
128-bit hash. Anti-entropy compares replicas of one cluster, not untrusted input.

Comparing. Two trees are compared top-down (:func:`differing_children`, :func:`differing_keys`):
the roots; for a differing node, its 16 children; and so on to the leaves, whose (key, digest)
lists are exchanged. The work and the bytes are O(d * depth * 16) hashes plus the items of the
d differing leaves -- they grow with the difference, not with the data set. Choose ``depth`` so a
leaf holds a few keys (16**depth near the key count of a range): depth 4 (65 536 leaves) suits
a million keys per range; the sparse levels keep an almost empty tree small.

The leaf count follows the data. A node at level ``l`` covers the token span
``[i << (64 - 4l), (i + 1) << (64 - 4l))`` whatever the tree's depth, so its hash does not depend
on the depth: two trees of different depths agree on every level both have, and are compared
down to the shallower one's leaves (:meth:`MerkleTree.subtree`: a deeper tree's items under one
of those nodes). :func:`depth_for` gives the depth a range of ``n`` keys should have -- at most
LEAF_KEYS keys per leaf on average, never below the configured minimum -- and anti-entropy
regrows a tree that outgrew its depth (a copy of its digests into a deeper tree: no hashing, no
store scan). Depth 3 (4,096 leaves) holds up to 131,072 keys, depth 4 up to 2 M, depth 5 up to
33 M: a differing key costs 16 hashes per level plus its leaf's ~LEAF_KEYS/2 items.

Streaming instead of descending. Where one side's node is empty and the other's is not, nothing
below it can match: the walk stops there (:func:`classify_children`) and the non-empty side's
items under that span are streamed in token order (:meth:`MerkleTree.scan`, resumable at a
``(token, key)`` cursor). A wiped replica is one such span, the whole ring: its repair carries
each key's copy once and no hashes at all. :func:`compare` is the whole walk without I/O.

Invariants: ``node_hash(l, i)`` equals the sum of the digests of the keys whose leaf lies under
``(l, i)`` (mod 2**128), for every node; a key is in at most one leaf; empty nodes are absent
from the sparse levels (hash 0); ``len(tree)`` is the number of keys held.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .ring import key_token

_blake2b = hashlib.blake2b
FANOUT = 16
BITS = 4  # log2(FANOUT)
MOD = 1 << 128
DEFAULT_DEPTH = 3
MAX_DEPTH = 8
#: a range deserves one more level once it averages more than this many keys per leaf
LEAF_KEYS = 32
#: the token space: a span is [lo, hi) with 0 <= lo < hi <= TOKENS
TOKENS = 1 << 64

Span = tuple[int, int]
Cursor = tuple[int, bytes]  # (token, key): a scan resumes strictly after it


def depth_for(count: int, minimum: int = DEFAULT_DEPTH) -> int:
    """The depth a tree of ``count`` keys should have: the smallest at or above ``minimum``
    averaging at most LEAF_KEYS keys per leaf (capped at MAX_DEPTH)."""
    d = max(1, min(minimum, MAX_DEPTH))
    while d < MAX_DEPTH and count > LEAF_KEYS * FANOUT**d:
        d += 1
    return d


def span_of(level: int, idx: int) -> Span:
    """The token span node ``(level, idx)`` covers (the same in a tree of any depth)."""
    shift = 64 - BITS * level
    return idx << shift, (idx + 1) << shift


def coalesce(spans: Iterable[Span]) -> list[Span]:
    """Sorted, with touching or overlapping spans joined."""
    out: list[list[int]] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


#: an empty BLAKE2b-128 state: copying it is cheaper than building one (keyword parsing and
#: parameter block), and gives the same hash
_BLAKE2B_128 = _blake2b(digest_size=16)


def digest(key: bytes, value: bytes) -> int:
    """The 128-bit digest of one item: BLAKE2b-128 of (4-byte key length, key, value)."""
    # one update on the joined bytes: the same hash as three update()s, at half the cost
    h = _BLAKE2B_128.copy()
    h.update(b"".join((len(key).to_bytes(4, "big"), key, value)))
    return int.from_bytes(h.digest(), "big")


class MerkleTree:
    """One key range's tree. ``update`` as each write lands; the rest reads."""

    def __init__(self, depth: int = DEFAULT_DEPTH) -> None:
        if not 1 <= depth <= 8:
            raise ValueError(f"depth must be in 1..8, got {depth}")
        self.depth = depth
        # levels[l]: sparse {index: hash}; levels[depth] are the leaves.
        self._levels: list[dict[int, int]] = [{} for _ in range(depth + 1)]
        self._leaves: dict[int, dict[bytes, int]] = {}
        self._count = 0
        self._shift = 64 - BITS * depth  # token -> leaf index
        #: (level, its nodes) from the leaves' level up to the root: _settle's walk
        self._up = [(level, self._levels[level]) for level in range(depth, -1, -1)]
        #: the leaves whose items changed since the nodes were last brought up to date.
        #: Invariant: every node hash is the sum of the digests below it, except along the
        #: paths from these leaves to the root -- which _settle() mends before any node is
        #: read. Writes only touch the leaf's items and this set (every write a node takes
        #: runs set_digest); the sums are redone when the tree is read (an exchange's walk).
        self._dirty: set[int] = set()

    def leaf_of(self, key: bytes) -> int:
        return key_token(key) >> self._shift

    def __len__(self) -> int:
        return self._count

    @property
    def root(self) -> int:
        self._settle()
        return self._levels[0].get(0, 0)

    def update(self, key: bytes, value: bytes | None) -> None:
        """The stored value of ``key`` is now ``value`` (its canonical encoding; None: the key is
        gone from this range -- a collected tombstone, a handed-off key)."""
        self.set_digest(key, digest(key, value) if value is not None else 0)

    def digest_of(self, key: bytes) -> int:
        """The digest this tree holds for ``key`` (0: none)."""
        items = self._leaves.get(self.leaf_of(key))
        return 0 if items is None else items.get(key, 0)

    def set_digest(self, key: bytes, new: int) -> None:
        """:meth:`update` by digest (0: the key is gone) -- how a tree is copied into one of
        another depth without hashing the values again."""
        # (runs for every write a node takes: the leaf's items and the dirty set -- the sums up
        # to the root are _settle's, once per changed leaf per read of the tree)
        leaf = key_token(key) >> self._shift
        leaves = self._leaves
        items = leaves.get(leaf)
        old = items.get(key, 0) if items is not None else 0
        if new == old:
            return
        if new == 0:
            assert items is not None
            del items[key]
            self._count -= 1
            if not items:
                del leaves[leaf]
        else:
            if old == 0:
                self._count += 1
            if items is None:
                items = leaves[leaf] = {}
            items[key] = new
        self._dirty.add(leaf)

    def _settle(self) -> None:
        """Bring the nodes above the changed leaves up to date (the tree's readers call it)."""
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = set()
        leaves, at_leaves = self._leaves, self._levels[self.depth]
        for leaf in dirty:
            items = leaves.get(leaf)
            delta = ((sum(items.values()) if items else 0) - at_leaves.get(leaf, 0)) % MOD
            idx = leaf
            for level, nodes in self._up:
                h = nodes.get(idx, 0) + delta
                if h >= MOD:
                    h -= MOD
                if h or self._occupied(level, idx):
                    nodes[idx] = h
                else:
                    nodes.pop(idx, None)
                idx >>= BITS

    def _occupied(self, level: int, idx: int) -> bool:
        # A node whose sum is 0 by chance but still has items must stay (probability 2**-128;
        # the check keeps the invariant exact rather than probable).
        shift = BITS * (self.depth - level)
        lo, hi = idx << shift, (idx + 1) << shift
        if hi - lo <= len(self._leaves):
            return any(i in self._leaves for i in range(lo, hi))
        return any(lo <= i < hi for i in self._leaves)

    def node_hash(self, level: int, idx: int) -> int:
        self._settle()
        return self._levels[level].get(idx, 0)

    def children(self, level: int, idxs: Iterable[int]) -> list[list[int]]:
        """For each node ``idx`` of ``level`` (< depth), the hashes of its 16 children."""
        if not 0 <= level < self.depth:
            raise ValueError(f"level {level} has no children in a tree of depth {self.depth}")
        self._settle()
        below = self._levels[level + 1]
        return [[below.get((i << BITS) + c, 0) for c in range(FANOUT)] for i in idxs]

    def leaves(self, idxs: Iterable[int]) -> list[dict[bytes, int]]:
        """The (key -> digest) items of each leaf."""
        return [dict(self._leaves.get(i, {})) for i in idxs]

    def subtree(self, level: int, idxs: Iterable[int]) -> list[dict[bytes, int]]:
        """The (key -> digest) items under each node ``idx`` of ``level`` (<= depth): the
        leaves themselves at ``level == depth``, gathered from the leaves below otherwise --
        what a deeper tree answers for a shallower peer's leaves."""
        if not 0 <= level <= self.depth:
            raise ValueError(f"level {level} outside 0..{self.depth} (tree depth {self.depth})")
        if level == self.depth:
            return self.leaves(idxs)
        shift = BITS * (self.depth - level)
        out = []
        for i in idxs:
            got: dict[bytes, int] = {}
            for li in self._leaf_ids(i << shift, ((i + 1) << shift) - 1):
                got.update(self._leaves[li])
            out.append(got)
        return out

    def _leaf_ids(self, first: int, last: int) -> list[int]:
        """The indexes of the non-empty leaves in first..last, ascending."""
        if last - first < 2 * len(self._leaves) + 16:  # dense enough: walk the index range
            leaves = self._leaves
            return [li for li in range(first, last + 1) if li in leaves]
        return sorted(li for li in self._leaves if first <= li <= last)

    def leaf_ids(self) -> list[int]:
        """The non-empty leaves' indexes (a snapshot, in no particular order)."""
        return list(self._leaves)

    def leaf(self, idx: int) -> dict[bytes, int]:
        """A copy of one leaf's (key -> digest) items."""
        return dict(self._leaves.get(idx, {}))

    def scan(self, spans: Sequence[Span], after: Cursor | None = None, limit: int = 1 << 62) -> list[Cursor]:
        """Up to ``limit`` of this tree's keys whose token lies in ``spans`` (sorted, disjoint),
        as ``(token, key)`` in that order, strictly after ``after``. Resumable: pass the last
        one back as ``after``; fewer than ``limit`` means the spans are exhausted. The work is
        the leaves it reads (plus, for a sparse tree, one pass over the leaf index)."""
        out: list[Cursor] = []
        shift = 64 - BITS * self.depth
        for lo, hi in spans:
            if after is not None and hi <= after[0]:
                continue
            start = lo if after is None else max(lo, after[0])
            for li in self._leaf_ids(start >> shift, (hi - 1) >> shift):
                for t, k in sorted((key_token(k), k) for k in self._leaves[li]):
                    if t < lo or t >= hi or (after is not None and (t, k) <= after):
                        continue
                    out.append((t, k))
                    if len(out) >= limit:
                        return out
        return out

    def items(self) -> Iterable[tuple[bytes, int]]:
        for leaf in self._leaves.values():
            yield from leaf.items()


def differing_children(
    idxs: Sequence[int], mine: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]]
) -> list[int]:
    """The child indexes (next level) where the two sides' hashes differ, given each side's
    :meth:`MerkleTree.children` of the same ``idxs``."""
    if len(mine) != len(idxs) or len(theirs) != len(idxs):
        raise ValueError("children lists do not match the nodes asked for")
    out = []
    for i, a, b in zip(idxs, mine, theirs, strict=True):
        if len(a) != FANOUT or len(b) != FANOUT:
            raise ValueError(f"a node has {FANOUT} children")
        out += [(i << BITS) + c for c in range(FANOUT) if a[c] != b[c]]
    return out


def differing_keys(mine: Sequence[Mapping[bytes, int]], theirs: Sequence[Mapping[bytes, int]]) -> list[bytes]:
    """The keys whose digests differ, or that one side lacks, over matching leaf lists."""
    out: set[bytes] = set()
    for a, b in zip(mine, theirs, strict=True):
        for k in a.keys() | b.keys():
            if a.get(k) != b.get(k):
                out.add(k)
    return sorted(out)


def classify_children(
    level: int, idxs: Sequence[int], mine: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]]
) -> tuple[list[int], list[Span], list[Span]]:
    """Like :func:`differing_children`, but a differing child empty on one side is not worth
    descending into: returns (children both sides hold and that differ -- descend; the spans of
    children only ``theirs`` holds -- pull; the spans of children only ``mine`` holds -- push)."""
    if len(mine) != len(idxs) or len(theirs) != len(idxs):
        raise ValueError("children lists do not match the nodes asked for")
    descend: list[int] = []
    pull: list[Span] = []
    push: list[Span] = []
    for i, a, b in zip(idxs, mine, theirs, strict=True):
        if len(a) != FANOUT or len(b) != FANOUT:
            raise ValueError(f"a node has {FANOUT} children")
        for c in range(FANOUT):
            x, y = a[c], b[c]
            if x == y:
                continue
            child = (i << BITS) + c
            if x == 0:
                pull.append(span_of(level + 1, child))
            elif y == 0:
                push.append(span_of(level + 1, child))
            else:
                descend.append(child)
    return descend, pull, push


@dataclass
class Plan:
    """What comparing two trees finds (:func:`compare`): keys whose leaves differ, spans to
    stream from the other side (``pull``) or to it (``push``), and the hashes and leaf items
    the walk itself carries (the streamed copies not counted)."""

    keys: list[bytes] = field(default_factory=list)
    pull: list[Span] = field(default_factory=list)
    push: list[Span] = field(default_factory=list)
    carried: int = 1


def compare(a: MerkleTree, b: MerkleTree) -> Plan:
    """The walk anti-entropy does between ``a`` (this node) and ``b`` (a peer), without I/O:
    down to the shallower tree's leaves, stopping at nodes empty on one side."""
    plan = Plan()
    if a.root == b.root:
        return plan
    if a.root == 0 or b.root == 0:
        (plan.pull if a.root == 0 else plan.push).append((0, TOKENS))
        return plan
    depth = min(a.depth, b.depth)
    idxs = [0]
    for level in range(depth):
        plan.carried += FANOUT * len(idxs)
        idxs, pull, push = classify_children(level, idxs, a.children(level, idxs), b.children(level, idxs))
        plan.pull += pull
        plan.push += push
        if not idxs:
            break
    else:
        la, lb = a.subtree(depth, idxs), b.subtree(depth, idxs)
        plan.carried += sum(len(x) for x in la) + sum(len(x) for x in lb)
        plan.keys = differing_keys(la, lb)
    plan.pull, plan.push = coalesce(plan.pull), coalesce(plan.push)
    return plan


def diff(a: MerkleTree, b: MerkleTree) -> tuple[list[bytes], int]:
    """Compare two local trees the way two nodes do over the wire: (differing keys, the number of
    hashes and items the exchange would carry). The walk is anti_entropy.py's, without I/O."""
    if a.depth != b.depth:
        raise ValueError("trees of different depths cannot be compared")
    carried = 1
    if a.root == b.root:
        return [], carried
    idxs = [0]
    for level in range(a.depth):
        ca, cb = a.children(level, idxs), b.children(level, idxs)
        carried += FANOUT * len(idxs)
        idxs = differing_children(idxs, ca, cb)
    la, lb = a.leaves(idxs), b.leaves(idxs)
    carried += sum(len(x) for x in la) + sum(len(x) for x in lb)
    return differing_keys(la, lb), carried


__all__ = ["MerkleTree", "Plan", "digest", "diff", "compare", "classify_children", "differing_children",
           "differing_keys", "depth_for", "span_of", "coalesce", "FANOUT", "LEAF_KEYS", "TOKENS"]
