"""verify() holds one lock at a time: a paused checker stalls only what needs that lock.

A `shmkv check` monitor stopped with SIGSTOP (or ^Z, or a debugger) inside verify() used to
freeze every process for as long as it stayed stopped: verify() held every lock at once.
Here the checker stops itself (a SIGSTOP crash point, see SHMKV_CRASH_POINTS in ext/core/core.h)
while it holds a stripe, a class lock or the page lock, and another process must finish a
bounded batch of gets and puts that need none of those; and a checker stopped at random
instants of many verify() runs never holds more than one lock.
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

# crash points in ext/core/verify.c (named in SHMKV_CRASH_POINTS, ext/core/core.h)
IN_STRIPE, IN_CLASS, IN_PAGE_LOCK = "VERIFY_STRIPE", "VERIFY_CLASS", "VERIFY_PAGE_LOCK"


def _checker(name, point, q):
    kv = shmkv.attach(name)
    if point:
        kv._set_crash_point(point, signal.SIGSTOP)
    q.put(kv.verify())
    kv.close()


def _looping_checker(name, runs, q):
    kv = shmkv.attach(name)
    for _ in range(runs):
        assert kv.verify() == []
    q.put("done")
    kv.close()


def _worker(name, keys, value_size, q):
    """The (op, key) pairs of `keys`, gets and puts, then one report: finishing at all is
    the point."""
    kv = shmkv.attach(name)
    for op, k in keys:
        if op == "put":
            kv.put(k, b"w" * value_size)
        else:
            kv.get(k)
    q.put(len(keys))
    kv.close()


def wait_stopped(pid):
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"checker did not stop (status {status:#x})"


def fill(kv, n=3000, value_size=100):
    for i in range(n):
        kv.put(f"k{i}", b"v" * value_size)


def run_paused_checker(name, point, worker_keys, value_size):
    """Stops a checker at `point`, then runs the worker to completion while it is stopped.
    Returns (locks the stopped checker held, worker's count, verify's result)."""
    kv = shmkv.attach(name)
    q, wq = CTX.Queue(), CTX.Queue()
    checker = CTX.Process(target=_checker, args=(name, point, q))
    checker.start()
    worker = None
    try:
        wait_stopped(checker.pid)
        held = kv._locks_held_by(checker.pid)
        worker = CTX.Process(target=_worker, args=(name, worker_keys, value_size, wq))
        worker.start()
        done = wq.get(timeout=20)  # under the old verify() the worker blocked here for good
    finally:
        os.kill(checker.pid, signal.SIGCONT)
        if worker is not None:
            worker.join(10)
            if worker.exitcode is None:
                worker.kill()
    problems = q.get(timeout=30)
    checker.join(10)
    assert checker.exitcode == 0 and worker.exitcode == 0
    kv.close()
    return held, done, problems


def test_checker_paused_holding_a_stripe_stalls_only_that_stripe(name):
    with shmkv.attach(name, size="16MiB") as kv:
        fill(kv)
        # every other stripe; the keys of the held one (stripe 0) would wait for it
        keys = [f"k{i}" for i in range(20_000) if kv._stripe_of(f"k{i}") != 0]
        assert len({kv._stripe_of(k) for k in keys}) == kv.stats()["lock_stripes"] - 1
        keys = [("put" if i % 2 else "get", k) for i, k in enumerate(keys)]  # puts replace
    held, done, problems = run_paused_checker(name, IN_STRIPE, keys, 100)
    assert held == 1
    assert done == len(keys)
    assert problems == []


def test_checker_paused_holding_a_class_lock_stalls_only_that_class(name):
    with shmkv.attach(name, size="16MiB") as kv:
        fill(kv)  # one class in use: the checker stops holding its lock
        # gets of every stripe (a get takes no class lock), and puts of new keys of another
        # size class (replacing a key would free its old version into the held class)
        keys = [("get", f"k{i}") for i in range(3000)] + [("put", f"n{i}") for i in range(3000)]
    held, done, problems = run_paused_checker(name, IN_CLASS, keys, 1000)
    assert held == 1
    assert done == len(keys)
    assert problems == []


def test_checker_paused_holding_the_page_lock_stalls_no_get_or_put(name):
    with shmkv.attach(name, size="16MiB") as kv:
        fill(kv)
        keys = [("put" if i % 2 else "get", f"k{i}") for i in range(3000)]
    held, done, problems = run_paused_checker(name, IN_PAGE_LOCK, keys, 100)
    assert held == 1
    assert done == len(keys)
    assert problems == []


def test_checker_stopped_at_random_instants_holds_at_most_one_lock(name):
    # A big store, verified over and over, stopped at 25 random instants: at each, count the
    # locks whose owner word names the checker. Stopping the world would show them all.
    rnd = random.Random(11)
    with shmkv.attach(name, size="64MiB") as kv:
        for i in range(50_000):
            kv.put(f"k{i}", b"v" * (100 if i % 3 else 700))
        q = CTX.Queue()
        checker = CTX.Process(target=_looping_checker, args=(name, 10_000, q))
        checker.start()
        holding = []
        try:
            time.sleep(0.05)
            for _ in range(25):
                time.sleep(rnd.uniform(0.0, 0.02))
                os.kill(checker.pid, signal.SIGSTOP)
                wait_stopped(checker.pid)
                holding.append(kv._locks_held_by(checker.pid))
                os.kill(checker.pid, signal.SIGCONT)
        finally:
            checker.kill()
            checker.join(10)
        assert max(holding) <= 1, holding
        assert holding.count(1) >= 1, "no stop landed inside a lock: the test proved nothing"
        assert kv.verify() == []


def _blocked_get(name, key, q):
    kv = shmkv.attach(name)
    q.put("getting")
    q.put(kv.get(key))
    kv.close()


def test_a_paused_lock_holder_shows_in_lock_wait_stats(name):
    with shmkv.attach(name, size="16MiB") as kv:
        fill(kv, 5000)
        key = next(f"k{i}" for i in range(5000) if kv._stripe_of(f"k{i}") == 0)
        before = kv.stats()["lock_wait"]["stripe"]
        q, gq = CTX.Queue(), CTX.Queue()
        checker = CTX.Process(target=_checker, args=(name, IN_STRIPE, q))
        checker.start()
        getter = None
        try:
            wait_stopped(checker.pid)  # holding stripe 0
            getter = CTX.Process(target=_blocked_get, args=(name, key, gq))
            getter.start()
            assert gq.get(timeout=20) == "getting"
            time.sleep(0.5)  # the getter waits on the stopped checker's stripe meanwhile
        finally:
            os.kill(checker.pid, signal.SIGCONT)
        assert gq.get(timeout=20) == b"v" * 100
        assert q.get(timeout=30) == []
        checker.join(10)
        getter.join(10)
        after = kv.stats()["lock_wait"]["stripe"]
        assert after["waits"] >= before["waits"] + 1
        assert after["longest_ms"] >= 100  # it waited out most of the 0.5 s pause


def _crash_replace(name):
    kv = shmkv.attach(name)
    kv._set_crash_point("PUT_PUBLISHED")  # the new version published, the old one still LINKED
    kv.put("target", make_value(1, 1, 300))
    os._exit(3)


def test_linked_chunk_no_chain_reaches_is_reclaimed(name):
    # The writer dies between publishing the new version and unlinking the old: the old
    # chunk is LINKED but in no chain. Only verify() finds it (under its key's stripe).
    with shmkv.attach(name, size="16MiB") as kv:
        kv.put("target", make_value(0, 0, 300))
        p = CTX.Process(target=_crash_replace, args=(name,))
        p.start()
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        used = sum(c["used"] for c in kv.stats()["classes"])
        reclaimed = kv.stats()["reclaimed"]
        assert kv.verify() == []
        assert kv.stats()["reclaimed"] == reclaimed + 1
        assert sum(c["used"] for c in kv.stats()["classes"]) == used - 1
        assert kv.get("target") == make_value(1, 1, 300)
        assert kv.verify() == []


def _busy_writer(name, wid, stop, q):
    rnd = random.Random(wid)
    kv = shmkv.attach(name)
    seq = bad = 0
    while not stop.value:
        seq += 1
        k = f"s{rnd.randrange(20_000)}"
        r = rnd.random()
        try:
            if r < 0.5:
                kv.put(k, make_value(wid, seq, rnd.choice((20, 200, 2000, 9000))))
            elif r < 0.6:
                kv.delete(k)
            else:
                v = kv.get(k)
                if v is not None:
                    check_value(v)
        except AssertionError:
            bad += 1
    q.put((seq, bad))
    kv.close()


def test_verify_during_writes_reports_nothing_and_breaks_nothing(name):
    # The passes see the store at different instants while two writers put (four size
    # classes, evicting, pages moving), delete and read: no false report, no repair that
    # breaks a value, and every structure still sound when the writers stop.
    with shmkv.attach(name, size="8MiB") as kv:
        # a lock-free flag: a writer killed inside Event.is_set() would keep its lock
        stop, q = CTX.RawValue("b", 0), CTX.Queue()
        writers = [CTX.Process(target=_busy_writer, args=(name, w, stop, q)) for w in range(2)]
        for w in writers:
            w.start()
        runs = []
        try:
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                runs.append(kv.verify())
        finally:
            stop.value = 1
            results = [q.get(timeout=30) for _ in writers]
            for w in writers:
                w.join(10)
        assert all(w.exitcode == 0 for w in writers)
        assert [r for r in runs if r] == []
        assert len(runs) >= 3
        assert sum(bad for _, bad in results) == 0
        assert kv.stats()["evictions"] > 0
        assert kv.verify() == []
        for _, v in kv.items():
            check_value(v)


@pytest.mark.slow
def test_verify_between_random_sigkills_of_writers_stays_clean(name):
    # Writers are SIGKILLed at random instants (inside any lock, mid-put, mid-eviction) while
    # verify() runs over and over: lock takers repair what the dead held, verify reclaims
    # what they left, and neither ever reports a problem or breaks a value.
    rnd = random.Random(5)
    with shmkv.attach(name, size="8MiB") as kv:
        # a lock-free flag: a writer killed inside Event.is_set() would keep its lock
        stop, q = CTX.RawValue("b", 0), CTX.Queue()
        writers = [CTX.Process(target=_busy_writer, args=(name, w, stop, q)) for w in range(2)]
        for w in writers:
            w.start()
        runs, kills = [], 0
        try:
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline:
                runs.append(kv.verify())
                if rnd.random() < 0.5:
                    i = rnd.randrange(len(writers))
                    os.kill(writers[i].pid, signal.SIGKILL)
                    writers[i].join(10)
                    kills += 1
                    writers[i] = CTX.Process(target=_busy_writer, args=(name, 10 + kills, stop, q))
                    writers[i].start()
        finally:
            stop.value = 1
            results = [q.get(timeout=30) for _ in writers]
            for w in writers:
                w.join(10)
        assert [r for r in runs if r] == []
        assert kills >= 10
        assert sum(bad for _, bad in results) == 0
        assert kv.verify() == []
        for _, v in kv.items():
            check_value(v)
