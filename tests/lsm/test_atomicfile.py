"""atomicfile.py: the write-temp, fsync, publish, fsync-directory shape of MANIFEST and STORE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shmkv.lsm import atomicfile


def test_replace_publishes_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "MANIFEST"
    atomicfile.replace(str(p), b"one")
    atomicfile.replace(str(p), b"two" * 1000)
    assert p.read_bytes() == b"two" * 1000
    assert os.listdir(tmp_path) == ["MANIFEST"]


def test_a_failed_replace_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    p = tmp_path / "MANIFEST"
    atomicfile.replace(str(p), b"old")
    blocker = tmp_path / "dir"
    (blocker / "x").mkdir(parents=True)  # a non-empty directory: rename over it fails
    with pytest.raises(OSError):
        atomicfile.replace(str(blocker), b"new")
    assert p.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["MANIFEST", "dir"]  # no dir.<pid>.tmp left


def test_write_synced_truncates(tmp_path: Path) -> None:
    p = tmp_path / f"STORE.{os.getpid()}.tmp"
    assert atomicfile.tmp_path(str(tmp_path / "STORE")) == str(p)
    atomicfile.write_synced(str(p), b"long content")
    atomicfile.write_synced(str(p), b"short")
    assert p.read_bytes() == b"short"
