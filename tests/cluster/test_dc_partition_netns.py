"""A real network partition between two data centres: 4 daemons in a private network namespace,
nftables cutting the DCs apart (netns_dc_partition.py says what is checked). Skipped, with the
reason, where ``unshare -rn`` or nft cannot be had (CI installs nftables)."""

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
def test_a_partition_between_dcs_keeps_local_quorum_fails_each_quorum_fast_and_heals() -> None:
    env = {**os.environ, netns.IN_NETNS_ENV: "1", "PYTHONPATH": str(ROOT)}
    script = Path(__file__).with_name("netns_dc_partition.py")
    r = subprocess.run(["unshare", "-rn", sys.executable, str(script)], env=env, capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    print(res)
    assert res["each_quorum_worst_s"] < 0.5
    assert res["ae_repaired"] >= 40
