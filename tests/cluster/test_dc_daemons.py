"""Data centres with real daemons: 4 nodes on 127.0.0.1, two per ``--dc``, ``--n-per-dc dc1:1,dc2:1``.
Placement as the nodes see it (a replica request to a node outside a key's list is refused), a
level end to end, and each_quorum failing fast while a whole DC is SIGSTOPped."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.errors import WrongEpoch
from shmkv.cluster.wire import Message

pytestmark = pytest.mark.slow


def poll(cond: Callable[[], bool], limit: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()


def down_at(c: shmkv.Client, name: str) -> set[str]:
    assert c.ring is not None
    try:
        reply = c.request(c.ring.members[name].addr, Message(wire.STATUS, 0, {}), 1.0)
    except (shmkv.Error, OSError):
        return set()
    return {p for p, v in (reply.fields["status"].get("members") or {}).items() if v["state"] == "down"}


def holds(c: shmkv.Client, name: str, key: bytes) -> bool:
    """Whether node ``name`` takes a replica read of ``key`` (it refuses keys it holds no copy of)."""
    assert c.ring is not None
    msg = Message(wire.REPLICA_GET, 0, {"key": key, "epoch": c.ring.epoch})
    try:
        c.request(c.ring.members[name].addr, msg, 2.0)
    except WrongEpoch:
        return False
    return True


def test_four_daemons_in_two_dcs_place_one_copy_per_dc_and_honour_the_levels(cluster: Any) -> None:
    dcs = ["dc1", "dc1", "dc2", "dc2"]
    st = cluster(4, n=2, w=1, r=1, dcs=dcs, extra=["--n-per-dc", "dc1:1,dc2:1", "--gossip-interval", "0.2"])
    dc = {f"n{i + 1}": d for i, d in enumerate(dcs)}
    with shmkv.connect(st["seeds"], n=2, w="each_quorum", r="local_quorum", dc="dc1") as c:
        c.refresh_ring()
        assert c.ring is not None
        keys = [b"dc-key-%d" % i for i in range(20)]
        for k in keys:
            prefs = c.ring.preference_list(k, 2)
            assert sorted(dc[p] for p in prefs) == ["dc1", "dc2"]
            # the nodes place it the same way: exactly the two listed nodes take its replicas
            assert [x for x in sorted(dc) if holds(c, x, k)] == sorted(prefs)
            c.put(k, b"v:" + k)  # each_quorum: one copy acknowledged in each DC
        assert all(c.get(k) == b"v:" + k for k in keys)
        # a whole DC stopped: each_quorum fails fast once gossip holds it down; local_quorum works
        dc2 = [x for x in st["nodes"] if dc[x["name"]] == "dc2"]
        for node in dc2:
            os.kill(node["pid"], signal.SIGSTOP)
        try:
            assert poll(lambda: {"n3", "n4"} <= down_at(c, "n1") and {"n3", "n4"} <= down_at(c, "n2"), 20.0)
            for k in keys[:5]:
                with pytest.raises(shmkv.QuorumError, match="not applied.*DC dc2") as e:
                    c.put(k, b"each")
                assert not isinstance(e.value, shmkv.MaybeApplied)
                c.put(k, b"local:" + k, w="local_quorum")
                assert c.get(k) == b"local:" + k
            with pytest.raises(shmkv.Error, match="not a consistency level"):
                c.put(keys[0], b"x", w="local_qorum")
        finally:
            for node in dc2:
                os.kill(node["pid"], signal.SIGCONT)
        # healed: the hints reach dc2, an each_quorum read sees the local_quorum writes
        assert poll(lambda: not down_at(c, "n1") & {"n3", "n4"}, 20.0)
        def converged() -> bool:
            try:
                return all(c.get(k, r="each_quorum") == b"local:" + k for k in keys[:5])
            except shmkv.QuorumError:  # dc2's verdict at the coordinator may lag a moment
                return False

        assert poll(converged, 20.0)
