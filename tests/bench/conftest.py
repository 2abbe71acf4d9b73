"""Fixtures of the bench tests: a small backend config, and an adapter set up and torn down."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from bench_helpers import small_config

from shmkv.bench.adapters import Adapter, make


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[Adapter]:
    """The adapter named by the test's parameter, set up; skipped with the adapter's own
    reason when its package or server binary is missing here."""
    a = make(request.param, small_config())
    reason = a.unavailable()
    if reason:
        pytest.skip(reason)
    a.setup()
    try:
        yield a
    finally:
        a.teardown()
