"""The body of test_identity_netns.py, run inside a private network namespace (``unshare -rn``;
the test starts it). Not collected by pytest: it asserts as it goes and prints ``RESULT <json>``.

Routable addresses, not loopback ones: the namespace's only device, lo, gets 10.77.0.2-4 and
10.77.0.9 as global addresses (they exist only in this namespace; this kernel has no dummy
interfaces). Three ``shmkv serve`` daemons listen on 10.77.0.2-4, so each
binds its outgoing connections to its own address (transport.pinned_source). Checked: the
three see each other up (the binding works with routable addresses), and a GOSSIP naming n2
sent from 10.77.0.9 -- a fourth host claiming a member's identity -- is refused naming both
addresses, while the same message from n2's own address is taken.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from typing import Any

from shmkv.cluster import wire
from shmkv.cluster.transport import TcpTransport, run
from shmkv.cluster.wire import BadRequest, Message
from shmkv.torture.local import _tools

HOSTS = ["10.77.0.2", "10.77.0.3", "10.77.0.4"]
INTRUDER = "10.77.0.9"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def ask(addr: str, msg: Message, source: str | None = None) -> Message:
    async def go() -> Message:
        t = TcpTransport(source=source)
        try:
            return wire.raise_for_error(await t.request(addr, msg, 5.0))
        finally:
            await t.close()

    return run(go())


def main() -> int:
    ip("link", "set", "lo", "up")
    for h in [*HOSTS, INTRUDER]:
        ip("addr", "add", f"{h}/24", "dev", "lo")
    tc = _tools()
    d = tempfile.mkdtemp(prefix="shmkv-idnet-")
    res: dict[str, Any] = {}
    st = tc.start(3, d, n=3, w=2, r=2, size="16MiB", join_timeout=20.0, hosts=HOSTS,
                  extra=["--gossip-interval", "0.2"])
    try:
        nodes = {n["name"]: n["addr"] for n in st["nodes"]}
        deadline = time.monotonic() + 20
        while True:
            views = {name: ask(a, Message(wire.STATUS, 0, {})).fields["status"].get("members") or {}
                     for name, a in nodes.items()}
            if all(sum(v["state"] == "up" for p, v in view.items() if p != name) == 2
                   for name, view in views.items()):
                break
            assert time.monotonic() < deadline, f"the members did not see each other up: {views}"
            time.sleep(0.2)
        res["all_up"] = True
        now_ms = int(time.time() * 1000)
        forged = Message(wire.GOSSIP, 0, {"from": "n2", "view": [["n2", now_ms - 1000, 1]]})
        try:
            ask(nodes["n1"], forged, source=INTRUDER)
            raise AssertionError("a GOSSIP naming n2 from another address was taken")
        except BadRequest as e:
            assert f"n2 connects from {HOSTS[1]}, this came from {INTRUDER}" in str(e), e
            res["refused"] = str(e)
        honest = ask(nodes["n1"], forged, source=HOSTS[1])  # n2's own address: taken
        res["honest_ok"] = honest.code == wire.OK
        assert res["honest_ok"]
    finally:
        tc.stop(d, grace=5)
    print("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
