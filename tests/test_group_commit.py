"""Group commit of the tiered store in durability "fsync" (issue 8, "a paused process freezes
everyone"): no lock other writers need is held across the fsync, so a writer paused (SIGSTOP)
in its put never stops the other processes' puts, and writers SIGKILLed in the middle of group
commits lose nothing they acknowledged.

Every store here has ONE lock stripe: every key shares the stripe of the paused writer's key,
the worst case (with the default 1024 stripes the others stall only once they reach it).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time

import pytest
from checked_values import make_value

import shmkv
from shmkv.lsm import LSM, _accel
from shmkv.lsm import db as lsm_db
from shmkv.lsm import wal as lsm_wal
from shmkv.torture import soak

CTX = mp.get_context("fork")
DEADLINE_S = 30.0  # progress, not speed: a stalled writer would wait until the pause ends


def _attach(name, path):
    return shmkv.attach(name, size="4MiB", path=path, durability="fsync", lock_stripes=1)


def _stop_before_fsync() -> None:
    """In this process, stop (SIGSTOP) at the first fsync of a put, after its WAL append:
    before the WAL fdatasync (``WalFile.sync``), or before the commit that waits for it
    (``LSM.commit``), whichever the put path has. The pause that froze everyone: the writer
    had appended and was about to make its record durable."""
    armed = [True]

    def pause_first() -> None:
        if armed[0]:
            armed[0] = False
            os.kill(os.getpid(), signal.SIGSTOP)

    real_sync = lsm_wal.WalFile.sync

    def sync(self):  # type: ignore[no-untyped-def]
        pause_first()
        return real_sync(self)

    lsm_wal.WalFile.sync = sync  # type: ignore[method-assign]
    real_commit = getattr(lsm_db.LSM, "commit", None)
    if real_commit is not None:

        def commit(self, ticket):  # type: ignore[no-untyped-def]
            if ticket is not None:
                pause_first()
            return real_commit(self, ticket)

        lsm_db.LSM.commit = commit  # type: ignore[method-assign]


def _paused_writer(name, path, how, conn):
    kv = _attach(name, path)
    if how == "before-commit":
        _stop_before_fsync()
    else:  # "leader": stop after claiming the group's sync, before its fdatasync (C hook)
        _accel.stop_in_sync(1)
    kv.put("paused-key", b"from the paused writer")
    conn.send("acknowledged")
    conn.close()
    kv.close()
    os._exit(0)


def _other_writer(name, path, n, conn):
    kv = _attach(name, path)
    for i in range(n):
        kv.put(f"other-{i}", b"v%d" % i)
        conn.send(i)
    kv.close()
    os._exit(0)


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.01)
    raise AssertionError("the writer never reached its pause point")


@pytest.mark.multiprocess
@pytest.mark.parametrize("how", ["before-commit", "leader"])
def test_a_writer_paused_in_its_fsync_put_does_not_stop_the_others(name, tmp_path, how):
    path = tmp_path / "db"
    _attach(name, path).close()
    a_end, a_conn = CTX.Pipe(duplex=False)
    a = CTX.Process(target=_paused_writer, args=(name, path, how, a_conn))
    a.start()
    b = None
    try:
        _wait_stopped(a.pid)
        b_end, b_conn = CTX.Pipe(duplex=False)
        b = CTX.Process(target=_other_writer, args=(name, path, 20, b_conn))
        b.start()
        done = -1
        deadline = time.monotonic() + DEADLINE_S
        while done < 19 and b_end.poll(max(0.0, deadline - time.monotonic())):
            done = b_end.recv()
        assert done == 19, f"the other writer stalled after {done + 1} of 20 fsync puts"
        b.join(DEADLINE_S)
        assert b.exitcode == 0
        with open(f"/proc/{a.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "T"  # still paused throughout
        os.kill(a.pid, signal.SIGCONT)
        assert a_end.poll(DEADLINE_S), "the paused writer's put never returned after SIGCONT"
        assert a_end.recv() == "acknowledged"
        a.join(DEADLINE_S)
        assert a.exitcode == 0
    finally:
        for p in (a, b):
            if p is not None and p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(10)
    shmkv.unlink(name)  # memory gone: only what is on disk counts
    with _attach(name, path) as kv:
        assert kv.get("paused-key") == b"from the paused writer"
        for i in range(20):
            assert kv.get(f"other-{i}") == b"v%d" % i


def test_a_leader_paused_before_its_fdatasync_does_not_hold_up_a_later_record(name, tmp_path):
    """A leader paused after claiming its sync: a writer whose record came after the claim
    syncs at once, and its one fsync covers every record appended so far, the paused
    leader's too."""
    path = tmp_path / "db"
    _attach(name, path).close()
    a_end, a_conn = CTX.Pipe(duplex=False)
    a = CTX.Process(target=_paused_writer, args=(name, path, "leader", a_conn))
    a.start()
    try:
        _wait_stopped(a.pid)
        with LSM(path, durability="fsync", helper=False) as db:
            db.put(b"after-the-claim", b"x")
            (appended, _, synced), _ns = db._page.group_state()
            assert synced == appended  # everything written so far is durable
            assert db.stats()["wal_syncs"] == 1
        os.kill(a.pid, signal.SIGCONT)
        assert a_end.poll(DEADLINE_S) and a_end.recv() == "acknowledged"
        a.join(DEADLINE_S)
    finally:
        if a.is_alive():
            os.kill(a.pid, signal.SIGKILL)
            a.join(10)


