"""The version-aware checkers catch each deliberate bug: a lost acknowledged write, a version
killed without a write that saw it, a resurrected delete, too many siblings, diverged replicas;
and they accept what a correct strict-quorum cluster does, contexts minted by the real
version algebra (builder.Replicas)."""

from __future__ import annotations

from shmkv.cluster.versions import VersionSet
from shmkv.torture.checkers import (
    check_convergence,
    check_lost_writes,
    check_siblings,
    check_superseded,
    merged_final,
)

from .builder import Builder, Replicas

NODES = ["a", "b", "c"]


def overwrite_chain() -> tuple[Builder, Replicas]:
    """p0 writes x1, reads it, writes x2 with the read's context; all on W=2 replicas."""
    b, rep = Builder(), Replicas(NODES)
    co = rep.put("k", "x1", None, "a", ["a", "b"])
    b.write("x1", (0, 1), co=co)
    vals, ctx = rep.read("k", ["b", "c"])
    b.read(vals, (2, 3), co=ctx)
    co = rep.put("k", "x2", ctx, "b", ["b", "c"])
    b.write("x2", (4, 5), ci=ctx, co=co)
    return b, rep


# -- lost writes ------------------------------------------------------------------------------


def test_overwritten_write_is_not_lost() -> None:
    b, rep = overwrite_chain()
    assert check_lost_writes(b.ops, rep.merged()).status == "pass"


def test_write_missing_from_the_final_state_is_lost() -> None:
    b, rep = overwrite_chain()
    # The replicas that took x2 lose it (memory-only restarts): only a's copy is left.
    final = {"k": rep.get("a", "k")}
    v = check_lost_writes(b.ops, final)
    assert v.status == "fail"
    (p,) = v.problems
    assert p.ops[0].value == "x2" and "not seen its context" in p.message


def test_version_killed_without_a_write_that_saw_it_is_lost() -> None:
    # Two concurrent writes become siblings; a buggy read repair keeps the clock but drops
    # one sibling, as if overwriting it with an older version.
    b, rep = Builder(), Replicas(NODES)
    c1 = rep.put("k", "x1", None, "a", ["a", "b"])
    c2 = rep.put("k", "y1", None, "c", ["c", "b"])
    b.write("x1", (0, 1), co=c1)
    b.write("y1", (0, 1), p=1, co=c2)
    good = rep.merged()["k"]
    assert sorted(good.values) == [b"x1", b"y1"]
    assert check_lost_writes(b.ops, {"k": good}).status == "pass"
    bad = VersionSet(good.clock, [s for s in good.siblings if s.value == b"x1"])
    v = check_lost_writes(b.ops, {"k": bad})
    assert v.status == "fail" and v.problems[0].ops[0].value == "y1"
    assert "no surviving write superseded it" in v.problems[0].message


def test_unknown_write_need_not_survive_but_may() -> None:
    b, rep = overwrite_chain()
    b.write("x3", (6, None), o="unknown", ci=b.ops[-1].ctx_out)
    assert check_lost_writes(b.ops, rep.merged()).status == "pass"  # never applied
    co = rep.put("k", "x3", b.ops[-2].ctx_out, "c", ["c"])
    assert co
    assert check_lost_writes(b.ops, rep.merged()).status == "pass"  # applied


def test_deleted_and_collected_key_keeps_nothing_but_loses_nothing() -> None:
    b, rep = overwrite_chain()
    vals, ctx = rep.read("k", ["b", "c"])
    b.read(vals, (6, 7), co=ctx)
    b.delete((8, 9), ci=ctx)
    assert check_lost_writes(b.ops, {}).status == "pass"  # tombstone collected
    b.write("late", (10, 11), co={"a": 9})  # acknowledged after the delete, never seen by it
    assert check_lost_writes(b.ops, {}).status == "fail"


def test_blind_write_of_unknown_outcome_makes_the_verdict_unknown_not_lost() -> None:
    b = Builder()
    b.write("x1", (0, 1))  # no contexts recorded at all
    b.write("x2", (2, None), o="unknown", p=1)
    final = Replicas(NODES)
    final.put("k", "x2", None, "a", ["a"])
    assert check_lost_writes(b.ops, final.merged()).status == "unknown"


# -- superseded values / deleted keys never return ---------------------------------------------


