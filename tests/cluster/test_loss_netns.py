"""1 % packet loss between real daemons causes no flapping (issue 12): 3 daemons in a private
network namespace, nftables dropping 1 % of every node-to-node packet for 30 s
(netns_loss.py says what is checked). Skipped, with the reason, where ``unshare -rn`` or nft
cannot be had (CI installs nftables)."""

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
def test_one_percent_loss_between_daemons_convicts_no_one_and_loses_nothing() -> None:
    env = {**os.environ, netns.IN_NETNS_ENV: "1", "PYTHONPATH": str(ROOT)}
    script = Path(__file__).with_name("netns_loss.py")
    r = subprocess.run(["unshare", "-rn", sys.executable, str(script)], env=env, capture_output=True,
                       text=True, timeout=150, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    print(res)
    assert res["flaps"] == [] and res["lost"] == 0 and res["acked"] > 100
