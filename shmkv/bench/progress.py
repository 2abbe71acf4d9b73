"""The live progress line on stderr.

On a terminal one line is rewritten in place (``\\r``) a few times a second: backend, process
count, repeat, elapsed of planned seconds, keys so far and the running ops/s. Elsewhere (CI logs,
pipes) there is no rewriting: one line per finished cell run, so a log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class LineProgress:
    """Implements ``runner.Progress``."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._what = ""
        self._last = 0.0
        self._width = 0

    def begin(self, backend: str, procs: int, repeat: int, repeats: int) -> None:
        rep = f" run {repeat}/{repeats}" if repeats > 1 else ""
        self._what = f"{backend:<10} {procs} proc{'s' if procs > 1 else ' '}{rep}"
        self._last = 0.0
        if self.live:
            self._write(f"{self._what}  starting workers...")

    def update(self, keys_done: int, elapsed: float, planned: float | None) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        of = f"/{planned:.1f}" if planned else ""
        rate = keys_done / elapsed if elapsed > 0 else 0.0
        self._write(
            f"{self._what}  {elapsed:4.1f}{of} s  {keys_done:>12,} ops  {rate:>12,.0f} ops/s"
        )

    def end(self, ops_per_s: float) -> None:
        line = f"{self._what}  {ops_per_s:>12,.0f} ops/s"
        if self.live:
            self._write(line)
            self.stream.write("\n")
            self._width = 0
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        if self.live and self._width:
            self.stream.write("\n")
            self._width = 0
        self.stream.write(message + "\n")
        self.stream.flush()

    def _write(self, text: str) -> None:
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)
