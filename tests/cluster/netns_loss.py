"""The body of test_loss_netns.py, run inside a private network namespace (``unshare -rn``; the
test starts it). Not collected by pytest: it asserts as it goes and prints ``RESULT <json>``.

Three ``shmkv serve`` daemons at the default gossip and detector settings (1 s heartbeats,
phi 8 to convict) on 127.0.0.2-4, clients on 127.0.0.1 (never cut). nftables drops 1 % of
every packet between any two daemons, both ways, for ``SECONDS``; meanwhile every node's STATUS
is read every 0.25 s and a client writes. Promise (issue 12): 1 % message loss causes no
flapping -- no node ever holds a live peer down -- and no acknowledged write is lost.
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
from shmkv.cluster.wire import Message
from shmkv.torture.local import _tools
from shmkv.torture.netns import NetFaults

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
LOSS = int(sys.argv[1]) if len(sys.argv) > 1 else 1  # percent (argv: to see the check fail at 100)
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 30.0


def status(addr: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        t = TcpTransport()
        try:
            reply = wire.raise_for_error(await t.request(addr, Message(wire.STATUS, 0, {}), 5.0))
            return dict(reply.fields["status"])
        finally:
            await t.close()

    return run(go())


def main() -> int:
    tc = _tools()
    net = NetFaults()
    d = tempfile.mkdtemp(prefix="shmkv-lossnet-")
    res: dict[str, Any] = {"loss_percent": LOSS, "seconds": SECONDS}
    st = tc.start(3, d, n=3, w=2, r=2, size="32MiB", join_timeout=20.0, hosts=HOSTS)
    try:
        addrs = {n["name"]: n["addr"] for n in st["nodes"]}
        # every member up on every node before the loss starts (the detector's prior settles)
        deadline = time.monotonic() + 20
        while not all(len([p for p, v in (status(a).get("members") or {}).items() if v["state"] == "up"]) >= 2
                      for a in addrs.values()):
            assert time.monotonic() < deadline, "the members did not all see each other up"
            time.sleep(0.2)
        for i, h in enumerate(HOSTS[:-1]):  # each pair once, both ways
            net.loss(h, HOSTS[i + 1 :], LOSS)
        flaps: list[str] = []
        suspected = 0  # polls that saw a peer suspected (phi >= 4): allowed, reported
        worst_phi = 0.0
        acked: dict[bytes, bytes] = {}
        polls = 0
        with shmkv.connect(st["seeds"], n=3, w=2, r=2, timeout=4.0) as c:
            t_end = time.monotonic() + SECONDS
            i = 0
            next_poll = 0.0
            while time.monotonic() < t_end:
                k, v = b"loss-%d" % i, b"v%d" % i
                try:
                    c.put(k, v)
                    acked[k] = v
                except shmkv.QuorumError:
                    pass  # not applied or unknown: only acknowledged writes are checked
                i += 1
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + 0.25
                    polls += 1
                    for name, a in addrs.items():
                        for peer, view in (status(a).get("members") or {}).items():
                            if peer == name:
                                continue
                            worst_phi = max(worst_phi, float(view.get("phi") or 0.0))
                            suspected += view["state"] == "suspect"
                            if view["state"] == "down":
                                flaps.append(f"{name} held {peer} down at +{SECONDS - (t_end - now):.1f} s")
                time.sleep(0.01)
            net.heal()
            got = c.get_many(list(acked), r=2)
            lost = [k for k, v in acked.items() if got.get(k) != v]
        res.update(polls=polls, writes=i, acked=len(acked), worst_phi=round(worst_phi, 2), suspected=suspected,
                   flaps=flaps[:10], lost=len(lost))
        assert not flaps, res
        assert polls >= SECONDS * 2, res  # the views were really watched all along
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:3]}"
    finally:
        net.heal()
        tc.stop(d, grace=5)
    print("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
