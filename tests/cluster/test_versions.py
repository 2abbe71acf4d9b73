"""Versions: scenarios that read as the spec, the merge algebra, a model check, the encoding.

The model (``ModelReplica``) is deliberately simple, in the manner of etcd's quorum/quick_test.go:
a replica is the *set of every write it knows*, each write being (dot, value, the set of dots its
writer had seen). A write is alive when no other known write has seen it. It never forgets and
never compacts, so it is obviously right; the real VersionSet, which keeps only a clock and the
live siblings, must agree with it on what is alive and on what has been seen, after any sequence
of puts, deletes, reads and replica-to-replica merges.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import shmkv
from shmkv.cluster.errors import ProtocolError
from shmkv.cluster.versions import Context, Sibling, VersionSet, descends, join

EMPTY = VersionSet()
QUICK = settings(max_examples=300, deadline=None)


# -- scenarios -------------------------------------------------------------------------------


def test_a_read_modify_write_with_the_context_replaces_the_value() -> None:
    a = EMPTY.put(b"v1", None, "a")
    read = a  # a client reads v1 and its context
    a = a.put(b"v2", read.context, "a")
    assert a.values == [b"v2"]


def test_two_writes_from_the_same_context_through_one_coordinator_are_siblings() -> None:
    # Mary and Peter both read v1 and both write; neither saw the other's write.
    a = EMPTY.put(b"v1", None, "a")
    ctx = a.context
    a = a.put(b"mary", ctx, "a").put(b"peter", ctx, "a")
    assert sorted(a.values) == [b"mary", b"peter"]


def test_writes_at_different_coordinators_that_never_met_become_siblings() -> None:
    base = EMPTY.put(b"v1", None, "a")
    at_a = base.put(b"via-a", base.context, "a")
    at_b = base.merge(EMPTY).put(b"via-b", base.context, "b")
    merged = at_a.merge(at_b)
    assert sorted(merged.values) == [b"via-a", b"via-b"]
    assert merged == at_b.merge(at_a)


def test_a_put_without_context_supersedes_what_its_coordinator_holds_and_nothing_else() -> None:
    a = EMPTY.put(b"x", None, "a")
    b = EMPTY.put(b"y", None, "b")  # b never saw x, a never saw y
    a2 = a.put(b"z", None, "a")
    assert a2.values == [b"z"]
    assert sorted(a2.merge(b).values) == [b"y", b"z"]


def test_a_stale_context_removes_only_what_it_saw() -> None:
    # dvvset's syn_update scenario: Peter writes with the context of v1 after Mary wrote v2
    # without one; v1 goes, v2 stays beside Peter's v3.
    a = EMPTY.put(b"v1", None, "a")
    peter_ctx = a.context
    a = a.put(b"v2", Context(), "a")
    a = a.put(b"v3", peter_ctx, "a")
    assert sorted(a.values) == [b"v2", b"v3"]


def test_resolving_siblings_with_the_merged_context_leaves_one_value() -> None:
    x = EMPTY.put(b"x", None, "a")
    y = EMPTY.put(b"y", None, "b")
    both = x.merge(y)
    resolved = both.put(b"x+y", both.context, "c")
    assert resolved.values == [b"x+y"]
    # The replicas that still hold x or y learn the resolution by merging; none comes back.
    assert x.merge(resolved).values == y.merge(resolved).values == [b"x+y"]


def test_a_delete_is_a_tombstone_with_a_version() -> None:
    a = EMPTY.put(b"v", None, "a")
    gone = a.delete(a.context, "a")
    assert gone.is_deleted and gone.values == [None]
    assert gone.clock == {"a": 2}
    # A replica that still has v does not resurrect it: the tombstone saw v.
    assert a.merge(gone) == gone


def test_a_write_concurrent_with_a_delete_survives_it() -> None:
    a = EMPTY.put(b"v", None, "a")
    deleted = a.delete(a.context, "a")
    rewritten = a.merge(EMPTY).put(b"w", a.context, "b")
    merged = deleted.merge(rewritten)
    assert sorted(merged.values, key=lambda v: v or b"") == [None, b"w"]
    assert not merged.is_deleted


def test_a_replica_that_lost_its_own_dots_mints_past_the_context() -> None:
    # Node a forgot the key (memory-only restart); a client still holds a context with a:3.
    ctx = Context({"a": 3})
    fresh = EMPTY.put(b"new", ctx, "a")
    assert fresh.siblings == (Sibling(b"new", ("a", 4)),)


def test_two_values_for_one_dot_both_survive_a_merge() -> None:
    # A clash the caller's REQUIRES rules out; if it happens anyway, nothing is dropped silently.
    x, y = EMPTY.put(b"x", None, "a"), EMPTY.put(b"y", None, "a")
    assert sorted(x.merge(y).values) == [b"x", b"y"]


def test_clock_helpers() -> None:
    assert descends({"a": 2, "b": 1}, {"a": 1}) and not descends({"a": 1}, {"b": 1})
    assert join({"a": 2}, {"a": 1, "b": 3}) == {"a": 2, "b": 3}


def test_bad_values_and_nodes_are_refused() -> None:
    with pytest.raises(shmkv.InvalidType):
        EMPTY.put("text", None, "a")  # type: ignore[arg-type]
    with pytest.raises(shmkv.InvalidArgument, match="node"):
        EMPTY.put(b"v", None, "")


# -- the merge algebra over arbitrary valid states -------------------------------------------

NODES = ("a", "b", "c")


@st.composite
def version_sets(draw: st.DrawFn) -> VersionSet:
    """Any state the invariants allow, including dots that clash (two values), for the algebra."""
    clock = {n: draw(st.integers(0, 4)) for n in NODES}
    dots = [(n, c) for n in NODES for c in range(1, clock[n] + 1)]
    sibs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(dots),
                st.sampled_from([None, b"x", b"y", b"z"]),
                st.sampled_from([None, None, 5, 10]),  # expiries (ms), most versions have none
            ),
            max_size=5,
        )
        if dots
        else st.just([])
    )
    return VersionSet(clock, [Sibling(v, d, x) for d, v, x in sibs])


@QUICK
@given(version_sets(), version_sets())
def test_merge_is_commutative(a: VersionSet, b: VersionSet) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).encode() == b.merge(a).encode()


@QUICK
@given(version_sets(), version_sets(), version_sets())
def test_merge_is_associative(a: VersionSet, b: VersionSet, c: VersionSet) -> None:
    assert a.merge(b).merge(c) == a.merge(b.merge(c))


@QUICK
@given(version_sets(), version_sets())
def test_merge_is_idempotent_and_an_upper_bound(a: VersionSet, b: VersionSet) -> None:
    assert a.merge(a) == a
    m = a.merge(b)
    assert m.merge(b) == m and m.merge(a) == m
    assert m.descends(a) and m.descends(b)


@QUICK
@given(version_sets(), st.sampled_from(NODES), st.sampled_from(NODES), st.booleans())
def test_concurrent_writes_both_survive(base: VersionSet, n1: str, n2: str, same: bool) -> None:
    # Two writes from one context, through one coordinator or two that have not met.
    ctx = base.context
    w1 = base.put(b"one", ctx, n1)
    w2 = (w1 if same else base).put(b"two", ctx, n1 if same else n2)
    if not same and n1 == n2:
        return  # one node minting from two states that forgot each other: the REQUIRES case
    merged = w1.merge(w2)
    assert {b"one", b"two"} <= set(merged.values)


@QUICK
@given(version_sets(), version_sets(), st.sampled_from(NODES))
def test_a_write_with_a_context_supersedes_exactly_what_it_saw(
    replica: VersionSet, seen_by_client: VersionSet, node: str
) -> None:
    ctx = seen_by_client.context
    after = replica.put(b"new", ctx, node)
    saw = ctx.clock
    kept = {s for s in replica.siblings if s.dot[1] > saw.get(s.dot[0], 0)}
    new = Sibling(b"new", (node, join(replica.clock, saw).get(node, 0) + 1))
    assert set(after.siblings) == kept | {new}
    assert descends(after.clock, join(replica.clock, saw))


@QUICK
@given(st.one_of(st.none(), version_sets()), st.sampled_from([*NODES, "z-new"]), st.sampled_from([None, b"", b"v"]))
def test_the_encoded_put_without_context_is_the_put(held: VersionSet | None, node: str, value: bytes | None) -> None:
    # put_encoded (the daemon's SET fast path) must give exactly put()'s set and its bytes
    got, enc = VersionSet.put_encoded(None if held is None else held.encode(), value, node)
    want = (EMPTY if held is None else held).put(value, None, node)
    assert got == want and enc == want.encode() and VersionSet.decode(enc) == want


def test_the_encoded_put_refuses_what_decode_refuses() -> None:
    with pytest.raises(ProtocolError):
        VersionSet.put_encoded(b"\xc1garbage", b"v", "a")
    with pytest.raises(ProtocolError):
        VersionSet.put_encoded(msgpack.packb([1, [["b", 1], ["a", 1]], []]), b"v", "a")  # unsorted clock


# -- the model check --------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    dot: tuple[str, int]
    value: bytes | None
    seen: frozenset[tuple[str, int]]  # the writer's causal history, its own dot included


@dataclass
class ModelReplica:
    writes: set[Write] = field(default_factory=set)

    def history(self) -> frozenset[tuple[str, int]]:
        return frozenset(itertools.chain.from_iterable(w.seen for w in self.writes))

    def alive(self) -> set[tuple[tuple[str, int], bytes | None]]:
        return {
            (w.dot, w.value)
            for w in self.writes
            if not any(w.dot in o.seen for o in self.writes if o is not w)
        }


def closure(clock: dict[str, int]) -> frozenset[tuple[str, int]]:
    return frozenset((n, c) for n, top in clock.items() for c in range(1, top + 1))


class VersionsAgainstModel(RuleBasedStateMachine):
    """Three replicas, clients holding contexts from past reads; the real sets track the model.

    Every node coordinates only from its own replica (the module's REQUIRES), so dots never clash
    and each must equal the model's globally next dot of that node.
    """

    @initialize()
    def setup(self) -> None:
        self.real = {n: VersionSet() for n in NODES}
        self.model = {n: ModelReplica() for n in NODES}
        self.next_dot = dict.fromkeys(NODES, 0)
        self.contexts: list[tuple[Context, frozenset[tuple[str, int]]]] = []
        self.values = iter(f"v{i}".encode() for i in itertools.count())

    @rule(node=st.sampled_from(NODES), delete=st.booleans(), which=st.integers(-1, 20))
    def put(self, node: str, delete: bool, which: int) -> None:
        value = None if delete else next(self.values)
        if which < 0 or not self.contexts:
            ctx, seen = None, self.model[node].history()
        else:
            ctx, seen = self.contexts[which % len(self.contexts)]
        self.next_dot[node] += 1
        dot = (node, self.next_dot[node])
        self.real[node] = self.real[node].put(value, ctx, node)
        assert Sibling(value, dot) in self.real[node].siblings
        self.model[node].writes.add(Write(dot, value, seen | {dot}))

    @rule(nodes=st.sets(st.sampled_from(NODES), min_size=1))
    def read(self, nodes: set[str]) -> None:
        merged = VersionSet()
        seen: frozenset[tuple[str, int]] = frozenset()
        for n in nodes:
            merged = merged.merge(self.real[n])
            seen |= self.model[n].history()
        self.contexts.append((merged.context, seen))

    @rule(src=st.sampled_from(NODES), dst=st.sampled_from(NODES))
    def sync(self, src: str, dst: str) -> None:
        self.real[dst] = self.real[dst].merge(self.real[src])
        self.model[dst].writes |= self.model[src].writes

    @precondition(lambda self: len(self.contexts) > 0)
    @rule(a=st.integers(0, 20), b=st.integers(0, 20))
    def contexts_merge(self, a: int, b: int) -> None:
        (ca, sa), (cb, sb) = (
            self.contexts[a % len(self.contexts)],
            self.contexts[b % len(self.contexts)],
        )
        self.contexts.append((ca.merge(cb), sa | sb))

    @invariant()
    def replicas_agree_with_the_model(self) -> None:
        for n in NODES:
            real, model = self.real[n], self.model[n]
            assert {(s.dot, s.value) for s in real.siblings} == model.alive()
            assert closure(real.clock) == model.history()

    @invariant()
    def every_order_of_merging_gives_the_same_state(self) -> None:
        a, b, c = (self.real[n] for n in NODES)
        assert a.merge(b).merge(c) == c.merge(a.merge(b)) == b.merge(c).merge(a)


TestVersionsAgainstModel = VersionsAgainstModel.TestCase
TestVersionsAgainstModel.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None
)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 4),
    st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(NODES), st.sampled_from(NODES)), max_size=40
    ),
)
def test_sibling_count_is_bounded_by_concurrent_writers(
    writers: int, steps: list[tuple[int, str, str]]
) -> None:
    # Each client writes with the context of its latest read merged with what its own last write
    # returned (read-your-writes), through any coordinator, with replicas syncing at random. Each
    # write then supersedes its writer's previous one, so at most one sibling per writer lives.
    replicas = {n: VersionSet() for n in NODES}
    ctx = [Context() for _ in range(writers)]
    for i, (client, coord, other) in enumerate(steps):
        client %= writers
        ctx[client] = ctx[client].merge(replicas[other].context)
        replicas[coord] = replicas[coord].put(f"{client}:{i}".encode(), ctx[client], coord)
        ctx[client] = replicas[coord].context
        replicas[other] = replicas[other].merge(replicas[coord])
        everything = replicas["a"].merge(replicas["b"]).merge(replicas["c"])
        assert len(everything) <= writers
        assert all(len(r) <= writers for r in replicas.values())


# -- encoding ---------------------------------------------------------------------------------


@QUICK
@given(version_sets())
def test_encoding_round_trips_and_is_compact(vs: VersionSet) -> None:
    data = vs.encode()
    assert VersionSet.decode(data) == vs
    assert VersionSet.from_wire(msgpack.unpackb(msgpack.packb(vs.to_wire()))) == vs
    assert Context.decode(vs.context.encode()) == vs.context


def test_one_version_encodes_in_a_few_bytes_beyond_the_value() -> None:
    vs = EMPTY.put(b"v" * 100, None, "node-a")
    assert len(vs.encode()) <= 100 + 20


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_decoding_garbage_raises_protocol_error(data: bytes) -> None:
    for cls in (VersionSet, Context):
        try:
            got = cls.decode(data)
        except ProtocolError:
            continue
        assert cls.decode(got.encode()) == got


@settings(max_examples=300, deadline=None)
@given(version_sets(), st.data())
def test_damaged_encodings_raise_protocol_error_or_decode_to_a_valid_set(
    vs: VersionSet, data: st.DataObject
) -> None:
    raw = bytearray(vs.encode())
    cut = data.draw(st.integers(0, len(raw)))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] = data.draw(st.integers(0, 255))
    for damaged in (bytes(raw), vs.encode()[:cut]):
        try:
            got = VersionSet.decode(damaged)
        except ProtocolError as e:
            assert isinstance(e, shmkv.Error)
            continue
        assert VersionSet.decode(got.encode()) == got


@pytest.mark.parametrize(
    "wire",
    [
        [1, [["a", 1]], [[0, 2, b"v"]]],  # sibling beyond the clock
        [1, [["a", 1]], [[1, 1, b"v"]]],  # node index out of range
        [1, [["b", 1], ["a", 1]], []],  # clock not sorted
        [1, [["a", 0]], []],  # zero counter
        [1, [["a", 1]], [[0, 1, "text"]]],  # str value
        [1, [["a", 2]], [[0, 2, b"v"], [0, 1, b"v"]]],  # siblings out of order
        [1, [["a", 1]], [[0, 1, b"v"], [0, 1, b"v"]]],  # duplicate sibling
        [2, [["a", 1]], []],  # a context's tag
        [1, [["a", True]], []],
        [1, {"a": 1}, []],
        [1, [["a", 1]]],
        [1, [["a", 1]], [[0, 1, b"v", 0]]],  # expiry below 1
        [1, [["a", 1]], [[0, 1, b"v", True]]],  # expiry not an int
        [1, [["a", 1]], [[0, 1, b"v", 1.5]]],
        [1, [["a", 1]], [[0, 1, b"v", 2**63]]],  # expiry past int64
        [1, [["a", 1]], [[0, 1, b"v", 9], [0, 1, b"v", 7]]],  # expiries out of order
        [1, [["a", 1]], [[0, 1, b"v", 7], [0, 1, b"v"]]],  # an expiry before no expiry
        [1, [["a", 1]], [[0, 1, b"v", 7, 8]]],  # five elements
    ],
)
def test_non_canonical_or_inconsistent_wire_forms_are_refused(wire: object) -> None:
    with pytest.raises(ProtocolError):
        VersionSet.decode(msgpack.packb(wire))


def test_deep_nesting_and_non_bytes_are_refused() -> None:
    with pytest.raises(ProtocolError):
        VersionSet.decode(b"\x91" * 100_000)
    with pytest.raises(ProtocolError):
        VersionSet.decode("not bytes")  # type: ignore[arg-type]


# -- expiry (TTLs) ------------------------------------------------------------------------------


def test_an_expiring_version_is_served_until_its_expiry_and_then_absent() -> None:
    a = EMPTY.put(b"v", None, "a", expires=1000)
    assert a.visible(999).values == [b"v"] and not a.visible(999).is_deleted
    gone = a.visible(1000)
    assert gone.values == [] and gone.is_deleted
    assert gone.context == a.context  # a write with what the reader saw supersedes it too
    assert a.values == [b"v"]  # the stored set keeps it (visible is a view for reads)


def test_an_expired_sibling_does_not_hide_a_concurrent_newer_write() -> None:
    at_a = EMPTY.put(b"short", None, "a", expires=1000)
    at_b = EMPTY.put(b"long", None, "b")  # concurrent, no expiry
    m = at_a.merge(at_b)
    assert sorted(m.visible(500).values) == [b"long", b"short"]
    assert m.visible(2000).values == [b"long"] and not m.visible(2000).is_deleted
    # and one with a later expiry outlives it
    later = at_a.merge(EMPTY.put(b"later", None, "c", expires=5000))
    assert later.visible(2000).values == [b"later"]


def test_an_expired_copy_merged_back_is_still_expired() -> None:
    # read repair / anti-entropy writes another replica's copy back: the expiry comes with it
    a = EMPTY.put(b"v", None, "a", expires=1000)
    b = EMPTY.merge(a)
    assert b.siblings == a.siblings and b.encode() == a.encode()
    assert b.visible(1000).values == [] and b.merge(a).visible(1000).is_deleted


def test_a_write_without_ttl_supersedes_an_expiring_one_and_clears_it() -> None:
    a = EMPTY.put(b"v", None, "a", expires=1000)
    a = a.put(b"w", a.context, "a")
    assert a.visible(10**12).values == [b"w"] and a.reclaim_at is None
    # and a write with a TTL over a plain one: the set is reclaimable from its latest expiry
    b = EMPTY.put(b"v", None, "a").put(b"w", None, "a", expires=7)
    assert b.reclaim_at == 7


def test_reclaim_at_is_the_latest_expiry_only_when_every_sibling_expires() -> None:
    s1 = EMPTY.put(b"x", None, "a", expires=10)
    s2 = EMPTY.put(b"y", None, "b", expires=20)
    assert s1.merge(s2).reclaim_at == 20
    assert s1.merge(EMPTY.put(b"z", None, "c")).reclaim_at is None
    assert s1.merge(EMPTY.delete(None, "c")).reclaim_at is None  # a tombstone: anti-entropy's
    assert EMPTY.reclaim_at is None


def test_sets_without_expiry_encode_exactly_as_before_ttls() -> None:
    # stored and on-the-wire sets of older nodes: the three-element sibling form, unchanged
    vs = EMPTY.put(b"v", None, "a").merge(EMPTY.delete(None, "b"))
    assert msgpack.unpackb(vs.encode()) == [1, [["a", 1], ["b", 1]], [[0, 1, b"v"], [1, 1, None]]]
    old = msgpack.packb([1, [["a", 2]], [[0, 2, b"v"]]], use_bin_type=True)
    assert VersionSet.decode(old).encode() == old
    x = EMPTY.put(b"v", None, "a", expires=123)
    assert msgpack.unpackb(x.encode()) == [1, [["a", 1]], [[0, 1, b"v", 123]]]


def test_bad_expiries_are_refused() -> None:
    for bad in (0, -1, True, 1.5, "1", 2**63):
        with pytest.raises(shmkv.InvalidArgument, match="expiry"):
            EMPTY.put(b"v", None, "a", expires=bad)  # type: ignore[arg-type]


@QUICK
@given(version_sets(), version_sets(), st.sampled_from([0, 5, 7, 10, 11]))
def test_reads_at_any_time_agree_with_merging_first(a: VersionSet, b: VersionSet, now: int) -> None:
    # what is served never depends on where the merge happened, and never serves an expired one
    m = a.merge(b)
    assert m.visible(now) == b.merge(a).visible(now)
    assert all(s.expires is None or s.expires > now for s in m.visible(now).siblings)
    # every unexpired sibling of the merge is served
    assert {s for s in m.siblings if not s.expired(now)} == set(m.visible(now).siblings)
