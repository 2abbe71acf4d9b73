"""The maintenance helper: a child process that flushes and compacts for one LSM handle.

Why a process: flushes and compactions are CPU work in Python objects; run in a thread of the
writing process they take its GIL, and a writer waits for them on the other core's behalf
(LevelDB compacts on another core). The store's maintenance protocol already lets *any*
process do the work (whoever holds the ``LOCK`` flock; every step crash-safe, see db.py), so
the helper is simply one more process that opens the store and does it.

This module is the parent's side (:class:`Helper`, used by maintenance.py); the child's
program is helper_main.py, which opens the store like any other process (so it imports db.py,
and nothing here does: imports run one way).

Protocol (``helper_main.main(<path>, <json options>)`` in a child Python): the parent writes
one line per round ("go"); the helper runs one maintenance round (``LSM.maintain``:
non-blocking, skipped if another process is at it) and answers one line, "ok" or "error
<text>". EOF on stdin -- the handle was closed,
or the parent died -- ends the helper after the round in progress. A helper killed at any
point leaves what a killed maintainer leaves: nothing the next one cannot finish.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import IO, Any

_SHMKV_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Helper:
    """The parent's side: start lazily, one round at a time, stop on close."""

    def __init__(self, path: str, options: dict[str, Any]) -> None:
        self.path = path
        self.options = options
        self._p: subprocess.Popen[bytes] | None = None
        self.executable = sys.executable  # may be empty or not a Python (embedded interpreters)
        self.exits = 0  # rounds in a row that ended with the helper gone: it cannot run here?
        self._start_lock = threading.Lock()  # the writer and the maintenance thread may race

    def _start(self) -> subprocess.Popen[bytes]:
        # The helper must run this very shmkv (not one the working directory or PYTHONPATH
        # happens to offer): put the tree that holds our package first on its path.
        boot = (
            f"import sys; sys.path.insert(0, {_SHMKV_ROOT!r}); "
            "from shmkv.lsm.helper_main import main; sys.exit(main(sys.argv[1:]))"
        )
        return subprocess.Popen(
            [self.executable, "-c", boot, self.path, json.dumps(self.options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )

    @property
    def pid(self) -> int | None:
        return self._p.pid if self._p is not None else None

    def ensure_started(self) -> subprocess.Popen[bytes]:
        """Start the helper if it is not running (it needs ~0.1 s to import before its first
        round: the writer calls this at half a memtable, so the first round does not wait)."""
        with self._start_lock:
            p = self._p
            if p is not None and p.poll() is not None:  # died (killed?): drop its pipes
                _close_quiet(p.stdin)
                _close_quiet(p.stdout)
                p = None
            if p is None:
                p = self._p = self._start()
            return p

    def round(self) -> str | None:
        """Run one maintenance round in the helper; None when it went fine, else the error.
        A helper that died is restarted on the next round."""
        try:
            p = self.ensure_started()
        except OSError as e:  # no such executable, no processes left, ...
            self.exits += 1
            return f"cannot start the maintenance helper: {e}"
        assert p.stdin is not None and p.stdout is not None
        try:
            p.stdin.write(b"go\n")
            p.stdin.flush()
            line = p.stdout.readline()  # blocks without the GIL: the writer keeps running
        except OSError as e:
            line = f"error helper pipe: {e}".encode()
        if not line:
            self._reap()
            self.exits += 1
            return "maintenance helper exited"
        self.exits = 0
        text = line.decode(errors="replace").strip()
        return None if text == "ok" else text.removeprefix("error ")

    def _reap(self) -> None:
        p, self._p = self._p, None
        if p is not None:
            _close_quiet(p.stdin)
            _close_quiet(p.stdout)
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop(self) -> None:
        """EOF to the helper, then wait for it to finish the round it may be in."""
        self._reap()

    def abandon_in_child(self) -> None:
        """After fork: drop the child's copies of the pipes (else the helper would not see EOF
        when the parent closes), without touching the parent's helper."""
        p, self._p = self._p, None
        if p is not None:
            for f in (p.stdin, p.stdout):
                if f is not None:
                    try:
                        os.close(f.fileno())
                    except (OSError, ValueError):
                        pass


def _close_quiet(f: IO[bytes] | None) -> None:
    if f is not None:
        try:
            f.close()
        except OSError:
            pass
