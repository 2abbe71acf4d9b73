"""Shared by the scenario scripts: find shmkv, then run shmkv-bench with the scenario's args.

Arguments given to a script come after the scenario's own, so they override them
(``python bench/session_cache.py --duration 10 --json out.json``).
"""

from __future__ import annotations

import os
import sys


def run(scenario_args: list[str]) -> None:
    try:
        import shmkv.bench  # noqa: F401 -- installed (pip install '.[bench]')
    except ImportError:  # a source tree with the extension built in place
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from shmkv.bench.cli import main

    user = sys.argv[1:]
    if "--ops" in user and "--duration" in scenario_args:  # an op count replaces the duration
        i = scenario_args.index("--duration")
        scenario_args = scenario_args[:i] + scenario_args[i + 2 :]
    main([*scenario_args, *user], prog_name=f"python {sys.argv[0]}")