def delete_scenario() -> tuple[Builder, Replicas]:
    b, rep = overwrite_chain()
    vals, ctx = rep.read("k", ["a", "c"])
    b.read(vals, (6, 7), co=ctx)
    rep.put("k", None, ctx, "c", ["c", "a"])
    b.delete((8, 9), ci=ctx)
    return b, rep


def test_reads_after_a_delete_see_it() -> None:
    b, rep = delete_scenario()
    vals, ctx = rep.read("k", ["a", "b"])
    assert vals == [None]
    b.read(vals, (10, 11), co=ctx)
    assert check_superseded(b.ops, rep.merged()).status == "pass"


def test_resurrected_delete_is_caught_in_reads_and_in_the_final_state() -> None:
    b, rep = delete_scenario()
    b.read(["x2"], (10, 11), p=2)  # after the delete completed: x2 is back
    v = check_superseded(b.ops)
    assert v.status == "fail"
    (p,) = v.problems
    assert "deleted" in p.message and [o.f for o in p.ops] == ["write", "delete", "read"]
    # The final state holding x2 (a replica that missed the delete won a buggy merge).
    final = {"k": rep.get("b", "k")}
    assert check_superseded(b.ops[:-1], final).status == "fail"


def test_read_concurrent_with_the_delete_may_still_see_the_value() -> None:
    b, rep = delete_scenario()
    b.read(["x2"], (8.5, 10), p=2)  # began before the delete completed
    assert check_superseded(b.ops).status == "pass"


def test_concurrent_write_the_delete_did_not_see_survives_it() -> None:
    b, rep = delete_scenario()
    co = rep.put("k", "y", None, "b", ["b"])  # b never saw the delete: a sibling
    b.write("y", (7.5, 8.5), p=3, co=co)
    vals, ctx = rep.read("k", NODES)
    assert sorted(vals, key=str) == [None, "y"]
    b.read(vals, (12, 13), co=ctx)
    assert check_superseded(b.ops, rep.merged()).status == "pass"
    assert check_siblings(b.ops).status == "pass"


def test_overwritten_value_never_returns_either() -> None:
    b, rep = overwrite_chain()
    b.read(["x1"], (6, 7), p=2)
    v = check_superseded(b.ops)
    assert v.status == "fail" and "overwritten by 'x2'" in v.problems[0].message
    assert check_superseded(b.ops, strict=False).status == "pass"  # sloppy reads may lag


# -- siblings ---------------------------------------------------------------------------------


def test_siblings_bounded_by_writers() -> None:
    b, rep = Builder(), Replicas(NODES)
    for p, node in enumerate(NODES[:2]):
        co = rep.put("k", f"v{p}", None, node, [node])
        b.write(f"v{p}", (0, 1), p=p, co=co)
    vals, ctx = rep.read("k", NODES)
    b.read(vals, (2, 3), p=5, co=ctx)
    assert check_siblings(b.ops).status == "pass"
    b.read(["v0", "v1", "v2"], (4, 5), p=5)  # three siblings from two writers
    v = check_siblings(b.ops)
    assert v.status == "fail" and "3 siblings" in v.problems[0].message


def test_superseded_value_shown_as_a_sibling_is_caught() -> None:
    b, rep = overwrite_chain()
    b.write("z", (4, 5), p=1)
    b.read(["x1", "x2"], (6, 7), p=2)  # x2's write saw x1: they cannot be siblings
    v = check_siblings(b.ops)
    assert v.status == "fail" and "superseded" in v.problems[0].message


# -- convergence ------------------------------------------------------------------------------


def test_converged_replicas_pass_and_a_diverged_one_fails() -> None:
    rep = Replicas(NODES)
    rep.put("k", "x", None, "a", NODES)
    rep.put("j", "y", None, "b", ["a", "b"])
    final = rep.state
    assert check_convergence(final).status == "pass"  # j only on the nodes that hold it
    v = check_convergence(final, replicas=lambda key: NODES)
    assert v.status == "fail" and v.problems[0].key == "j"
    rep.put("k", "x2", None, "c", ["c"])
    v = check_convergence(rep.state)
    assert v.status == "fail" and "replicas disagree" in v.problems[0].message


def test_merged_final_is_the_join_of_the_replicas() -> None:
    rep = Replicas(NODES)
    rep.put("k", "x", None, "a", ["a"])
    rep.put("k", "y", None, "b", ["b"])
    assert sorted(merged_final(rep.state)["k"].values) == [b"x", b"y"]