def _committing_writer(name, path, wid, ackfile, round_no, stop_nth):
    kv = _attach(name, path)
    if stop_nth:
        _accel.stop_in_sync(stop_nth)  # a leader that will be SIGKILLed while paused
    rnd = random.Random(wid * 1000 + round_no)
    with open(ackfile, "a", buffering=1) as acks:
        seq = round_no * 1_000_000  # increasing across rounds: a newer write has a larger seq
        while True:
            seq += 1
            k = f"w{wid}-{rnd.randrange(300)}"
            # "try" before the call, the op after it returned: a write killed midway may
            # or may not land, one that returned must
            r = rnd.random()
            if r < 0.8:
                acks.write(f"try-put {k} {seq}\n")
                kv.put(k, make_value(wid, seq, rnd.choice((40, 400, 4000))))
                acks.write(f"put {k} {seq}\n")
            elif r < 0.9:
                acks.write(f"try-del {k} {seq}\n")
                kv.delete(k)
                acks.write(f"del {k} {seq}\n")
            else:
                acks.write(f"try-put {k} {seq}\n")
                kv.put_many({k: make_value(wid, seq, 100)})
                acks.write(f"put {k} {seq}\n")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_writers_killed_during_group_commits_lose_nothing_acknowledged(name, tmp_path):
    path = tmp_path / "db"
    _attach(name, path).close()
    rnd = random.Random(8)
    nw = 4
    acks = [tmp_path / f"acks{w}" for w in range(nw)]
    starts = 0  # writers started so far: each start's seqs are above every earlier one's
    for rounds in range(8):
        # one writer per round stops as a leader after claiming a sync, and dies there
        stopper = rnd.randrange(nw)
        writers = []
        for w in range(nw):
            starts += 1
            stop_nth = rnd.randrange(5, 40) if w == stopper else 0
            writers.append(
                CTX.Process(
                    target=_committing_writer, args=(name, path, w, acks[w], starts, stop_nth)
                )
            )
        for w in writers:
            w.start()
        t_end = time.monotonic() + rnd.uniform(0.8, 1.6)
        while time.monotonic() < t_end:  # random kills mid-flight, restarted at once
            time.sleep(rnd.uniform(0.05, 0.3))
            i = rnd.randrange(nw)
            if i != stopper:
                os.kill(writers[i].pid, signal.SIGKILL)
                writers[i].join(10)
                starts += 1
                writers[i] = CTX.Process(
                    target=_committing_writer, args=(name, path, i, acks[i], starts, 0)
                )
                writers[i].start()
        for w in writers:
            os.kill(w.pid, signal.SIGKILL)
        for w in writers:
            w.join(10)
        if rounds % 2 == 1:
            shmkv.unlink(name)  # a reboot: memory is gone, only the disk remains
    expect, attempts = soak.read_logs(acks)  # the soak tool's reading and checking (tools/soak.py)
    # memory survived the last round: it must agree with the disk, key by key
    with _attach(name, path) as kv, LSM(path, durability="fsync", helper=False) as disk:
        for k in set(expect) | set(attempts):
            assert kv.get(k) == disk.get(k.encode()), f"{k}: memory contradicts disk"
    shmkv.unlink(name)
    with _attach(name, path) as kv:
        got = soak.held_to(kv, expect, attempts)
    assert got.problems == []
    assert not got.lost, f"acknowledged writes lost: {got.lost[:5]}"
    assert not got.wrong, got.wrong[:5]
    assert got.acknowledged > 100
