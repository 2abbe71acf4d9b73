"""Fixtures and helpers for the LSM tests: small shapes so flushes and compactions happen often,
and a way to start workers (tests/lsm/workers.py) as real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import shmkv
from shmkv.lsm import LSM, LevelOptions

WORKERS = str(Path(__file__).with_name("workers.py"))
# The tree that holds the shmkv being tested (a checkout or site-packages).
SHMKV_ROOT = str(Path(shmkv.__file__).resolve().parent.parent)

# Tiny levels: L0 compacts at 2 tables, L1 holds 16 KiB, tables are 4 KiB.
SMALL = LevelOptions(l0_trigger=2, l1_bytes=16 << 10, multiplier=4, target_file_bytes=4 << 10)


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SHMKV_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def spawn(role: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, WORKERS, role, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
        **kw,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "db")


@pytest.fixture
def open_db(db_path: str) -> Iterator[Callable[..., LSM]]:
    """``open_db(**kw)`` opens the test's store (small shape, durability "none" by default);
    every handle opened this way is closed at teardown."""
    handles: list[LSM] = []

    def _open(**kw: object) -> LSM:
        opts: dict[str, object] = {
            "durability": "none",
            "memtable_bytes": 4096,
            "levels": SMALL,
            "background": False,  # deterministic: flushes happen inside the put that is due
        }
        opts.update(kw)
        db = LSM(db_path, **opts)  # type: ignore[arg-type]
        handles.append(db)
        return db

    yield _open
    for h in handles:
        h.close()
