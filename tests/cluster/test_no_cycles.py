"""A request leaves no reference cycle behind: its objects are freed by reference counting
the moment it ends, so the cyclic GC has nothing to find on the hot path.

Why it matters: under Cython (the compiled request path, shmkv/cluster/_compiled.py) an
async function keeps every local in one scope object, and an inner function or lambda defined
in it refers to that scope: a local holding the inner function (or a fan-out holding the
lambda) closes a cycle. Each SET once left ~28 such objects (scope, tally, version set, message,
fan-out, future, lambdas); with 50 clients the coordinator's young collections then ran every
~450 requests, each a ~3.4 ms pause for every request in flight (the 3-node p99: README
"where the daemon's time goes"). Checked here through the same Node code as the daemon's,
batched replica puts on, on the simulated network.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from shmkv.cluster import wire

from .test_coordinator import Cluster


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster(seed=11)
    for node in c.nodes.values():
        node.batch_replica_requests = True  # as the daemon runs (daemon.py)
    yield c
    c.close()


def _cyclic_garbage_of(run) -> int:
    """Objects the cyclic GC frees after ``run()``, with that GC off meanwhile."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        run()
        return gc.collect()
    finally:
        if was:
            gc.enable()


async def _now(cluster: Cluster, via: str, key: bytes, value: bytes | None) -> None:
    """The RESP front's SET or GET (Node.put_now / get_now): begun without a coroutine, ended
    by its waiter."""
    node = cluster.nodes[via]
    op = node.get_now(key) if value is None else node.put_now(key, value, None)
    assert op is not None
    if op.waiter is not None:
        await op.waiter
    op.result()


@pytest.mark.parametrize("op", ["put", "put_now", "get", "get_now", "delete", "incr", "get_many", "put_many"])
def test_requests_leave_no_cycles(cluster: Cluster, op: str) -> None:
    keys = [b"k%d" % i for i in range(200)]
    for k in keys:  # written first, so gets and deletes find versions
        cluster.request(cluster.coordinators(k)[0], wire.PUT, key=k, value=b"v")
    cluster.net.run_for(1.0)

    def run() -> None:
        for i, k in enumerate(keys):
            via = cluster.coordinators(k)[0]
            if op == "put":
                cluster.request(via, wire.PUT, key=k, value=b"w%d" % i)
            elif op == "put_now":
                cluster.net.run(_now(cluster, via, k, b"w%d" % i))
            elif op == "get_now":
                cluster.net.run(_now(cluster, via, k, None))
            elif op == "get":
                cluster.request(via, wire.GET, key=k)
            elif op == "delete":
                cluster.request(via, wire.DELETE, key=k)
            elif op == "incr":
                cluster.request(via, wire.INCR, key=b"c" + k, delta=1)
            elif op == "get_many":
                cluster.request(via, wire.GET_MANY, keys=keys[i : i + 10], r=2)
            else:
                cluster.request(via, wire.PUT_MANY, items=[[x, b"y"] for x in keys[i : i + 10]])
        cluster.net.run_for(1.0)  # the rest of each fan-out (the third replica's ack)

    found = _cyclic_garbage_of(run)
    # a cycle per request would be >= 200 x ~10 objects; a few stray ones (the simulator's own
    # timers, a first-use cache) are not per request
    assert found < 200, f"{found} objects in reference cycles after 200 {op} requests"
