"""Run one of the ``netns_*.py`` scripts in a private network namespace (``unshare -rn``) and
read the ``RESULT <json>`` line it prints last -- the part the netns tests share. Not collected
by pytest (no ``test_`` prefix)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from shmkv.torture import netns

ROOT = Path(__file__).resolve().parents[2]
#: why the netns tests cannot run here (None: they can); they skip with it
WHY = netns.unavailable()


def run_script(name: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """``tests/cluster/NAME`` inside ``unshare -rn``; its RESULT. Fails the test on a non-zero
    exit, showing the ends of its output."""
    env = {**os.environ, netns.IN_NETNS_ENV: "1", "PYTHONPATH": str(ROOT)}
    script = Path(__file__).with_name(name)
    r = subprocess.run(["unshare", "-rn", sys.executable, str(script), *args], env=env,
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    res: dict[str, Any] = json.loads(line[len("RESULT "):])
    print(res)
    return res
