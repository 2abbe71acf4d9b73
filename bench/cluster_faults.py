"""Issue 12's figures from one run: failure detection, hint catch-up and anti-entropy, back to back.

    python bench/cluster_faults.py [--keys 1000000] [--json bench/results/cluster_faults.json]

Runs, one after the other on this machine and in this one invocation (so their figures share
the machine's state), each with its own cluster on 127.0.0.1 stopped by PID at its end:

1. ``bench/cluster_failures.py --rounds 3 --keys 20000``: time to detect a SIGKILLed and a
   SIGSTOPped node, time to be held up again, the hint catch-up rate (keys/s);
2. ``bench/cluster_antientropy.py --keys KEYS --window 5 --limited-window 60``: anti-entropy
   bytes per differing key, the time to repair a wiped replica of KEYS keys, the foreground
   p99 while repair runs against the p99 without.

Writes one JSON with both results, the load average before each part and the start time;
prints the figures the README quotes. ``--keys 30000`` is a few-minute check of the same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _part(script: str, args: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        load = os.getloadavg()[0]
        t0 = time.time()
        subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out)], check=True)
        got: dict[str, Any] = json.loads(out.read_text())
        return {"command": f"python bench/{script} {' '.join(args)}", "load_before": round(load, 2),
                "seconds": round(time.time() - t0, 1), "result": got}
    finally:
        out.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys of the anti-entropy part")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    report["failures"] = _part("cluster_failures.py", ["--rounds", "3", "--keys", "20000"])
    report["antientropy"] = _part("cluster_antientropy.py", ["--keys", str(a.keys), "--window", "5",
                                                             "--limited-window", "60"])
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
