"""A peer daemon for transport tests, in its own process (so it can be SIGKILLed / SIGSTOPped).

    python tests/cluster/peer_proc.py HOST:PORT     prints the bound address, then serves

Handler: PING -> OK {"pid": pid}; GET -> OK {"value": key}, after sleeping float(key.split(b":")[1])
seconds when the key starts with b"sleep:"; anything else -> ERR_BAD_REQUEST.
"""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from shmkv.cluster import wire  # noqa: E402
from shmkv.cluster.transport import TcpTransport  # noqa: E402
from shmkv.cluster.wire import BadRequest, Message  # noqa: E402


async def handler(msg: Message) -> Message:
    if msg.code == wire.PING:
        return Message(wire.OK, 0, {"pid": os.getpid()})
    if msg.code == wire.GET:
        key = msg.fields["key"]
        if key.startswith(b"sleep:"):
            await asyncio.sleep(float(key.split(b":")[1]))
        return Message(wire.OK, 0, {"value": key, "pid": os.getpid()})
    raise BadRequest(f"peer_proc does not handle {wire.NAMES[msg.code]}")


async def main(addr: str) -> None:
    t = TcpTransport()
    bound = await t.serve(addr, handler)
    print(bound, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
