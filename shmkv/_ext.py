"""The compiled extensions, imported in one place so that a missing build says what to do.

The usual way to meet it: `pip install .` (which builds into site-packages), then Python run
from the repository root, where the source tree -- with no compiled files in it -- shadows the
installed package; a bare "cannot import name '_core'" would not say so.
"""

from __future__ import annotations

import os

try:
    from . import _core
    from .lsm import _accel  # noqa: F401 - the disk tier's extension (attach(path=...))
except ImportError as _e:
    _here = os.path.dirname(os.path.abspath(__file__))
    raise ImportError(
        f"shmkv's compiled extensions (shmkv._core, shmkv.lsm._accel) are not built in {_here}. "
        "If you run Python from the shmkv source tree, that tree shadows the installed "
        "package: build it in place (`pip install -e .` or `python setup.py build_ext "
        "--inplace`), or run from another directory. Otherwise reinstall shmkv with pip "
        f"(it needs a C compiler). ({_e})"
    ) from _e

__all__ = ["_core"]
