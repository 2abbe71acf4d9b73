"""Real local clusters for the tests: tools/cluster.py loaded once, and the one way a test starts
a cluster on 127.0.0.1 and stops it by PID (a module, not conftest, so tests can import it; the
``cluster`` fixture in conftest.py is built on it).

:func:`start` stops whatever it recorded if the start fails; :func:`halt` resumes any node a
failed test left SIGSTOPped and stops every node by its recorded pid (tools/cluster.py ``stop``:
SIGTERM, wait, SIGKILL after the grace, leftover segments removed); :func:`assert_gone` checks
that no recorded node or worker process is left; :func:`stop` is both. :func:`eventually`,
:func:`poll` and :func:`run_threads` are the bounded retries and the thread pool the tests
share; :func:`cli` runs ``python -m shmkv.cli``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("shmkv_tools_cluster", ROOT / "tools" / "cluster.py")
assert _spec is not None and _spec.loader is not None
tc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tc)

Start = Callable[..., dict[str, Any]]

GRACE = 5.0  # seconds a node gets to exit on SIGTERM before its SIGKILL


def start(d: Path, nodes: int = 3, **kw: Any) -> dict[str, Any]:
    """``tools/cluster.py start`` of ``nodes`` nodes in ``d``; the state, with ``state["dir"]``."""
    try:
        state = tc.start(nodes, d, join_timeout=20.0, **kw)
    except BaseException:
        tc.stop(d, grace=GRACE)
        raise
    state["dir"] = d
    return state


def _recorded(d: Path) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = json.loads((d / "cluster.json").read_text())["nodes"]
    return nodes


def halt(d: Path) -> None:
    """Resume any node a failed test left SIGSTOPped, then stop every node of ``d`` by PID."""
    for node in _recorded(d):
        if tc._alive(node):
            os.kill(node["pid"], signal.SIGCONT)  # a test that failed while they were stopped
    tc.stop(d, grace=GRACE)


def assert_gone(d: Path) -> None:
    """Every supervisor of ``d`` and every worker it ever had is gone."""
    for node in _recorded(d):
        assert not tc._alive(node), node
        assert tc.workers_alive(node) == [], node


def stop(d: Path) -> None:
    """:func:`halt`, then :func:`assert_gone`."""
    halt(d)
    assert_gone(d)


def eventually(check: Callable[[], T], retry_on: type[BaseException] | tuple[type[BaseException], ...],
               timeout: float = 10.0, every: float = 0.1) -> T:
    """``check()``'s result once it stops raising ``retry_on`` (bounded: after ``timeout``
    seconds its error is raised)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except retry_on:
            if time.monotonic() >= deadline:
                raise
            time.sleep(every)


def poll(what: str, fn: Callable[[], T], within: float = 30.0, every: float = 0.1) -> T:
    """``fn()``'s first truthy result, polled every ``every`` seconds (bounded: after ``within``
    seconds an AssertionError names ``what`` and the last result)."""
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what} not within {within:g} s (last: {last!r})")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m shmkv.cli ARGS`` from the repository root (a minute at most)."""
    return subprocess.run([sys.executable, "-m", "shmkv.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def run_threads(work: Callable[[int], None], count: int, timeout: float = 60.0) -> list[BaseException]:
    """``work(i)`` in ``count`` threads at once; what they raised (the test asserts it empty)."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as e:  # noqa: BLE001 -- handed to the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a worker thread did not finish"
    return errors
