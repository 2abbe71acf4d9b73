"""Several real processes on one store: visibility, concurrent writers through flushes and
compactions, readers running while others compact."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from shmkv.lsm import LSM

from .conftest import SMALL, spawn
from .workers import value_for

pytestmark = pytest.mark.multiprocess
Open = Callable[..., LSM]


class Echo:
    """A worker process holding the store open, driven line by line."""

    def __init__(self, path: str) -> None:
        self.p = spawn("echo", path, stdin=subprocess.PIPE)

    def __call__(self, line: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        out = self.p.stdout.readline().strip()
        if not out:
            raise AssertionError(f"worker died: {self.p.stderr.read() if self.p.stderr else ''}")
        return out

    def close(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write("quit\n")
        self.p.stdin.close()
        self.p.wait(timeout=30)
        for f in (self.p.stdout, self.p.stderr):
            if f is not None:
                f.close()


def test_a_write_in_one_process_is_visible_to_the_next_get_in_another(
    open_db: Open, db_path: str
) -> None:
    db = open_db(memtable_bytes=1 << 20)
    other = Echo(db_path)
    try:
        assert other("get a") == "None"
        db.put(b"a", b"1")
        assert other("get a") == "1"
        assert other("put b 2") == "ok"
        assert db.get(b"b") == b"2"
        assert other("del a") == "ok"
        assert db.get(b"a") is None
        db.put(b"c", b"3")
        assert other("flush") == "ok"  # the other process flushes our write into a table
        assert db.get(b"c") == b"3" and db.stats()["files_per_level"][0] == 1
        db.put(b"c", b"4")
        db.flush()
        assert other("get c") == "4"
    finally:
        other.close()


def test_concurrent_writers_through_flushes_and_compactions_lose_nothing(
    open_db: Open, db_path: str
) -> None:
    n = 1000
    procs = [spawn("writer", db_path, f"w{i}", str(n), "8192") for i in range(3)]
    db = open_db(memtable_bytes=8192)
    for i in range(n):  # the test process writes too
        db.put(b"p-%06d" % i, value_for(b"p-%06d" % i))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "done", err
    s = db.stats()
    assert s["flushes"] > 5 and s["compactions"] > 0
    got = dict(db.scan())
    assert len(got) == 4 * n
    assert all(v == value_for(k) for k, v in got.items())
    assert db.verify() == []


def test_readers_keep_working_while_another_process_compacts(open_db: Open) -> None:
    db = open_db(memtable_bytes=16 << 10)
    for i in range(2000):
        k = b"r-%06d" % i
        db.put(k, value_for(k))
    db.flush()
    readers = [spawn("reader", db.path, "3") for _ in range(2)]
    rounds = 0
    try:
        while any(p.poll() is None for p in readers):
            for i in range(0, 2000, 7):  # rewrite (same values), churn, compact
                k = b"r-%06d" % ((i + rounds) % 2000)
                db.put(k, value_for(k))
            db.compact()
            rounds += 1
    finally:
        outs = [p.communicate(timeout=60) for p in readers]
    for (out, err), p in zip(outs, readers, strict=False):
        assert p.returncode == 0, err
        fields = dict(f.split("=") for f in out.split())
        assert fields["bad"] == "0" and int(fields["scans"]) > 0 and int(fields["reads"]) > 0
    assert rounds >= 2
    assert db.verify() == []


# -- the model check, two handles -----------------------------------------------------------------
#
# Two handles on one directory in one process have separate open file descriptions, so their
# flocks exclude each other exactly as two processes' do: a deterministic, shrinkable stand-in
# for two processes, driven by hypothesis against one dict.

KEYS = st.sampled_from([b"k%02d" % i for i in range(16)])
WHO = st.integers(0, 1)


class TwoHandlesVsDict(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="lsm-pair-")
        self.dbs = [self._open(), self._open()]
        self.model: dict[bytes, bytes] = {}

    def _open(self) -> LSM:
        return LSM(self.dir, durability="none", memtable_bytes=512, levels=SMALL, background=False)

    @rule(who=WHO, k=KEYS, v=st.binary(max_size=200))
    def put(self, who: int, k: bytes, v: bytes) -> None:
        self.dbs[who].put(k, v)
        self.model[k] = v

    @rule(who=WHO, k=KEYS)
    def delete(self, who: int, k: bytes) -> None:
        self.dbs[who].delete(k)
        self.model.pop(k, None)

    @rule(who=WHO, k=KEYS)
    def get(self, who: int, k: bytes) -> None:
        assert self.dbs[who].get(k) == self.model.get(k)

    @rule(who=WHO)
    def scan(self, who: int) -> None:
        assert list(self.dbs[who].scan()) == sorted(self.model.items())

    @rule(who=WHO)
    def flush(self, who: int) -> None:
        self.dbs[who].flush()

    @rule(who=WHO)
    def compact(self, who: int) -> None:
        self.dbs[who].compact()

    @rule(who=WHO)
    def reopen(self, who: int) -> None:
        self.dbs[who].close()
        self.dbs[who] = self._open()

    def teardown(self) -> None:
        try:
            assert self.dbs[0].verify() == []
        finally:
            for db in self.dbs:
                db.close()
            shutil.rmtree(self.dir, ignore_errors=True)


TwoHandlesVsDict.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_two_handles_on_one_store_match_a_dict_model = TwoHandlesVsDict.TestCase
