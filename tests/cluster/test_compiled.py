"""The cluster's Cython-built modules (shmkv/cluster/_compiled.py): a built module is used only
while it is not older than its source, SHMKV_PURE_PYTHON=1 imports the sources, and the built
code runs the same protocol as the source: a seeded simulation gives the same run both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shmkv.cluster import _compiled

ROOT = Path(__file__).resolve().parents[2]


def _pair(tmp_path: Path, name: str = "ring") -> tuple[Path, Path]:
    source = tmp_path / f"{name}.py"
    source.write_text("X = 1\n")
    built = tmp_path / f"{name}{_compiled.importlib.machinery.EXTENSION_SUFFIXES[0]}"
    built.write_bytes(b"")
    return source, built


def test_a_built_module_older_than_its_source_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHMKV_PURE_PYTHON", raising=False)
    source, built = _pair(tmp_path)
    os.utime(built, (1_000_000, 1_000_000))
    os.utime(source, (1_000_000 + _compiled.SLACK_S + 1, 1_000_000 + _compiled.SLACK_S + 1))
    assert _compiled.use_source(source, built)
    monkeypatch.setattr(_compiled, "HERE", tmp_path)
    spec = _compiled.SourceIfStale().find_spec(f"{_compiled.PACKAGE}.ring", None)
    assert spec is not None and spec.origin == str(source)


def test_a_fresh_build_is_used_and_pure_python_overrides_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHMKV_PURE_PYTHON", raising=False)
    source, built = _pair(tmp_path)
    os.utime(source, (1_000_000, 1_000_000))
    os.utime(built, (1_000_000 - 1, 1_000_000 - 1))  # an installer's order: within the slack
    assert not _compiled.use_source(source, built)
    monkeypatch.setattr(_compiled, "HERE", tmp_path)
    finder = _compiled.SourceIfStale()
    assert finder.find_spec(f"{_compiled.PACKAGE}.ring", None) is None  # the normal finders: built
    assert finder.find_spec(f"{_compiled.PACKAGE}.daemon", None) is None  # not a compiled module
    assert _compiled.use_source(source, None)  # nothing built
    monkeypatch.setenv("SHMKV_PURE_PYTHON", "1")
    assert _compiled.use_source(source, built)


def _child(code: str, pure: bool) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SHMKV_PURE_PYTHON", None)
    if pure:
        env["SHMKV_PURE_PYTHON"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


IMPORT_ALL = (
    "import importlib, json; from shmkv.cluster import _compiled\n"
    "for m in _compiled.COMPILED: importlib.import_module('shmkv.cluster.' + m)\n"
    "print(json.dumps(_compiled.loaded_compiled()))"
)


def test_every_listed_module_runs_built_after_a_build_and_as_source_when_asked() -> None:
    built = json.loads(_child(IMPORT_ALL, pure=False))
    assert set(built) == set(_compiled.COMPILED)
    if not all(built.values()):
        missing = sorted(m for m, ok in built.items() if not ok)
        if os.environ.get("CI"):  # CI builds them: every one must be in use there
            pytest.fail(f"not running built: {missing}")
        pytest.skip(f"not built here (or edited since the build): {missing}")
    assert not any(json.loads(_child(IMPORT_ALL, pure=True)).values())


@pytest.mark.slow
def test_a_seeded_simulation_runs_the_same_built_and_as_source() -> None:
    code = (
        "from shmkv.torture.simconfig import SimConfig; from shmkv.torture.simulate import run\n"
        "r = run(SimConfig(seed=11, time=1.5, raft=False)); print(r.hash, r.passed)"
    )
    built, source = _child(code, pure=False), _child(code, pure=True)
    assert built == source
    assert built.endswith("True")
