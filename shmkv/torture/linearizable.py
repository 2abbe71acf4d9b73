"""Per-key linearizability: a Wing–Gong search with Lowe's cache, one key at a time.

The algorithm is the one Porcupine implements (Lowe, "Testing for linearizability", 2017;
Horn & Kroening, "Faster linearizability checking via P-compositionality", 2015), written here
for Python:

- *P-compositionality*: a history is linearizable iff each key's sub-history is (keys are
  independent objects), so every key is searched on its own, with its own time limit.
- The key's ops become a doubly linked list of call and return entries in time order (a call
  before a return at equal times: ops that touch are treated as concurrent, the lenient side).
  Walking from the head, a call entry whose op the model can apply in the current state is
  *linearized*: both its entries are lifted out of the list, the op is pushed on a stack with
  the state before it, and the walk restarts at the head. Reaching a return entry means the op
  it closes had to be linearized by now and was not: pop the last choice, put its entries back
  and try the next call after it. The list empties: linearizable; the stack empties at a return:
  not.
- The cache: the set of (linearized ops, state) pairs already explored. Two paths that
  linearized the same ops and reached the same state have the same future, so the second is
  cut. The linearized set is a Python int used as a bitset.
- An op whose outcome is unknown returns at +infinity (it may take effect at any later instant
  or never); an op that failed was never applied and is not in the search. When the walk reaches
  a return at +infinity, only unknown ops are left, and their steps are total (models.py), so
  the rest is linearizable by applying them in any order: the search stops there.
- Symmetry: two ops of unknown outcome with the same effect (``Model.blind``: two +1
  increments that timed out) are interchangeable, so only linearizations that apply them in
  invocation order are searched (one that applies the later one first can swap them: the
  earlier was already invoked at that point, and both may return at +infinity). Without this a
  counter with k timed-out increments has 2^k subsets to explore; with it, a count per delta.
- Time limit: the walk looks at the clock every 512 steps and answers ``unknown`` -- never a
  guess -- when the key's limit has passed.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable
from itertools import accumulate
from typing import Any

from .history import History, Op
from .models import COUNTER, Model, model_for
from .shrink import shrink
from .verdict import FAIL, UNKNOWN, Problem, Verdict, combine
from .wgl import search


def counter_bounds(ops: list[Op]) -> tuple[Op, int, int] | None:
    """A counter's necessary condition (Jepsen's counter checker), O(n log n): a value read at
    any instant of ``[invoke, complete]`` is at least the ok increments that completed before
    the read began plus every negative delta that may have applied, and at most that plus every
    positive one. Returns the first op whose value is outside its bounds, with the bounds."""
    incrs = [o for o in ops if o.f == "incr" and o.outcome != "fail"]
    by_invoke = sorted(incrs, key=lambda o: o.invoke)
    inv_t = [o.invoke for o in by_invoke]
    inv_pos = [0, *accumulate(max(o.value, 0) for o in by_invoke)]
    inv_neg = [0, *accumulate(min(o.value, 0) for o in by_invoke)]
    done = sorted((o for o in incrs if o.outcome == "ok"), key=lambda o: o.effective_end)
    done_t = [o.effective_end for o in done]
    done_sum = [0, *accumulate(o.value for o in done)]
    done_pos = [0, *accumulate(max(o.value, 0) for o in done)]
    done_neg = [0, *accumulate(min(o.value, 0) for o in done)]
    x: Any
    for o in ops:
        if o.outcome != "ok":
            continue
        if o.f == "read":
            x = o.read_values[0]
            x = 0 if x is None else x
        elif o.f == "incr" and o.result is not None:
            x = o.result
        else:
            continue
        d = bisect.bisect_left(done_t, o.invoke)  # ok incrs completed before o began
        m = bisect.bisect_left(inv_t, o.effective_end)  # incrs invoked before o ended
        low = done_sum[d] + (inv_neg[m] - done_neg[d])
        high = done_sum[d] + (inv_pos[m] - done_pos[d])
        if o.f == "incr":  # its own delta is in the invoked-before sums, and certainly applied
            low += max(o.value, 0)
            high += min(o.value, 0)
        if not low <= x <= high:
            return o, low, high
    return None


def check_key(
    ops: list[Op], model: Model | None = None, time_limit: float = 10.0
) -> str:
    """One key's verdict (its ops in any order; failed ops and unknown reads are ignored)."""
    model = model or model_for(ops)
    prepared = model.prepare(sorted(ops, key=lambda o: (o.invoke, o.id)))
    return search(prepared, model, time.monotonic() + time_limit)


