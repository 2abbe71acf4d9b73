"""Quorum tallies: when a request succeeds, how it fails, and who needs read repair.

Each scenario is one request to the replicas a, b, c (N=3), the replies named in the order they
arrive; the coordinator answers the client when the state leaves "pending".
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmkv
from shmkv.cluster.crdt import PNCounter
from shmkv.cluster.errors import ConfigError, MaybeApplied, QuorumError
from shmkv.cluster.quorum import ReadTally, WriteTally
from shmkv.cluster.versions import VersionSet

ABC = ["a", "b", "c"]
REFUSED = "connection refused"


# -- writes -----------------------------------------------------------------------------------


def test_a_write_succeeds_at_the_wth_ack_and_later_acks_are_recorded() -> None:
    t = WriteTally(3, 2, ABC)
    assert t.ack("a") == "pending"
    assert t.ack("c") == "ok"
    assert t.ack("b") == "ok" and t.acked == ("a", "c", "b") and t.done
    assert t.error() is None


def test_a_write_no_replica_could_be_reached_is_a_plain_quorum_error() -> None:
    t = WriteTally(3, 2, ABC)
    t.fail("a", REFUSED)
    assert t.fail("b", REFUSED) == "failed"  # decided: c alone cannot make W=2
    err = t.error()
    assert type(err) is QuorumError and isinstance(err, shmkv.Error)
    assert str(err) == (
        "write not applied: 0 of 3 replicas acknowledged, W=2 needed "
        "(a: connection refused; b: connection refused)"
    )
    assert (err.needed, err.answered, err.n) == (2, 0, 3)


def test_a_write_that_reached_some_replicas_may_have_been_applied() -> None:
    t = WriteTally(3, 2, ABC)
    t.ack("a")
    t.fail("b", REFUSED)
    assert t.timeout() == "failed"
    err = t.error()
    assert isinstance(err, MaybeApplied) and isinstance(err, QuorumError)
    assert "may have been applied" in str(err)
    assert "1 of 3 replicas acknowledged, W=2 needed" in str(err)
    assert "c: timed out" in str(err)


def test_a_write_whose_requests_all_timed_out_may_have_been_applied() -> None:
    # No ack, but the requests were sent: a replica may have written and lost only its reply.
    t = WriteTally(3, 1, ABC)
    assert t.timeout() == "failed"
    assert isinstance(t.error(), MaybeApplied)


def test_a_failure_reported_as_maybe_reached_makes_it_maybe_applied() -> None:
    t = WriteTally(3, 3, ABC)
    assert t.fail("a", "connection reset after send", maybe_reached=True) == "failed"
    assert isinstance(t.error(), MaybeApplied)


def test_too_few_reachable_replicas_fail_before_anything_is_sent() -> None:
    t = WriteTally(3, 2, ["a"])  # b and c down, no fallback up
    assert t.state == "failed"
    err = t.error()
    assert type(err) is QuorumError
    assert (
        "0 of 3 replicas acknowledged, W=2 needed (2 of N=3 replicas had no reachable target)"
        in str(err)
    )


def test_the_first_decision_is_final_but_late_acks_are_recorded() -> None:
    t = WriteTally(3, 2, ABC)
    t.ack("a")
    t.timeout()
    assert t.ack("b") == "failed"
    assert t.acked == ("a", "b") and "b" not in t.failed


def test_repeated_acks_count_once() -> None:
    t = WriteTally(3, 2, ABC)
    t.ack("a")
    assert t.ack("a") == "pending" and t.acked == ("a",)


def test_a_failure_after_an_ack_does_not_undo_it() -> None:
    t = WriteTally(3, 1, ABC)
    t.ack("a")
    t.fail("a", "late error")
    assert t.acked == ("a",) and t.failed == {}


@pytest.mark.parametrize(
    ("n", "k", "match"),
    [
        (3, 4, r"W=4 > N=3"),
        (3, 0, r"W must be an int >= 1"),
        (0, 1, r"N must be"),
        (2, True, "W must"),
    ],
)
def test_bad_quorum_sizes_are_clear_errors(n: int, k: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        WriteTally(n, k, [])


def test_read_quorum_larger_than_n_is_a_clear_error() -> None:
    with pytest.raises(shmkv.InvalidArgument, match=r"R=3 > N=2"):
        ReadTally(2, 3, ["a", "b"])


def test_bad_targets_and_strangers_are_refused() -> None:
    with pytest.raises(ConfigError, match="distinct"):
        WriteTally(3, 2, ["a", "a"])
    with pytest.raises(ConfigError, match="4 replica targets for N=3"):
        WriteTally(3, 2, ["a", "b", "c", "d"])
    with pytest.raises(ConfigError, match="'z' is not a target"):
        WriteTally(3, 2, ABC).ack("z")


# -- reads ------------------------------------------------------------------------------------

OLD = VersionSet().put(b"old", None, "a")
NEW = OLD.put(b"new", OLD.context, "a")
OTHER = VersionSet().put(b"other", None, "b")


def test_a_read_returns_the_merge_and_names_the_stale_replicas() -> None:
    t: ReadTally[VersionSet] = ReadTally(3, 2, ABC)
    assert t.answer("a", OLD) == "pending"
    assert t.answer("b", NEW) == "ok"
    assert t.result() == NEW and t.stale() == ["a"]
    # The coordinator may wait for the last replica before repairing: it is judged too.
    t.answer("c", None)
    assert t.stale() == ["a", "c"]


def test_concurrent_answers_merge_into_siblings_and_every_replica_is_stale() -> None:
    t: ReadTally[VersionSet] = ReadTally(3, 2, ABC)
    t.answer("a", NEW)
    t.answer("b", OTHER)
    result = t.result()
    assert result is not None and sorted(result.values) == [b"new", b"other"]
    assert t.stale() == ["a", "b"]


def test_a_key_no_replica_has_reads_as_none_and_nobody_is_stale() -> None:
    t: ReadTally[VersionSet] = ReadTally(3, 2, ABC)
    t.answer("a", None)
    t.answer("b", None)
    assert t.result() is None and t.stale() == []


def test_a_read_with_too_few_answers_says_how_many_answered() -> None:
    t: ReadTally[VersionSet] = ReadTally(3, 2, ABC)
    t.answer("a", OLD)
    t.fail("b", REFUSED)
    assert t.timeout() == "failed"
    with pytest.raises(
        QuorumError, match=r"read quorum not met: 1 of 3 replicas answered, R=2 needed"
    ) as e:
        t.result()
    assert not isinstance(e.value, MaybeApplied)


def test_result_before_the_quorum_is_reached_raises() -> None:
    t: ReadTally[VersionSet] = ReadTally(3, 2, ABC)
    t.answer("a", OLD)
    with pytest.raises(QuorumError, match="not reached yet"):
        t.result()


def test_counters_read_through_the_same_tally() -> None:
    t: ReadTally[PNCounter] = ReadTally(3, 3, ABC)
    t.answer("a", PNCounter().increment("a", 2))
    t.answer("b", PNCounter().increment("b", 3))
    t.answer("c", None)
    result = t.result()
    assert result is not None and result.value == 5
    assert t.stale() == ["a", "b", "c"]


# -- against a model --------------------------------------------------------------------------

events = st.lists(
    st.tuples(st.sampled_from(["reply", "refused", "lost", "timeout"]), st.sampled_from(ABC)),
    max_size=8,
)


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 3), st.integers(0, 3), events)
def test_write_tally_decides_like_a_simple_model(
    w: int, down: int, steps: list[tuple[str, str]]
) -> None:
    targets = ABC[down:]
    t = WriteTally(3, w, targets)
    acked: set[str] = set()
    failed: dict[str, bool] = {}  # node -> may have been reached
    decided: str | None = "failed" if len(targets) < w else None
    for kind, node in steps:
        if node not in targets:
            continue
        if kind == "reply":
            t.ack(node)
            acked.add(node)
            failed.pop(node, None)
        elif kind == "timeout":
            t.timeout()
            for x in targets:
                if x not in acked and x not in failed:
                    failed[x] = True
        elif node not in acked and node not in failed:
            t.fail(node, kind, maybe_reached=kind == "lost")
            failed[node] = kind == "lost"
        outstanding = [x for x in targets if x not in acked and x not in failed]
        if decided is None:
            if len(acked) >= w:
                decided = "ok"
            elif kind == "timeout" or len(acked) + len(outstanding) < w:
                decided = "failed"
        assert t.state == (decided or "pending")
        assert set(t.acked) == acked and set(t.failed) == set(failed)
        assert set(t.outstanding) == set(outstanding)
        err = t.error()
        if decided != "failed":
            assert err is None
        else:
            maybe = bool(acked) or any(failed.values())
            assert isinstance(err, MaybeApplied) == maybe
            assert f"{len(acked)} of 3 replicas acknowledged, W={w} needed" in str(err)


# -- the errors users see ---------------------------------------------------------------------


def test_cluster_errors_are_shmkv_errors_exported_at_the_top() -> None:
    from shmkv.cluster import errors

    for name in ("ClusterError", "QuorumError", "MaybeApplied", "Conflict", "WrongEpoch"):
        assert getattr(shmkv, name) is getattr(errors, name)
        assert issubclass(getattr(errors, name), shmkv.Error)
    assert issubclass(errors.MaybeApplied, errors.QuorumError)
    assert issubclass(errors.ProtocolError, ValueError) and issubclass(
        errors.ConfigError, shmkv.InvalidArgument
    )
    c = errors.Conflict("2 siblings", values=[b"x", None], context=b"ctx")
    assert (c.values, c.context, str(c)) == ([b"x", None], b"ctx", "2 siblings")
    e = errors.WrongEpoch("routed with epoch 3, node has 4", expected=4, got=3)
    assert (e.expected, e.got) == (4, 3)
