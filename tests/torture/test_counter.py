"""The counter checker (linearizable.check_counters): the honest property of a PN-counter, not
linearizability.

The real coordinator's increments are *not* linearizable: two increments through two
coordinators at once can each merge the other's state before answering. That is shown here on
the shipped coordinator code over the simulated network, and the checker must accept it while
still catching lost, phantom and double-counted increments.
"""

from __future__ import annotations

import asyncio

from shmkv.cluster import wire
from shmkv.cluster.wire import Message
from shmkv.torture import linearizable as lin
from shmkv.torture.history import History
from shmkv.torture.report import check_history

from .builder import Builder


def _crossing() -> Builder:
    b = Builder()
    b.add("incr", v=1, r=2, t=(0, 1), p=0)  # via n1
    b.add("incr", v=1, r=2, t=(0, 1), p=1)  # via n2: each saw the other's +1
    b.add("read", r=2, t=(2, 3), p=2)
    return b


def test_crossing_increments_are_not_linearizable_but_within_bounds() -> None:
    b = _crossing()
    assert lin.check(b.ops).status == "fail"
    assert lin.check_counters(b.ops).status == "pass"
    verdicts, _ = check_history(History(ops=b.ops, meta={"n": 3, "w": 2, "r": 2}))
    assert {v.checker: v.status for v in verdicts}["counters"] == "pass"
    assert all(v.status == "pass" for v in verdicts), verdicts


def test_the_real_coordinator_answers_crossing_increments() -> None:
    from shmkv.torture.simulate import SimCluster

    both = 0
    for seed in range(12):
        c = SimCluster(seed)
        try:
            key = b"ctr"
            c1, c2, _ = c.ring.preference_list(key, 3)
            tasks = [
                c.net.spawn(c.client_transport.request(
                    c.addr[via], Message(wire.INCR, 0, {"key": key, "delta": 1, "epoch": 1}), 2.0))
                for via in (c1, c2)
            ]
            c.net.run(asyncio.gather(*tasks))
            both += [t.result().fields["value"] for t in tasks] == [2, 2]
        finally:
            c.close()
    assert both > 0  # some seed crosses: a fact of the design, which the checker must accept


def test_lost_phantom_and_double_counted_increments_are_caught() -> None:
    lost = Builder()
    lost.add("incr", v=1, r=1, t=(0, 1))
    lost.add("incr", v=5, r=6, t=(2, 3), p=1)
    lost.add("read", r=1, t=(4, 5), p=2)  # the acknowledged +5 is gone
    assert lin.check_counters(lost.ops).status == "fail"
    twice = Builder()
    twice.add("incr", v=2, r=2, t=(0, 1))
    twice.add("read", r=4, t=(2, 3), p=1)  # one +2, counted twice
    assert lin.check_counters(twice.ops).status == "fail"
    failed = Builder()
    failed.add("incr", v=3, t=(0, 1), o="fail")
    failed.add("read", r=3, t=(2, 3), p=1)  # a refused increment that applied
    assert lin.check_counters(failed.ops).status == "fail"
    maybe = Builder()
    maybe.add("incr", v=3, t=(0, None), o="unknown")
    maybe.add("read", r=3, t=(2, 3), p=1)
    maybe.add("read", r=0, t=(2, 3), p=2)
    assert lin.check_counters(maybe.ops).status == "pass"
