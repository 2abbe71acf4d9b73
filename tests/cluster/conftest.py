"""The ``cluster`` fixture: a factory of real local clusters, each stopped by PID at teardown."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .local_cluster import Start, assert_gone, halt, start


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Start]:
    """``cluster(nodes=3, **tools_cluster_start_kwargs)`` -> state; every cluster started is
    stopped, and checked gone, when the test ends (pass or fail)."""
    dirs: list[Path] = []

    def start_one(nodes: int = 3, **kw: Any) -> dict[str, Any]:
        d = tmp_path / f"c{len(dirs)}"
        dirs.append(d)
        return start(d, nodes, **kw)

    yield start_one
    for d in dirs:  # all stopped before any is checked, so one failed check stops no other
        halt(d)
    for d in dirs:
        assert_gone(d)
