"""A process claiming a member's identity from another address is refused, on routable
addresses (issue 12): three daemons on 10.77.0.x in a private network namespace
(netns_identity.py says what is checked). Skipped, with the reason, where ``unshare -rn``
cannot be had."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shmkv.torture import netns

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WHY = netns.unavailable()
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(WHY is not None, reason=str(WHY))
def test_a_gossip_naming_a_member_from_another_routable_address_is_refused() -> None:
    env = {**os.environ, netns.IN_NETNS_ENV: "1", "PYTHONPATH": str(ROOT)}
    script = Path(__file__).with_name("netns_identity.py")
    r = subprocess.run(["unshare", "-rn", sys.executable, str(script)], env=env, capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    print(res)
    assert res["all_up"] and res["honest_ok"] and "this came from 10.77.0.9" in res["refused"]
