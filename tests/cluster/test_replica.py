"""replica.py over a real Store: copies, counters, the actor, and what survives a reopen."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import shmkv
from shmkv.cluster.crdt import PNCounter
from shmkv.cluster.replica import ACTOR_KEY, RECLAIM_MARGIN, Replica
from shmkv.cluster.versions import VersionSet


@pytest.fixture
def store() -> Iterator[shmkv.Store]:
    name = f"replicatest.{os.getpid()}"
    kv = shmkv.attach(name, size="16MiB")
    yield kv
    kv.close()
    shmkv.unlink(name)


def test_merge_keeps_both_concurrent_versions_and_stores_the_merge(store: shmkv.Store) -> None:
    rep = Replica(store, "a")
    a = VersionSet().put(b"A", None, "x@1")
    b = VersionSet().put(b"B", None, "y@1")
    rep.merge(b"k", a)
    merged = rep.merge(b"k", b)
    assert sorted(merged.values) == [b"A", b"B"]
    assert rep.get(b"k") == merged  # stored, not only returned
    assert rep.merge(b"k", a) == merged  # idempotent


def test_coordinate_mints_under_the_actor_and_supersedes_what_it_holds(store: shmkv.Store) -> None:
    rep = Replica(store, "a")
    assert rep.actor.startswith("a@")
    rep.merge(b"k", VersionSet().put(b"old", None, "y@1"))
    new = rep.coordinate(b"k", b"new", None)
    assert new.values == [b"new"]
    assert [s.dot[0] for s in new.siblings] == [rep.actor]
    assert rep.get(b"k").values == [b"new"]


def test_versions_and_counters_do_not_collide_and_meta_is_not_counted(store: shmkv.Store) -> None:
    rep = Replica(store, "a")
    rep.coordinate(b"k", b"v", None)
    rep.increment(b"k", 5)
    rep.merge_counter(b"k", PNCounter().increment("other@1", 2))
    assert rep.get(b"k").values == [b"v"]
    assert rep.counter(b"k").value == 7
    assert rep.key_count() == 2
    assert rep.get(b"missing") == VersionSet()


def test_actor_is_kept_with_the_store_and_fresh_without_it(tmp_path: Path) -> None:
    name = f"replicatest.p.{os.getpid()}"
    kv = shmkv.attach(name, size="16MiB", path=tmp_path / "lsm")
    try:
        first = Replica(kv, "a").actor
        kv.close()
        shmkv.unlink(name)  # the memory tier is gone; the LSM keeps the copies and the actor
        kv = shmkv.attach(name, size="16MiB", path=tmp_path / "lsm")
        assert Replica(kv, "a").actor == first
    finally:
        kv.close()
        shmkv.unlink(name)
    # A store that lost its contents must not mint under the old actor (versions.py REQUIRES).
    kv = shmkv.attach(name, size="16MiB")
    try:
        assert kv.get(ACTOR_KEY) is None
        assert Replica(kv, "a").actor != first
    finally:
        kv.close()
        shmkv.unlink(name)


# -- K workers over one store: concurrent read-merge-writes (the --workers promise) -----------

_FORK = __import__("multiprocessing").get_context("fork")


def _worker_merges(name: str, p: int, count: int) -> None:
    kv = shmkv.attach(name)
    rep = Replica(kv, "a")
    for i in range(count):  # every write comes from its own coordinator: all concurrent
        rep.merge(b"k", VersionSet().put(b"%d-%d" % (p, i), None, f"peer{p}-{i}@1"))
        rep.merge_counter(b"c", PNCounter().increment(f"peer{p}-{i}@1", 1))
    kv.close()


def _worker_coordinates(name: str, p: int, count: int) -> None:
    from shmkv.cluster.versions import Context

    kv = shmkv.attach(name)
    rep = Replica(kv, "a")
    for i in range(count):  # an empty context supersedes nothing: every write stays a sibling
        rep.coordinate(b"k", b"%d-%d" % (p, i), Context())
        rep.increment(b"c", 1)
    kv.close()


def _run_workers(target: object, name: str, procs: int, count: int) -> None:
    ps = [_FORK.Process(target=target, args=(name, p, count)) for p in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
        assert p.exitcode == 0


@pytest.mark.multiprocess
@pytest.mark.parametrize("tiered", [False, True], ids=["memory", "disk-tier"])
def test_concurrent_merges_by_four_workers_never_lose_a_version(tmp_path: Path, tiered: bool) -> None:
    name = f"replicacas.{os.getpid()}.{int(tiered)}"
    kv = (shmkv.attach(name, size="16MiB", path=tmp_path / "d", durability="none") if tiered
          else shmkv.attach(name, size="16MiB"))
    try:
        count = 40 if tiered else 120
        _run_workers(_worker_merges, name, 4, count)
        rep = Replica(kv, "a")
        assert sorted(rep.get(b"k").values) == sorted(b"%d-%d" % (p, i) for p in range(4) for i in range(count))
        assert rep.counter(b"c").value == 4 * count
    finally:
        kv.close()
        shmkv.unlink(name)


@pytest.mark.multiprocess
def test_four_workers_coordinating_one_key_mint_distinct_dots_under_the_shared_actor() -> None:
    name = f"replicadots.{os.getpid()}"
    kv = shmkv.attach(name, size="16MiB")
    try:
        actor = Replica(kv, "a").actor  # installed once; every worker finds and shares it
        _run_workers(_worker_coordinates, name, 4, 100)
        vs = Replica(kv, "a").get(b"k")
        assert len(vs.siblings) == 400  # no write lost, none stored under another's dot
        assert sorted(s.dot for s in vs.siblings) == [(actor, i) for i in range(1, 401)]
        assert Replica(kv, "a").counter(b"c").value == 400
    finally:
        kv.close()
        shmkv.unlink(name)


# -- expiry: the Store entry of an all-expiring set is reclaimed, by the version's expiry ------


def _gone_within(store: shmkv.Store, skey: bytes, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if store.get(skey) is None:
            return True
        time.sleep(0.02)
    return store.get(skey) is None


def test_an_expiring_set_is_reclaimed_a_margin_after_its_expiry_and_comes_back_expiring(
    store: shmkv.Store,
) -> None:
    wall = [5_000.0]
    rep = Replica(store, "a", clock=lambda: wall[0])
    # expired 0.3 s short of the margin (on this replica's clock): reclaimed ~0.3 s from now
    wall[0] = 5_000.0 + RECLAIM_MARGIN - 0.3
    new = rep.coordinate(b"k", b"v", None, expires=5_000_000)
    assert store.get(b"v" + b"k") == new.encode()
    assert _gone_within(store, b"v" + b"k", 30.0)
    # brought back (read repair, anti-entropy) past its reclaim time to a replica without it:
    # not stored at all (no ping-pong)
    wall[0] = 5_000.0 + RECLAIM_MARGIN + 1.0
    assert rep.merge(b"k", new) == new
    assert store.get(b"v" + b"k") is None
    # brought back before it: stored again, with the Store TTL counted from the same expiry
    wall[0] = 5_000.0 + RECLAIM_MARGIN - 0.3
    rep.merge(b"k", new)
    assert store.get(b"v" + b"k") == new.encode()
    assert _gone_within(store, b"v" + b"k", 30.0)


def test_a_set_with_a_version_that_never_expires_keeps_no_store_ttl(store: shmkv.Store) -> None:
    wall = [5_000.0 + RECLAIM_MARGIN - 0.1]
    rep = Replica(store, "a", clock=lambda: wall[0])
    rep.coordinate(b"k", b"short", None, expires=5_000_000)
    rep.merge(b"k", VersionSet().put(b"plain", None, "other@1"))  # concurrent, no expiry
    rep.coordinate(b"j", b"short", None, expires=5_000_000)
    rep.coordinate(b"j", b"plain", None)  # supersedes it: the Store TTL must be cleared
    assert _gone_within(store, b"v" + b"k", 0.5) is False
    assert store.get(b"v" + b"j") is not None
    assert sorted(rep.get(b"k").values) == [b"plain", b"short"]
    assert rep.get(b"k").visible(5_000_000).values == [b"plain"]
