"""Which cluster modules are also built by Cython, and when their built form is used.

The modules in :data:`COMPILED` are plain Python, and setup.py also compiles each into a
C extension of the same name (Cython, pure-Python mode: the source is not changed, only its
bytecode dispatch goes) -- the daemon's and the client's path of every request, where the
interpreter is most of the CPU (README, Development: "Compiled cluster modules"). Python's import
system prefers an extension module to the ``.py`` beside it, so a built module would shadow
every later edit of its source in an editable install (a ``git checkout``, a fix being
tried). :class:`SourceIfStale` prevents that:

Invariant: a built module is imported only if it was built after its source last changed
(its file is not older than the ``.py`` by more than :data:`SLACK_S`, which absorbs an
installer writing the two files in either order); otherwise, and whenever
``SHMKV_PURE_PYTHON=1`` is set, the ``.py`` is imported -- the same code, slower, never
stale. A build with ``SHMKV_PURE_PYTHON=1`` compiles none of them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

#: the modules setup.py compiles (names inside shmkv.cluster): a request's path
COMPILED = (
    "antientropy",
    "client",
    "coordinator",
    "crdt",
    "failure_detector",
    "levels",
    "merkle",
    "placement",
    "quorum",
    "replica",
    "resp",
    "resp_server",
    "ring",
    "sync_transport",
    "transport",
    "versions",
    "wire",
)

#: seconds a built module may be older than its source and still count as built from it
SLACK_S = 2.0

PACKAGE = __name__.rpartition(".")[0]
HERE = Path(__file__).resolve().parent
log = logging.getLogger("shmkv.cluster")


def pure_python() -> bool:
    """``SHMKV_PURE_PYTHON=1``: import (and build) the sources only."""
    return os.environ.get("SHMKV_PURE_PYTHON", "") not in ("", "0")


def built_file(name: str, directory: Path) -> Path | None:
    """The extension module built for ``name`` in ``directory``, if any."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = directory / f"{name}{suffix}"
        if p.exists():
            return p
    return None


def use_source(source: Path, built: Path | None) -> bool:
    """Whether to import ``source`` rather than ``built``: no built module, the built one
    older than the source (stale), or pure Python asked for."""
    if built is None or pure_python():
        return True
    try:
        return source.stat().st_mtime > built.stat().st_mtime + SLACK_S
    except FileNotFoundError:  # one of them vanished meanwhile: the normal finders decide
        return False


def loaded_compiled() -> dict[str, bool]:
    """For each module of :data:`COMPILED` already imported: whether it runs compiled."""
    out = {}
    for name in COMPILED:
        mod = sys.modules.get(f"{PACKAGE}.{name}")
        if mod is not None:
            out[name] = isinstance(getattr(mod, "__loader__", None), importlib.machinery.ExtensionFileLoader)
    return out


class SourceIfStale(importlib.abc.MetaPathFinder):
    """Answers only for :data:`COMPILED`: a spec of the ``.py`` when :func:`use_source` says
    so (logging a stale build once), else nothing (the normal finders load the built one)."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        pkg, _, name = fullname.rpartition(".")
        if pkg != PACKAGE or name not in COMPILED:
            return None
        source = HERE / f"{name}.py"
        built = built_file(name, HERE)
        if not source.exists() or not use_source(source, built):
            return None
        if built is not None and not pure_python() and name not in self._warned:
            self._warned.add(name)
            log.warning("%s: %s is older than %s; importing the source (rebuild: "
                        "python setup.py build_ext --inplace)", fullname, built.name, source.name)
        return importlib.util.spec_from_file_location(fullname, source)


def install() -> None:
    """Put :class:`SourceIfStale` first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, SourceIfStale) for f in sys.meta_path):
        sys.meta_path.insert(0, SourceIfStale())
