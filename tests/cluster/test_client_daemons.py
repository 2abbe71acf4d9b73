"""The client's synchronous path against real daemons (tools/cluster.py, stopped by PID): a
coordinator SIGSTOPped mid-request, a node SIGKILLed between calls and restarted, one client
shared by many threads doing every kind of request. (test_client_sync.py scripts the wire-level
failures against fake nodes; this file checks the same rules hold against the real thing.)"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

import shmkv

from .local_cluster import Start, eventually, run_threads, tc

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

TIMEOUT = 0.5


def _connect(st: dict[str, Any], **kw: Any) -> shmkv.Client:
    kw.setdefault("timeout", TIMEOUT)
    return shmkv.connect(st["seeds"], n=3, **kw)


def _first_at(c: shmkv.Client, name: str, count: int = 1) -> list[bytes]:
    """Keys whose coordinator (the first of the preference list) is ``name``."""
    assert c.ring is not None
    out = [k for k in (b"s%d" % i for i in range(20_000)) if c.ring.preference_list(k, 3)[0] == name]
    return out[:count]


class _Refused(Exception):
    """A QuorumError that is a refusal (nothing written), the only failure worth a retry."""


def _refusal_only(put: Any) -> None:
    try:
        put()
    except shmkv.MaybeApplied:
        raise
    except shmkv.QuorumError as e:
        raise _Refused(str(e)) from e


def _pid(st: dict[str, Any], name: str) -> int:
    return int(next(n for n in tc._load(st["dir"])["nodes"] if n["name"] == name)["pid"])


def test_a_sigstopped_coordinator_bounds_every_call_with_the_right_error(cluster: Start) -> None:
    st = cluster(3)
    with _connect(st) as c:
        read_key, write_key = _first_at(c, "n1", 2)
        c.put(read_key, b"before", w=3)
        pid = _pid(st, "n1")
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            # the request reaches n1's socket and is never answered: it may have been applied
            with pytest.raises(shmkv.MaybeApplied, match="may have been applied"):
                c.put(write_key, b"paused")
            assert time.monotonic() - t0 < 2 * TIMEOUT + 0.5
            # a read goes on to the next node (n1 is a suspect now: straight there)
            t0 = time.monotonic()
            assert c.get(read_key) == b"before"
            assert time.monotonic() - t0 < 2 * TIMEOUT + 0.5
        finally:
            os.kill(pid, signal.SIGCONT)
        # the resumed node applies the write it had in its socket: it was "maybe", not "failed"
        assert eventually(lambda: c.get(write_key, r=3), shmkv.QuorumError) == b"paused"


def test_a_node_killed_between_calls_is_routed_around_then_reconnected(cluster: Start) -> None:
    st = cluster(3)
    with _connect(st) as c:
        keys = _first_at(c, "n1", 5)
        for k in keys:
            c.put(k, b"v1", w=3)  # the client now holds an idle connection to n1
        tc.kill(st["dir"], "n1")
        for k in keys:
            # the dead connection is noticed before anything is written into it: a plain
            # success through n2 (W=2 of n2, n3), never MaybeApplied
            c.put(k, b"v2")
            assert c.get(k) == b"v2"
        tc.restart(st["dir"], "n1")
        # the restarted node is reached on a new connection once the coordinators hold it up
        # (until then a W=3 put is refused before anything is written: QuorumError, never
        # MaybeApplied, which eventually would not retry)
        eventually(lambda: _refusal_only(lambda: c.put(keys[0], b"v3", w=3)), _Refused, timeout=15)
        assert c.get(keys[0], r=3) == b"v3"


def test_one_client_shared_by_many_threads_doing_every_request(cluster: Start) -> None:
    st = cluster(3)
    threads_n, per = 12, 25
    with _connect(st, timeout=2.0) as c:

        def worker(i: int) -> None:
            for j in range(per):
                k = f"t{i}:{j}"
                c.put(k, b"%d:%d" % (i, j))
                assert c.get(k) == b"%d:%d" % (i, j)
                c.incr("shared", 1)
            batch = {f"b{i}:{j}": b"%d" % j for j in range(per)}
            c.put_many(batch)
            assert c.get_many(list(batch)) == {k.encode(): v for k, v in batch.items()}

        assert run_threads(worker, threads_n) == []
        assert c.incr("shared", 0, w=3) == threads_n * per
