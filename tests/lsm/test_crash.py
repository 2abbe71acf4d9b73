"""Real SIGKILLs of real writer processes, at random moments and at chosen steps of an append,
a flush, a compaction and a manifest update. After every kill the store is reopened and must hold
every acknowledged write, return no acknowledged delete, and verify() clean.

The writer (workers.crash_writer) logs ``I op key`` before and ``A op key`` after each call, so
the parent knows what was acknowledged and what was in flight (either outcome is allowed for
those). Values are a function of the key, so every read is checked exactly.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

from shmkv.lsm import LSM

from .conftest import SMALL, WORKERS, worker_env
from .workers import value_for

pytestmark = pytest.mark.multiprocess


@dataclass
class Expect:
    """What the log of acknowledged operations says the store must contain."""

    present: set[bytes] = field(default_factory=set)
    absent: set[bytes] = field(default_factory=set)
    unknown: set[bytes] = field(default_factory=set)  # in flight when killed
    checked_present: set[bytes] = field(default_factory=set)  # as of the last check
    checked_absent: set[bytes] = field(default_factory=set)

    def absorb(self, log: str) -> None:
        pending: dict[bytes, str] = {}
        # Only whole lines count: the kill may cut the last one anywhere -- even inside a key
        # ("A P r2w1-00" once passed for an acknowledgement of a key that never existed).
        for line in log.split("\n")[:-1]:
            parts = line.split()
            if len(parts) != 3:
                continue
            phase, op, key = parts[0], parts[1], parts[2].encode()
            if phase == "I":
                pending[key] = op
            elif phase == "A":
                pending.pop(key, None)
                if op == "P":
                    self.present.add(key)
                else:
                    self.present.discard(key)
                    self.absent.add(key)
        for key in pending:
            self.present.discard(key)
            self.unknown.add(key)

    def check(self, db: LSM, sample: int | None = None, seed: int = 0) -> None:
        """Check every expectation, or (``sample``) the newest ones plus a random sample of the
        rest -- a long soak re-checks its whole history only at the end."""
        present, absent, unknown = self.present, self.absent, self.unknown
        if sample is not None:
            rnd = random.Random(seed)
            present = _fresh(present, self.checked_present, rnd, sample)
            absent = _fresh(absent, self.checked_absent, rnd, sample)
        missing = [k for k in present if db.get(k) != value_for(k)]
        assert not missing, f"{len(missing)} acknowledged puts lost, e.g. {sorted(missing)[:3]}"
        back = [k for k in absent if db.get(k) is not None]
        assert not back, f"acknowledged deletes came back: {sorted(back)[:3]}"
        for k in unknown:  # whichever way it went, never a wrong value
            assert db.get(k) in (None, value_for(k))
        self.checked_present = set(self.present)
        self.checked_absent = set(self.absent)


def test_a_log_line_cut_by_the_kill_is_not_an_acknowledgement() -> None:
    e = Expect()
    e.absorb("I P k-0000001\nA P k-0000001\nI P k-0000002\nA P k-00")
    assert e.present == {b"k-0000001"} and e.unknown == {b"k-0000002"}


def _fresh(keys: set[bytes], checked: set[bytes], rnd: random.Random, sample: int) -> set[bytes]:
    """Keys not yet checked in this state, plus ``sample`` of those that were."""
    old = keys & checked
    return (keys - old) | set(rnd.sample(sorted(old), min(sample, len(old))))


class Logged:
    """A worker whose stdout/stderr go to files (a pipe could fill and stall it before the kill)."""

    def __init__(self, *args: str) -> None:
        self.out = tempfile.TemporaryFile(mode="w+")
        self.err = tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen(
            [sys.executable, WORKERS, *args],
            stdout=self.out,
            stderr=self.err,
            text=True,
            env=worker_env(),
        )

    def finish(self) -> tuple[str, str]:
        """Wait (killing it if it outlives the test's patience); return (stdout, stderr)."""
        try:
            self.p.wait(timeout=60)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
        res = []
        for f in (self.out, self.err):
            f.seek(0)
            res.append(f.read())
            f.close()
        return res[0], res[1]


def _kill_after(procs: list[Logged], delays: list[float]) -> list[str]:
    start = time.monotonic()
    try:
        for w, d in sorted(zip(procs, delays, strict=False), key=lambda x: x[1]):
            time.sleep(max(0.0, start + d - time.monotonic()))
            os.kill(w.p.pid, signal.SIGKILL)
    finally:
        logs = [w.finish() for w in procs]
    for (_, err), w in zip(logs, procs, strict=False):
        assert w.p.returncode == -signal.SIGKILL, err[-2000:]
    return [out for out, _ in logs]


def _reopen_and_check(path: str, expect: Expect, sample: int | None = None) -> None:
    with LSM(path, durability="none", memtable_bytes=8192, levels=SMALL) as db:
        expect.check(db, sample)
        assert db.verify() == []


def _random_kills(path: str, rounds: int, durability: str, seed: int) -> Expect:
    rnd = random.Random(seed)
    expect = Expect()
    for r in range(rounds):
        # Two writers share the store; each is killed at its own random moment (start-up of
        # the interpreter takes ~0.15 s, then flushes and compactions run every few dozen puts).
        procs = [
            Logged("crash_writer", path, durability, f"r{r}w{w}", str(rnd.randrange(1 << 30)))
            for w in range(2)
        ]
        logs = _kill_after(procs, [rnd.uniform(0.25, 0.9) for _ in procs])
        for log in logs:
            expect.absorb(log)
        _reopen_and_check(path, expect, sample=2000 if r < rounds - 1 else None)
    assert len(expect.present) > 100, "the writers barely wrote anything: kills came too early"
    return expect


@pytest.mark.parametrize("durability", ["fsync", "none"])
def test_random_sigkills_lose_no_acknowledged_write(db_path: str, durability: str) -> None:
    _random_kills(db_path, rounds=4, durability=durability, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("durability", ["fsync", "interval", "none"])
def test_many_random_sigkills_lose_no_acknowledged_write(db_path: str, durability: str) -> None:
    _random_kills(db_path, rounds=40, durability=durability, seed=2)


KILL_POINTS = [
    "pre:wal_write",  # change counter bumped, nothing written yet
    "torn:wal_write",  # half a WAL record on disk
    "post:wal_write",  # whole record written, not yet acknowledged
    "pre:wal_create",  # flush: before the new WAL generation exists
    "post:wal_create",  # flush: new WAL exists, old one not sealed
    "pre:table_finish",  # flush/compaction: table half written
    "post:table_finish",  # table durable, manifest not yet naming it
    "pre:manifest_write",
    "post:manifest_write",  # manifest replaced, old files not yet deleted
    "post:unlink",  # some old files deleted, others not
]


def _kill_at(path: str, point: str, nth: int, expect: Expect) -> None:
    w = Logged("kill_at", path, point, str(nth))
    log, err = w.finish()
    assert w.p.returncode == -signal.SIGKILL, f"{point} #{nth} was never reached: {err[-2000:]}"
    expect.absorb(log)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_a_chosen_step_recovers(tmp_path: str, point: str) -> None:
    # Each kill in a fresh store: the worker's key names restart at k-0000000 every run.
    for nth in (1, 3):
        path = os.path.join(str(tmp_path), f"db{nth}")
        expect = Expect()
        _kill_at(path, point, nth, expect)
        _reopen_and_check(path, expect)


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_a_chosen_step_recovers_at_many_depths(tmp_path: str, point: str) -> None:
    for nth in range(2, 12):
        path = os.path.join(str(tmp_path), f"db{nth}")
        expect = Expect()
        _kill_at(path, point, nth, expect)
        _reopen_and_check(path, expect)