def check(
    history: History | Iterable[Op],
    *,
    time_limit: float = 10.0,
    shrink_budget: float = 10.0,
    max_reported: int = 5,
    counters: bool = True,
) -> Verdict:
    """Linearizability of every key (register or counter by its ops), ``time_limit`` seconds of
    search per key. A key that fails is shrunk (shrink.py, ``shrink_budget`` seconds each, for
    the first ``max_reported`` failing keys) to a small sub-history that still fails.
    ``counters=False`` leaves counter keys out (the cluster's counters are CRDTs, whose
    increment-and-get is not linearizable: :func:`check_counters` is their checker).

    Meaningful for the strict configuration (R + W > N, hints not counted): a sloppy quorum may
    legitimately answer from replicas that missed an acknowledged write.
    """
    ops = history.ops if isinstance(history, History) else list(history)
    per_key: dict[str, list[Op]] = {}
    for o in ops:
        per_key.setdefault(o.key, []).append(o)
    problems: list[Problem] = []
    unknown: list[str] = []
    failed_keys = 0
    started = time.monotonic()
    for key in sorted(per_key):
        key_ops = per_key[key]
        model = model_for(key_ops)
        if model is COUNTER and not counters:
            continue
        prepared = model.prepare(sorted(key_ops, key=lambda o: (o.invoke, o.id)))
        status = search(prepared, model, time.monotonic() + time_limit)
        if status == UNKNOWN and model is COUNTER:
            bad = counter_bounds(prepared)
            if bad is not None:
                o, low, high = bad
                failed_keys += 1
                problems.append(
                    Problem(
                        f"key {key!r}: counter value {o.read_values[0] if o.f == 'read' else o.result!r} "
                        f"outside [{low}, {high}], the sums of the increments that had / may have "
                        f"applied (the full search timed out after {time_limit:g} s)",
                        key=key, ops=[o], shrunk=False,
                    )
                )
                continue
        if status == UNKNOWN:
            unknown.append(f"key {key!r}: search of {len(prepared)} ops exceeded {time_limit:g} s")
        elif status == FAIL:
            failed_keys += 1
            if len(problems) < max_reported:
                small, complete = shrink(prepared, model, budget=shrink_budget)
                problems.append(
                    Problem(
                        f"key {key!r} is not linearizable as a {model.name} "
                        f"({len(small)} of its {len(prepared)} ops show it)",
                        key=key,
                        ops=small,
                        shrunk=complete,
                    )
                )
    return combine(
        "linearizable",
        problems,
        unknown,
        keys=len(per_key),
        failed_keys=failed_keys,
        seconds=round(time.monotonic() - started, 3),
    )


def check_counters(history: History | Iterable[Op]) -> Verdict:
    """The property a CRDT counter keeps (Jepsen's counter checker, :func:`counter_bounds`):
    every value it answers -- a read, or an increment's result -- counts every acknowledged
    increment that completed before the request began, and nothing that had not been invoked
    before it ended. With an ending read after every fault healed, that is "no acknowledged
    increment lost, none counted twice".

    Why not linearizability. The cluster's ``incr`` adds to the coordinator's entry of a
    PN-counter and answers the merge of the W states that acknowledged. Two concurrent
    increments through different coordinators can each merge a replica that already holds the
    other's entry, so both answer the sum of both (seen in CI: 341, then +1 and +2 both
    answered 344) -- no sequential order gives two increments the same result. A linearizable
    increment-and-get needs one serialization point per key (a leader or a consensus round per
    increment), which is what a CRDT counter exists to avoid (Riak's and Cassandra's counters
    make the same choice)."""
    ops = history.ops if isinstance(history, History) else list(history)
    per_key: dict[str, list[Op]] = {}
    for o in ops:
        per_key.setdefault(o.key, []).append(o)
    problems: list[Problem] = []
    keys = 0
    for key in sorted(per_key):
        key_ops = per_key[key]
        if model_for(key_ops) is not COUNTER:
            continue
        keys += 1
        bad = counter_bounds(COUNTER.prepare(sorted(key_ops, key=lambda o: (o.invoke, o.id))))
        if bad is not None:
            o, low, high = bad
            value = o.read_values[0] if o.f == "read" else o.result
            problems.append(
                Problem(
                    f"key {key!r}: counter value {value!r} outside [{low}, {high}], the sums of "
                    "the increments that had / may have applied",
                    key=key, ops=[o], shrunk=False,
                )
            )
    return combine("counters", problems, [], keys=keys)
