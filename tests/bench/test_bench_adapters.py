"""Every adapter keeps the op contract of ``adapters/base.py`` against the real backend.

Each runs against the real peer (a private redis-server / memcached is started) and is skipped
with the adapter's own one-line reason where the peer is not installed.
"""

from __future__ import annotations

import pickle
import shutil

import pytest
from bench_helpers import small_config

from shmkv.bench.adapters import NAMES, Adapter, make
from shmkv.bench.servers import MemcachedServer, RedisServer

ALL = pytest.mark.parametrize("backend", NAMES, indirect=True)


@ALL
def test_get_put_delete(backend: Adapter) -> None:
    with backend:
        assert backend.get(b"k000000000000001") is None
        backend.put(b"k000000000000001", b"v" * 100)
        assert backend.get(b"k000000000000001") == b"v" * 100
        backend.put(b"k000000000000001", b"w")
        assert backend.get(b"k000000000000001") == b"w"
        backend.delete(b"k000000000000001")
        assert backend.get(b"k000000000000001") is None
        backend.delete(b"k000000000000001")  # deleting a missing key is not an error


@ALL
def test_batches_return_found_keys_only(backend: Adapter) -> None:
    keys = [b"k%015d" % i for i in range(10)]
    with backend:
        backend.put_many({k: k[::-1] for k in keys[:6]})
        got = backend.get_many(keys)
        assert dict(got) == {k: k[::-1] for k in keys[:6]}
        backend.delete_many(keys[:3])
        assert sorted(backend.get_many(keys)) == keys[3:6]


@ALL
def test_incr_counts_and_creates_missing_counters(backend: Adapter) -> None:
    with backend:
        backend.put(b"counter", b"0")
        assert [backend.incr(b"counter") for _ in range(3)] == [1, 2, 3]
        assert backend.get(b"counter") == b"3"
        assert backend.incr(b"fresh-counter") == 1


@ALL
def test_values_up_to_10k_round_trip(backend: Adapter) -> None:
    big = bytes(range(256)) * 40  # 10,240 B
    with backend:
        backend.put(b"big", big)
        assert backend.get(b"big") == big


@ALL
def test_pickled_adapter_reopens_the_same_store(backend: Adapter) -> None:
    with backend:
        backend.put(b"shared", b"yes")
    clone = pickle.loads(pickle.dumps(backend))
    with clone:
        expected = b"yes" if backend.shared else None  # a dict is per process
        assert clone.get(b"shared") == expected


@ALL
def test_ops_refuse_to_run_on_a_closed_adapter(backend: Adapter) -> None:
    with backend:
        pass
    with pytest.raises(RuntimeError, match="not open"):
        backend.get(b"x")


@pytest.mark.parametrize("name", ["dict", "manager", "lmdb"])
def test_backends_that_cannot_evict_are_skipped_for_capacity_runs(name: str) -> None:
    reason = make(name, small_config(capacity=64 << 20)).unavailable()
    assert reason and "bound its memory" in reason


def test_missing_server_binaries_give_one_line_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    r = make("redis", small_config()).unavailable()
    m = make("memcached", small_config()).unavailable()
    assert r and "redis-server not on PATH" in r and "\n" not in r
    assert m and "memcached not on PATH" in m and "\n" not in m
    # An external server needs no binary.
    assert make("redis", small_config(redis_url="redis://127.0.0.1:1/0")).unavailable() is None


def test_missing_peer_package_gives_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_lmdb(name: str, *args: object, **kw: object) -> object:
        if name == "lmdb":
            raise ImportError("No module named 'lmdb'")
        return real_import(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_lmdb)
    assert (
        make("lmdb", small_config()).unavailable()
        == "lmdb not installed (pip install 'shmkv[bench]')"
    )


@pytest.mark.skipif(RedisServer.which() is None, reason="redis-server not installed")
def test_external_redis_keeps_foreign_keys_and_loses_workload_keys() -> None:
    import redis

    with RedisServer() as server:
        url = f"redis://{server.address}/0"
        r = redis.Redis.from_url(url)
        try:
            r.set(b"users-key", b"keep me")
            a = make("redis", small_config(redis_url=url))
            a.setup()
            with a:
                a.put_many({b"k%015d" % i: b"x" for i in range(200)})
            a.teardown()
            assert r.get(b"users-key") == b"keep me"
            assert r.dbsize() == 1
        finally:
            r.close()


@pytest.mark.skipif(MemcachedServer.which() is None, reason="memcached not installed")
def test_memcached_private_server_gets_the_capacity() -> None:
    a = make("memcached", small_config(capacity=8 << 20))
    a.setup()
    try:
        from pymemcache.client.base import Client

        c = Client(a.addr)
        try:
            assert int(c.stats()[b"limit_maxbytes"]) == 8 << 20
        finally:
            c.close()
    finally:
        a.teardown()


def test_segments_left_by_a_killed_benchmark_are_removed() -> None:
    if make("shmkv", small_config()).unavailable():
        pytest.skip(make("shmkv", small_config()).unavailable() or "")
    import os
    import subprocess
    import sys

    import shmkv
    from shmkv.bench.adapters.shmkv_store import remove_stale_stores

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale, live = f"shmkv-bench-{dead.stdout.strip()}-x", f"shmkv-bench-{os.getpid()}-y"
    for name in (stale, live):
        shmkv.attach(name, size="16MiB").close()
    try:
        assert stale in remove_stale_stores()
        assert stale not in shmkv.list_stores() and live in shmkv.list_stores()
    finally:
        for name in (stale, live):
            try:
                shmkv.unlink(name)
            except FileNotFoundError:
                pass
