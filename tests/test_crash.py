"""A SIGKILLed worker never wedges the store.

Deterministic part: a child is SIGKILLed by the store itself at each named crash point
(SHMKV_CRASH_POINTS in ext/core/core.h: inside each lock, between each step of a put, mid-eviction,
mid page move, mid page cut). Random part: writers are SIGKILLed at random instants, many
times, while a survivor keeps working. Each time, the other processes carry on within a
second, verify() is clean, no acknowledged write of a surviving process is lost, and every
value read is one some process wrote whole.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time

import pytest
from checked_values import check_value, make_value

import shmkv

pytestmark = pytest.mark.multiprocess
CTX = mp.get_context("fork")


def _die_at(name, point, action):
    kv = shmkv.attach(name)
    kv._set_crash_point(point)
    action(kv)
    os._exit(3)  # the crash point was not reached


def run_and_expect_kill(name, point, action):
    p = CTX.Process(target=_die_at, args=(name, point, action))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL, f"crash point {point} not reached (exit {p.exitcode})"


def _survivor_ops(name, q):
    """Runs in a fresh process: every op must finish, fast, after the crash."""
    kv = shmkv.attach(name)
    t0 = time.monotonic()
    for i in range(300):
        kv.put(f"after{i}", make_value(9, i, 100))
        assert kv.get(f"after{i}") == make_value(9, i, 100)
    kv.get("target")
    kv.put("target", make_value(9, 999, 64))
    kv.delete("gone")
    q.put(time.monotonic() - t0)
    kv.close()


def check_survivable(name):
    q = CTX.Queue()
    p = CTX.Process(target=_survivor_ops, args=(name, q))
    p.start()
    elapsed = q.get(timeout=10)  # a hang fails here, not in CI's global timeout
    p.join(10)
    assert p.exitcode == 0
    assert elapsed < 1.0, f"operations after the crash took {elapsed:.2f} s"


def put_target(kv):
    kv.put("target", make_value(1, 1, 500))


def put_many_new(kv):
    for i in range(10_000):
        kv.put(f"new{i}", make_value(1, i, 100))


def put_new_size(kv):
    kv.put("target", make_value(1, 2, 20_000))


def overwrite_thrice(kv):
    # 100 B values: a class of 1,000+ chunks, which keeps replaced chunks (ext/core/slab.c
    # KEEP_MIN_CHUNKS). The second put keeps the first's chunk; the third takes it.
    for i in range(3):
        kv.put("fresh", make_value(1, i, 100))


def delete_gone(kv):
    kv.delete("gone")


# point (a name of SHMKV_CRASH_POINTS) -> (store size, what the parent does first, what the child does)
SCENARIOS = {
    "ALLOC_TAKEN": ("16MiB", None, put_target),  # class lock held, chunk on no list
    "PUT_INFLIGHT": ("16MiB", None, put_target),  # stripe held, chunk in flight
    "PUT_HALF_WRITTEN": ("16MiB", None, put_target),  # item half written
    "PUT_PUBLISHED": ("16MiB", None, put_target),  # published, old version not yet unlinked
    "EVICT_UNLINK": ("4MiB", "fill", put_many_new),  # mid-eviction: class + victim stripe held
    "PAGE_MOVING": ("4MiB", "fill", put_new_size),  # mid page move: page lock + two class locks
    "REMOVE_UNLINKED": ("16MiB", None, delete_gone),  # unlinked, not yet freed
    "PAGE_HALF_CUT": ("16MiB", None, put_new_size),  # mid page cut
    "KEPT_TAKEN": ("16MiB", None, overwrite_thrice),  # kept chunk named twice by the slot
    "KEEP_NAMED": ("16MiB", None, overwrite_thrice),  # replaced version kept, still LINKED
}


@pytest.mark.parametrize("point", list(SCENARIOS))
def test_killed_at_crash_point_leaves_store_usable(name, point):
    size, setup, action = SCENARIOS[point]
    kv = shmkv.attach(name, size=size)
    acked = {}
    kv.put("target", make_value(0, 0, 300))
    kv.put("gone", b"x")
    if setup == "fill":
        i = 0
        while kv.stats()["evictions"] == 0:
            kv.put(f"fill{i}", make_value(0, i, 100))
            i += 1
    else:
        for i in range(500):
            acked[f"acked{i}"] = make_value(0, i, 200)
            kv.put(f"acked{i}", acked[f"acked{i}"])
    run_and_expect_kill(name, point, action)

    check_survivable(name)
    assert kv.verify() == []
    for k, v in acked.items():
        assert kv.get(k) == v, f"acknowledged {k} lost"
    for _k, v in kv.items():
        if not _k.startswith(b"gone"):
            check_value(v)
    assert kv.verify() == []
    s = kv.stats()
    assert s["repairs"] + s["reclaimed"] >= 1 or point in ("PUT_HALF_WRITTEN", "PUT_PUBLISHED", "REMOVE_UNLINKED")
    # nothing the dead process held stays taken: every chunk in use is a reachable item
    assert sum(c["used"] for c in s["classes"]) == len(list(kv.keys()))
    kv.close()


def _chaos_writer(name, wid, seed):
    rnd = random.Random(seed)
    kv = shmkv.attach(name)
    seq = 0
    while True:
        seq += 1
        k = f"shared{rnd.randrange(300)}"
        r = rnd.random()
        if r < 0.6:
            kv.put(k, make_value(wid, seq, rnd.choice((20, 200, 2000, 9000))))
        elif r < 0.7:
            kv.delete(k)
        elif r < 0.8:
            kv.incr(f"counter{rnd.randrange(5)}")
        elif r < 0.9:
            kv.put_many({f"shared{rnd.randrange(300)}": make_value(wid, seq, 64) for _ in range(5)})
        else:
            v = kv.get(k)
            if v is not None:
                check_value(v)


def _survivor(name, stop, q):
    kv = shmkv.attach(name)
    worst = 0.0
    i = 0
    while not stop.is_set():
        t0 = time.monotonic()
        kv.put(f"survivor{i % SURVIVOR_KEYS}", make_value(7, i, 300))
        v = kv.get(f"shared{i % 300}")
        worst = max(worst, time.monotonic() - t0)
        if v is not None:
            check_value(v)
        i += 1
    q.put((i, worst))
    kv.close()


SURVIVOR_KEYS = 5000


@pytest.mark.slow
def test_random_sigkills_of_writers_lose_nothing_acknowledged(name):
    kv = shmkv.attach(name, size="64MiB")
    stop = CTX.Event()
    q = CTX.Queue()
    survivor = CTX.Process(target=_survivor, args=(name, stop, q))
    survivor.start()
    rnd = random.Random(1234)
    writers = [CTX.Process(target=_chaos_writer, args=(name, w, w)) for w in range(3)]
    for w in writers:
        w.start()
    kills = 0
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and kills < 150:
        time.sleep(rnd.uniform(0.002, 0.06))
        i = rnd.randrange(len(writers))
        os.kill(writers[i].pid, signal.SIGKILL)
        writers[i].join(10)
        kills += 1
        writers[i] = CTX.Process(target=_chaos_writer, args=(name, 10 + kills, 10 + kills))
        writers[i].start()
    for w in writers:
        os.kill(w.pid, signal.SIGKILL)
        w.join(10)
    stop.set()
    written, worst = q.get(timeout=30)
    survivor.join(10)
    assert survivor.exitcode == 0
    assert worst < 1.0, f"the survivor waited {worst:.2f} s for one operation"
    assert kv.verify() == []
    assert kv.stats()["evictions"] == 0  # so a missing key can only mean a lost write
    for i in range(max(0, written - SURVIVOR_KEYS), written):
        k = f"survivor{i % SURVIVOR_KEYS}"
        assert kv.get(k) == make_value(7, i, 300), f"acknowledged write {i} to {k} lost"
    for k, v in kv.items():
        if k.startswith(b"counter"):
            int(v)
        else:
            check_value(v)
    assert kv.verify() == []
    print(f"{kills} kills, {written} survivor writes, stats: repairs={kv.stats()['repairs']} "
          f"reclaimed={kv.stats()['reclaimed']}")
    kv.close()


def test_crash_points_are_named_once_in_core_h(kv):
    # SHMKV_CRASH_POINTS in ext/core/core.h, seen from Python: every scenario above names one,
    # and a misspelt name is refused instead of silently never firing.
    from shmkv._ext import _core

    assert set(SCENARIOS) <= set(_core.CRASH_POINTS)
    assert {"VERIFY_STRIPE", "VERIFY_CLASS", "VERIFY_PAGE_LOCK"} <= set(_core.CRASH_POINTS)
    assert len(set(_core.CRASH_POINTS.values())) == len(_core.CRASH_POINTS)
    with pytest.raises(shmkv.InvalidArgument, match="PUT_PUBLISHED"):
        kv._set_crash_point("PUT_PUBLISHD")
    kv._set_crash_point(None)
    kv.put("k", b"v")  # no crash point armed
    assert kv["k"] == b"v"


def _overwrite_and_vanish(name):
    kv = shmkv.attach(name)
    overwrite_thrice(kv)  # leaves the slot keeping the second put's replaced chunk
    os._exit(0)  # no close(): the kept chunk is named only by the dead slot


def _attach_and_count(name, q):
    kv = shmkv.attach(name)  # takes the dead process's slot, reclaiming what it named
    q.put(sum(c["used"] for c in kv.stats()["classes"]))
    kv.close()


def test_a_dead_process_kept_chunk_goes_back_without_verify(name):
    kv = shmkv.attach(name, size="16MiB")
    for i in range(500):
        kv.put(f"acked{i}", make_value(0, i, 100))
    p = CTX.Process(target=_overwrite_and_vanish, args=(name,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    used = sum(c["used"] for c in kv.stats()["classes"])
    assert used == 502  # 500 + "fresh" + the chunk the dead process kept
    q = CTX.Queue()
    p = CTX.Process(target=_attach_and_count, args=(name, q))
    p.start()
    assert q.get(timeout=10) == 501
    p.join(10)
    assert kv.verify() == []
    kv.close()
