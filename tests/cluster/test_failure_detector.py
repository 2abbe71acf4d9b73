"""The phi-accrual detector, fed heartbeats and times by hand (failure_detector.py is pure)."""

from __future__ import annotations

import random

import pytest

from shmkv.cluster.failure_detector import (
    DOWN,
    SUSPECTED,
    THRESHOLD,
    UP,
    PhiAccrual,
    phi_of,
    silence_at,
)


def beating(d: PhiAccrual, peer: str, start: float, end: float, every: float = 1.0) -> float:
    t = start
    while t <= end:
        d.tick(t)
        d.heartbeat(peer, t)
        t += every
    return t - every


def test_a_regular_peer_is_up_and_a_silent_one_goes_down_within_five_seconds() -> None:
    d = PhiAccrual()
    d.add("b", 0.0)
    last = beating(d, "b", 0.0, 60.0)
    assert d.state("b", last + 0.9) == UP
    t = last
    while d.state("b", t) != DOWN:
        t += 0.1
        d.tick(t)
    # Invariant checked: conviction by the documented threshold, well inside 5 s of the last beat.
    assert t - last < 4.0
    assert d.phi("b", t) >= THRESHOLD


def test_a_peer_goes_through_suspect_before_down_and_one_heartbeat_brings_it_back() -> None:
    d = PhiAccrual()
    d.add("b", 0.0)
    last = beating(d, "b", 0.0, 30.0)
    states = []
    t = last
    for _ in range(50):
        t += 0.1
        d.tick(t)
        states.append(d.state("b", t))
    assert SUSPECTED in states and states[-1] == DOWN
    assert states.index(SUSPECTED) < states.index(DOWN)
    d.heartbeat("b", t)
    assert d.state("b", t) == UP


def test_one_lost_heartbeat_is_not_a_failure() -> None:
    d = PhiAccrual()
    d.add("b", 0.0)
    last = beating(d, "b", 0.0, 30.0)
    for k in range(1, 21):  # a 2 s gap (one beat lost), checked every 0.1 s
        d.tick(last + k * 0.1)
        assert d.state("b", last + k * 0.1) != DOWN


def test_the_end_of_an_outage_is_not_recorded_as_a_normal_interval() -> None:
    d = PhiAccrual()
    d.add("b", 0.0)
    last = beating(d, "b", 0.0, 30.0)
    back = last + 60.0
    beating(d, "b", back, back + 10.0)
    # With the 60 s gap in the window the mean would be ~6 s and the next silence would go
    # unnoticed for half a minute; without it, detection is as fast as before.
    t = back + 10.0
    while d.state("b", t) != DOWN:
        t += 0.1
        d.tick(t)
    assert t - (back + 10.0) < 4.0


def test_a_pause_of_this_node_convicts_nobody() -> None:
    d = PhiAccrual()
    for p in ("b", "c"):
        d.add(p, 0.0)
    t = 0.0
    while t < 30.0:
        d.tick(t)
        d.heartbeat("b", t)
        d.heartbeat("c", t)
        t += 1.0
    woke = t + 20.0  # this node was SIGSTOPped for 20 s: nobody's heartbeat reached it
    assert d.down(woke) == set()  # before its first tick after waking, too
    assert d.tick(woke) is True
    assert d.down(woke) == set() and d.down(woke + 1.0) == set()
    t = woke
    while t < woke + 10.0:  # b beats again; c really is silent: convicted on the fresh window
        t += 0.5
        d.tick(t)
        if t % 1.0 == 0:
            d.heartbeat("b", t)
    assert d.down(t) == {"c"}


def test_phi_is_monotonic_in_the_silence() -> None:
    rng = random.Random(3)
    for _ in range(200):
        mean, std = rng.uniform(0.1, 5), rng.uniform(0.01, 2)
        xs = sorted(rng.uniform(0, 20) for _ in range(20))
        phis = [phi_of(x, mean, std) for x in xs]
        assert phis == sorted(phis)


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(ValueError):
        PhiAccrual(threshold=2.0, suspect=4.0)


def test_is_down_is_exactly_phis_verdict_at_every_silence_and_next_to_the_crossing() -> None:
    # is_down compares the silence against phi's solved crossing; it must never disagree with
    # state(), whatever the window -- including a hair either side of the crossing itself.
    rng = random.Random(11)
    for trial in range(300):
        d = PhiAccrual(threshold=rng.choice([1.0, 4.0, 8.0, 12.0, 40.0]), suspect=1.0,
                       min_std=rng.choice([0.01, 0.25]), acceptable_pause=rng.choice([0.0, 0.5]))
        t = 0.0
        d.add("p", t)
        for _ in range(rng.randrange(0, 30)):
            t += rng.uniform(0.05, 3.0)
            d.heartbeat("p", t)
            d.tick(t)
        h = d._peers["p"]
        mean, std = h.mean_std()
        cross = silence_at(d.threshold, mean + d.acceptable_pause, max(std, d.min_std))
        probes = [rng.uniform(0, 3 * cross + 1) for _ in range(20)]
        probes += [cross + k * abs(cross) * 1e-15 for k in range(-8, 9)]
        probes += [cross - 1e-6, cross + 1e-6]
        for s in probes:
            if s < 0 or s > d.max_local_pause:
                continue  # past max_local_pause without a tick: stale, both say not down
            now = h.last + s
            assert d.is_down("p", now) == (d.state("p", now) == DOWN), (trial, s, cross)
        assert d.is_down("p", h.last + cross + 1e-3) or cross + 1e-3 > d.max_local_pause
        assert not d.is_down("p", h.last + cross - 1e-3)


def test_a_new_heartbeat_moves_the_crossing() -> None:
    d = PhiAccrual()
    d.add("p", 0.0)
    for i in range(1, 20):
        d.heartbeat("p", float(i))
        d.tick(float(i))
    assert not d.is_down("p", 19.5)
    d.tick(21.9)
    assert d.is_down("p", 21.9)  # 2.9 s of silence after 1 s heartbeats
    d.heartbeat("p", 21.9)
    assert not d.is_down("p", 21.9)
    assert not d.is_down("p", 22.5)
