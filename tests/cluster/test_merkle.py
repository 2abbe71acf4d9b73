"""merkle.py: incremental trees agree with a rebuild; comparing finds exactly what differs, and
carries an amount that follows the difference, not the data set."""

from __future__ import annotations

import random

import pytest

from shmkv.cluster.merkle import (
    LEAF_KEYS,
    MOD,
    TOKENS,
    MerkleTree,
    classify_children,
    coalesce,
    compare,
    depth_for,
    diff,
    differing_children,
    digest,
    span_of,
)
from shmkv.cluster.ring import key_token


def rebuilt(model: dict[bytes, bytes], depth: int) -> MerkleTree:
    t = MerkleTree(depth)
    for k, v in sorted(model.items()):
        t.update(k, v)
    return t


def test_a_tree_updated_write_by_write_equals_one_built_from_the_final_data() -> None:
    rng = random.Random(11)
    for depth in (1, 2, 3):
        t = MerkleTree(depth)
        model: dict[bytes, bytes] = {}
        for _ in range(3000):
            k = b"k%d" % rng.randrange(400)
            if rng.random() < 0.25:
                model.pop(k, None)
                t.update(k, None)
            else:
                model[k] = b"v%d" % rng.randrange(5)
                t.update(k, model[k])
        r = rebuilt(model, depth)
        assert t.root == r.root and len(t) == len(model)
        assert diff(t, r) == ([], 1)
        for level in range(depth):
            idxs = range(16**level)
            assert t.children(level, idxs) == r.children(level, idxs)


def test_reads_between_writes_see_every_write_before_them() -> None:
    # The sums above the leaves are brought up to date when the tree is read (_settle): a read
    # at any point -- root, a node, children -- must equal a rebuild of the data so far.
    rng = random.Random(12)
    for depth in (1, 3):
        t = MerkleTree(depth)
        model: dict[bytes, bytes] = {}
        for step in range(1500):
            k = b"k%d" % rng.randrange(300)
            if rng.random() < 0.3:
                model.pop(k, None)
                t.update(k, None)
            else:
                model[k] = b"v%d" % rng.randrange(4)
                t.update(k, model[k])
            if rng.random() < 0.1:  # against the definition: a node is the sum of its digests
                assert t.root == sum(digest(x, v) for x, v in model.items()) % MOD, step
                leaf = t.leaf_of(k)
                assert t.node_hash(depth, leaf) == sum(
                    digest(x, v) for x, v in model.items() if t.leaf_of(x) == leaf) % MOD, step
                level = rng.randrange(depth)
                idxs = range(16**level)
                assert t.children(level, idxs) == rebuilt(model, depth).children(level, idxs), step


def test_an_emptied_tree_is_the_empty_tree() -> None:
    t = MerkleTree(2)
    for i in range(100):
        t.update(b"%d" % i, b"x")
    for i in range(100):
        t.update(b"%d" % i, None)
    assert t.root == 0 and len(t) == 0 and t.children(0, [0]) == [[0] * 16]


def test_diff_names_exactly_the_keys_that_differ_or_are_missing() -> None:
    rng = random.Random(5)
    data = {b"key-%d" % i: b"v" for i in range(2000)}
    a, b = rebuilt(data, 3), rebuilt(data, 3)
    changed = sorted(rng.sample(sorted(data), 30))
    for k in changed[:10]:
        b.update(k, b"other")  # stale on one side
    for k in changed[10:20]:
        b.update(k, None)  # lost on one side (a wiped replica)
    for k in changed[20:]:
        a.update(k, None)
    extra = [b"new-%d" % i for i in range(5)]
    for k in extra:
        a.update(k, b"only in a")
    keys, _ = diff(a, b)
    assert keys == sorted(changed + extra)
    assert diff(b, a)[0] == keys


@pytest.mark.parametrize("differing", [1, 10, 40])
def test_the_exchange_grows_with_the_difference_not_with_the_data(differing: int) -> None:
    carried = {}
    for size in (4000, 40000):
        data = {b"key-%d" % i: b"value" for i in range(size)}
        depth = 4 if size > 10000 else 3  # a few keys per leaf, as the docstring advises
        a, b = rebuilt(data, depth), rebuilt(data, depth)
        for k in random.Random(1).sample(sorted(data), differing):
            b.update(k, b"changed")
        keys, carried[size] = diff(a, b)
        assert len(keys) == differing
        # Per differing key: 16 hashes per level on its path, plus its leaf's few items on both
        # sides; nothing proportional to the data set.
        assert carried[size] <= 1 + differing * (16 * depth + 2 * 6)
    assert carried[40000] < 40000 / 20


