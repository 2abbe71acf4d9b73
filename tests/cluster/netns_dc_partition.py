"""The body of test_dc_partition_netns.py, run inside a private network namespace (``unshare
-rn``; the test starts it). Not collected by pytest (no ``test_`` prefix): it asserts as it goes
and prints ``RESULT <json>`` last; the test checks the exit status and the numbers.

Four ``shmkv serve`` daemons, two per data centre (``--dc a`` on 127.0.0.2-3, ``--dc b`` on
127.0.0.4-5, ``--n-per-dc a:2,b:2``: every key has two replicas in each DC), clients on
127.0.0.1 (never cut). An nftables rule set cuts every packet between the DCs' addresses; then:

- local_quorum writes and reads keep working inside each DC (a client per DC, ``dc=``);
- each_quorum writes and reads fail fast -- QuorumError, not MaybeApplied, in a small fraction
  of the request time-out -- once gossip holds the other DC down;
- after the heal, every acknowledged write is on all four nodes' stored copies (read with
  REPLICA_GET_MANY, which repairs nothing) and all four agree, by anti-entropy: ``--max-hints 1``
  leaves hinted handoff almost nothing to deliver;
- keys deleted in DC a during the cut (local_quorum, with the context their read returned)
  are tombstones on all four nodes after the heal, read back as nothing at ``r="all"``, and are
  still tombstones after more anti-entropy rounds: the other DC's older copies never bring them
  back.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from typing import Any

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.transport import TcpTransport, run
from shmkv.cluster.versions import VersionSet
from shmkv.cluster.wire import Message
from shmkv.torture.local import _tools
from shmkv.torture.netns import NetFaults

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
DCS = ["a", "a", "b", "b"]
NODE_TIMEOUT = 1.0  # --timeout: a replica request's time-out
CLIENT_TIMEOUT = 4.0
FLAGS = ["--n-per-dc", "a:2,b:2", "--gossip-interval", "0.2", "--ae-interval", "0.5",
         "--tombstone-grace", "60", "--ae-rebuild", "0", "--max-hints", "1"]
KEYS = 40
DEADLINE = 20.0


def ask(addr: str, msg: Message) -> Message:
    async def go() -> Message:
        t = TcpTransport()
        try:
            return wire.raise_for_error(await t.request(addr, msg, 5.0))
        finally:
            await t.close()

    return run(go())


def status(node: dict[str, Any]) -> dict[str, Any]:
    return dict(ask(node["addr"], Message(wire.STATUS, 0, {})).fields["status"])


def down(node: dict[str, Any]) -> set[str]:
    members = status(node).get("members") or {}
    return {p for p, v in members.items() if v["state"] == "down"}


def held(node: dict[str, Any], keys: list[bytes], epoch: int) -> list[VersionSet | None]:
    reply = ask(node["addr"], Message(wire.REPLICA_GET_MANY, 0, {"keys": keys, "epoch": epoch}))
    out = []
    for w in reply.fields["versions"]:
        vs = VersionSet.from_wire(w)
        out.append(vs if len(vs) else None)
    return out


def poll(cond: Any, limit: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit, f"{what}: not within {limit} s"
        time.sleep(0.1)
    return time.monotonic() - t0


def main() -> int:
    tc = _tools()
    net = NetFaults()
    d = tempfile.mkdtemp(prefix="shmkv-dcnet-")
    res: dict[str, Any] = {}
    st = tc.start(4, d, n=4, w=2, r=2, size="32MiB", timeout=NODE_TIMEOUT, join_timeout=20.0,
                  hosts=HOSTS, dcs=DCS, extra=FLAGS)
    try:
        nodes = {n["name"]: n for n in st["nodes"]}
        side = {"a": ["n1", "n2"], "b": ["n3", "n4"]}
        other = {"a": "b", "b": "a"}
        clients = {dc: shmkv.connect(st["seeds"], n=4, w="local_quorum", r="local_quorum", dc=dc,
                                     timeout=CLIENT_TIMEOUT) for dc in ("a", "b")}
        c = clients["a"]
        c.refresh_ring()
        assert c.ring is not None
        epoch = c.ring.epoch
        acked: dict[bytes, bytes] = {}
        before = [b"pre-%d" % i for i in range(KEYS)]
        for k in before:
            c.put(k, b"v0:" + k, w="each_quorum")
            acked[k] = b"v0:" + k

        # the cut: nothing passes between the DCs' addresses, either way
        net.split(HOSTS[:2], HOSTS[2:])
        t0 = time.monotonic()
        for dc in ("a", "b"):
            for name in side[dc]:
                poll(lambda name=name, dc=dc: set(side[other[dc]]) <= down(nodes[name]), DEADLINE,
                     f"{name} holding DC {other[dc]} down")
        res["detected_s"] = round(time.monotonic() - t0, 2)

        # local_quorum goes on in each DC: new keys per DC, and overwrites of old ones in DC a
        for dc in ("a", "b"):
            cl = clients[dc]
            for i in range(KEYS):
                k = b"%s-%d" % (dc.encode(), i)
                cl.put(k, b"cut:" + k)
                acked[k] = b"cut:" + k
                assert cl.get(k) == b"cut:" + k
        for k in before[: KEYS // 2]:
            clients["a"].put(k, b"v1:" + k)
            acked[k] = b"v1:" + k
            assert clients["a"].get(k) == b"v1:" + k
        deleted = before[KEYS // 2 + 5 : KEYS // 2 + 15]  # DC b still holds their live copies
        for k in deleted:
            got = clients["a"].get_versions(k)
            clients["a"].delete(k, context=got.context)
            del acked[k]
            assert clients["a"].get(k) is None

        # each_quorum fails fast, as "not applied"
        worst = 0.0
        for dc in ("a", "b"):
            for k in before[KEYS // 2 : KEYS // 2 + 5]:
                t1 = time.monotonic()
                try:
                    clients[dc].put(k, b"never", w="each_quorum")
                    raise AssertionError("an each_quorum write succeeded across the cut")
                except shmkv.QuorumError as e:
                    assert not isinstance(e, shmkv.MaybeApplied), e
                    assert f"DC {other[dc]}" in str(e), e
                t2 = time.monotonic()
                try:
                    clients[dc].get(k, r="each_quorum")
                    raise AssertionError("an each_quorum read succeeded across the cut")
                except shmkv.QuorumError as e:
                    assert f"DC {other[dc]}" in str(e), e
                worst = max(worst, t2 - t1, time.monotonic() - t2)
        res["each_quorum_worst_s"] = round(worst, 3)
        assert worst < NODE_TIMEOUT / 2, f"each_quorum took {worst:.3f} s: not fast"

        # the heal: anti-entropy brings every acknowledged write to every node
        repaired0 = sum(status(n)["antientropy"]["repaired"] for n in nodes.values())
        net.heal()
        t0 = time.monotonic()
        keys = sorted(acked)

        def converged() -> bool:
            views = [held(nodes[n], keys, epoch) for n in sorted(nodes)]
            return all(v == views[0] for v in views[1:]) and all(
                vs is not None and vs.values == [acked[k]] for k, vs in zip(keys, views[0], strict=True))

        def tombstoned() -> bool:
            return all(vs is not None and vs.is_deleted for n in sorted(nodes)
                       for vs in held(nodes[n], deleted, epoch))

        poll(converged, DEADLINE, "all four nodes holding every acknowledged write")
        poll(tombstoned, DEADLINE, "all four nodes holding the tombstones of the keys deleted in DC a")
        res["converged_s"] = round(time.monotonic() - t0, 2)
        assert all(clients["b"].get(k, r="all") is None for k in deleted), "a deleted key read back"
        time.sleep(1.5)  # three more anti-entropy rounds at --ae-interval 0.5
        assert tombstoned(), "a deleted key came back after more anti-entropy rounds"
        res["deleted"] = len(deleted)
        res["ae_repaired"] = sum(status(n)["antientropy"]["repaired"] for n in nodes.values()) - repaired0
        res["hints_added"] = sum(status(n).get("hints", {}).get("added", 0) for n in nodes.values())
        assert res["ae_repaired"] >= KEYS, res  # anti-entropy did the converging
        # and each_quorum works again (once the coordinators see the other DC up)
        poll(lambda: _each_quorum_ok(clients["b"], keys[0], acked[keys[0]]), DEADLINE, "each_quorum after the heal")
        for cl in clients.values():
            cl.close()
    finally:
        net.heal()
        tc.stop(d, grace=5)
    print("RESULT " + json.dumps(res))
    return 0


def _each_quorum_ok(c: shmkv.Client, key: bytes, value: bytes) -> bool:
    try:
        return bool(c.get(key, r="each_quorum") == value)
    except shmkv.QuorumError:
        return False


if __name__ == "__main__":
    sys.exit(main())
