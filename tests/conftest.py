"""Shared fixtures: a fresh store name per test, removed afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

import shmkv


@pytest.fixture
def name() -> Iterator[str]:
    n = f"t{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield n
    try:
        shmkv.unlink(n)
    except shmkv.StoreNotFound:
        pass


@pytest.fixture
def kv(name: str) -> Iterator[shmkv.Store]:
    store = shmkv.attach(name, size="16MiB")
    yield store
    store.close()