def test_bad_comparisons_are_refused() -> None:
    with pytest.raises(ValueError):
        MerkleTree(0)
    with pytest.raises(ValueError):
        diff(MerkleTree(2), MerkleTree(3))
    with pytest.raises(ValueError):
        differing_children([0], [[0] * 16], [[0] * 15])
    with pytest.raises(ValueError):
        MerkleTree(2).children(2, [0])


# -- trees that grow with their range, and the walk that streams what one side lacks ----------

def _quick(keys: list[bytes], depth: int, salt: int = 0) -> MerkleTree:
    """A tree over ``keys`` with made-up digests (no hashing: large trees in little time)."""
    t = MerkleTree(depth)
    for k in keys:
        t.set_digest(k, (hash((k, salt)) | 1) % (1 << 128) or 1)
    return t


def test_depth_follows_the_key_count_and_node_hashes_do_not_depend_on_it() -> None:
    assert depth_for(0) == 3 and depth_for(LEAF_KEYS * 16**3) == 3 and depth_for(LEAF_KEYS * 16**3 + 1) == 4
    assert depth_for(1_000_000) == 4 and depth_for(10, minimum=1) == 1 and depth_for(600, minimum=1) == 2
    data = {b"key-%d" % i: b"v%d" % i for i in range(3000)}
    shallow, deep = rebuilt(data, 2), rebuilt(data, 4)
    assert shallow.root == deep.root
    assert shallow.children(1, range(16)) == deep.children(1, range(16))
    # a deeper tree answers a shallower one's leaves with the items under them
    assert shallow.subtree(2, range(256)) == deep.subtree(2, range(256))
    assert sum(len(x) for x in deep.subtree(0, [0])) == 3000 == len(deep)
    for level in range(3):
        lo, hi = span_of(level, 5 if level else 0)
        assert hi - lo == TOKENS >> (4 * level)


def test_scan_walks_spans_in_token_order_and_resumes_at_its_cursor() -> None:
    keys = [b"s%d" % i for i in range(2000)]
    t = _quick(keys, 3)
    spans = coalesce([span_of(2, 7), span_of(1, 3), span_of(2, 8), (5, 10**12)])
    assert spans[0] == (5, 10**12) and len(spans) == 3  # (2,7) and (2,8) touch: one span
    want = sorted((key_token(k), k) for k in keys if any(lo <= key_token(k) < hi for lo, hi in spans))
    got, after = [], None
    while True:
        part = t.scan(spans, after, 17)
        got += part
        if len(part) < 17:
            break
        after = part[-1]
    assert got == want and len(want) > 50
    assert t.scan([(0, TOKENS)]) == sorted((key_token(k), k) for k in keys)


def test_compare_streams_what_one_side_lacks_and_walks_only_what_both_hold() -> None:
    keys = [b"c%d" % i for i in range(5000)]
    a, b = _quick(keys, 3), _quick(keys, 3)
    assert compare(a, b).carried == 1 and not compare(a, b).keys
    empty = MerkleTree(3)
    plan = compare(empty, a)  # a wiped replica: one span, no hashes walked
    assert plan.pull == [(0, TOKENS)] and plan.push == [] and plan.keys == [] and plan.carried == 1
    assert compare(a, empty).push == [(0, TOKENS)]
    # b lost a whole level-1 branch and two single keys; a lacks one key b has
    lo, hi = span_of(1, 9)
    lost = [k for k in keys if lo <= key_token(k) < hi]
    for k in lost + [keys[0], keys[1]]:
        b.set_digest(k, 0)
    b.set_digest(b"only-b", 77)
    plan = compare(a, b)
    assert plan.push == [(lo, hi)]  # streamed to b whole, never walked
    assert plan.keys == sorted({keys[0], keys[1], b"only-b"} - set(lost))
    d, pull, push = classify_children(0, [0], a.children(0, [0]), b.children(0, [0]))
    assert push == [(lo, hi)] and pull == [] and 9 not in d


def test_a_few_differing_keys_in_a_large_set_carry_few_hashes() -> None:
    keys = [b"big-%d" % i for i in range(150_000)]
    depth = depth_for(len(keys))
    assert depth == 4
    a, b = _quick(keys, depth), _quick(keys, depth)
    for k in keys[:3]:
        b.set_digest(k, 5)
    plan = compare(a, b)
    assert plan.keys == sorted(keys[:3]) and not plan.pull and not plan.push
    # 16 hashes per level on each key's path, plus the few items of its leaf on both sides
    assert plan.carried <= 1 + 3 * (16 * depth + 2 * LEAF_KEYS), plan.carried
    # and against a shallower tree of the same data (a node whose tree has not regrown yet)
    shallow = _quick(keys, 3)
    shallow_plan = compare(shallow, b)
    assert shallow_plan.keys == sorted(keys[:3])
    assert shallow_plan.carried <= 1 + 3 * (16 * 3 + 2 * 16 * LEAF_KEYS)
