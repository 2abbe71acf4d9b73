"""After a fault heals, the three promises of issue 12, checked on real daemons:

1. no acknowledged write is lost -- every replica of a key written (and not deleted) holds its
   acknowledged value;
2. every replica's stored copy converges -- polled, with a deadline, until the copies every
   owner of a key holds are equal;
3. a deleted key stays deleted -- every owner holds a tombstone, a read at R = N answers
   nothing, and it is still so after a few more anti-entropy rounds.

What a node holds is asked with REPLICA_GET_MANY over TCP (the replica request a coordinator
sends): the stored copies, not a quorum read that would repair them, so convergence is
anti-entropy's and hinted handoff's work. Start the cluster with ``extra=AE`` so that rounds
come every 0.5 s (the daemon's default is 10 s).

Use: ``ledger = write_and_delete(client, b"pfx", 300)`` during the fault, heal it, then
``converge_and_check(state, ledger, n)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.transport import TcpTransport, run
from shmkv.cluster.versions import VersionSet
from shmkv.cluster.wire import Message

#: --ae-interval 0.5 (grace: the daemon wants >= twice the interval; 600 s collects nothing
#: during a test)
AE = ["--ae-interval", "0.5", "--tombstone-grace", "600"]
DEADLINE = 60.0  # seconds the replicas get to converge (generous: a loaded 2-core machine)


@dataclass
class Ledger:
    """What the clients were told: key -> acknowledged value, deleted keys, and keys whose
    outcome is unknown (MaybeApplied, a timeout: left out of the checks)."""

    acked: dict[bytes, bytes] = field(default_factory=dict)
    deleted: set[bytes] = field(default_factory=set)
    unknown: set[bytes] = field(default_factory=set)

    @property
    def keys(self) -> list[bytes]:
        return sorted((set(self.acked) | self.deleted) - self.unknown)


def write_and_delete(c: shmkv.Client, prefix: bytes, count: int = 300, delete_every: int = 10,
                     **kw: Any) -> Ledger:
    """Put ``count`` keys ``prefix + i`` and delete every ``delete_every``-th (with the context
    its put returned, so the tombstone supersedes it); ``kw`` go to put and delete (``w=``)."""
    led = Ledger()
    for i in range(count):
        k, v = prefix + b"%d" % i, prefix + b"=%d" % i
        try:
            ctx = c.put(k, v, **kw)
            led.acked[k] = v
            if i % delete_every == 0:
                c.delete(k, context=ctx, **kw)
                led.deleted.add(k)
                del led.acked[k]
        except shmkv.MaybeApplied:
            led.unknown.add(k)
        except shmkv.QuorumError:  # not applied: the previous state (if any) is what counts
            pass
    return led


def stored(st: dict[str, Any], name: str, keys: list[bytes], epoch: int) -> list[VersionSet | None]:
    """Node ``name``'s stored copies of ``keys`` (None: no copy); it must own every one."""
    addr = next(x["addr"] for x in st["nodes"] if x["name"] == name)

    async def ask() -> list[VersionSet | None]:
        t = TcpTransport()
        try:
            reply = await t.request(addr, Message(wire.REPLICA_GET_MANY, 0, {"keys": keys, "epoch": epoch}), 5.0)
        finally:
            await t.close()
        wire.raise_for_error(reply)
        out: list[VersionSet | None] = []
        for w in reply.fields["versions"]:
            vs = VersionSet.from_wire(w)
            out.append(vs if len(vs) else None)
        return out

    return run(ask()) if keys else []


def converge_and_check(st: dict[str, Any], led: Ledger, n: int, deadline: float = DEADLINE) -> float:
    """The three promises (module docstring) for ``led``'s keys on a cluster of replication
    ``n``; returns the seconds convergence took. Raises AssertionError naming what failed."""
    keys = led.keys
    with shmkv.connect(st["seeds"], n=n, timeout=2.0) as c:
        assert c.ring is not None
        epoch = c.ring.epoch
        owners = {k: c.ring.preference_list(k, n) for k in keys}
        by_node: dict[str, list[bytes]] = {}
        for k in keys:
            for o in owners[k]:
                by_node.setdefault(o, []).append(k)

        def snapshot() -> dict[str, dict[bytes, VersionSet | None]]:
            return {name: dict(zip(ks, stored(st, name, ks, epoch), strict=True)) for name, ks in by_node.items()}

        t0 = time.monotonic()
        while True:  # 2. converged: every owner of a key holds the same copy
            held = snapshot()
            differ = [k for k in keys if any(held[o][k] != held[owners[k][0]][k] for o in owners[k])]
            took = time.monotonic() - t0
            if not differ:
                break
            assert took < deadline, f"{len(differ)} keys still differ after {deadline:g} s, e.g. {differ[:3]}"
            time.sleep(0.25)
        # 1. no acknowledged write lost (on any replica, so on every one)
        lost = [k for k, v in led.acked.items() if k not in led.unknown
                and any(held[o][k] is None or v not in held[o][k].values for o in owners[k])]  # type: ignore[union-attr]
        assert lost == [], f"{len(lost)} acknowledged writes lost, e.g. {lost[:3]}"
        # 3. deleted keys stay deleted: tombstones everywhere, nothing to a read, still so later
        gone = sorted(led.deleted - led.unknown)

        def tombstones() -> list[bytes]:
            now = snapshot()
            return [k for k in gone if any(now[o][k] is None or not now[o][k].is_deleted for o in owners[k])]  # type: ignore[union-attr]

        assert tombstones() == [], "a deleted key has a replica without its tombstone"
        back = [k for k in gone if c.get(k, r=n) is not None]
        assert back == [], f"deleted keys read back: {back[:3]}"
        time.sleep(1.5)  # three anti-entropy rounds at --ae-interval 0.5
        assert tombstones() == [], "a deleted key came back after more anti-entropy rounds"
    return took
