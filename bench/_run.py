"""Shared by the bench scripts: run shmkv-bench with a scenario's args; load tools/cluster.py.

The scripts import shmkv as installed (``pip install -e '.[bench]'``, as CI does); on a source
tree with the extension built in place and nothing installed, run them with ``PYTHONPATH=.``.
The one sys.path change in bench/ is :func:`repo_import`'s, for the test helpers a bench
borrows; tools/ is loaded by path (:func:`cluster_tool`).

Arguments given to a scenario script come after the scenario's own, so they override them
(``python bench/session_cache.py --duration 10 --json out.json``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def run(scenario_args: list[str]) -> None:
    from shmkv.bench.cli import main

    user = sys.argv[1:]
    if "--ops" in user and "--duration" in scenario_args:  # an op count replaces the duration
        i = scenario_args.index("--duration")
        scenario_args = scenario_args[:i] + scenario_args[i + 2 :]
    main([*scenario_args, *user], prog_name=f"python {sys.argv[0]}")


def repo_import(name: str) -> ModuleType:
    """A module of the repository that is not part of the package (``tests.cluster.etcd_server``),
    imported as a package module so that its relative imports work: the root goes on sys.path."""
    import importlib

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(name)


def cluster_tool() -> ModuleType:
    """tools/cluster.py (start/stop a local cluster) as a module; tools/ is not a package."""
    spec = importlib.util.spec_from_file_location("shmkv_tools_cluster_bench", ROOT / "tools" / "cluster.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
