"""Private redis-server and memcached processes on a free 127.0.0.1 port, always stopped.

A :class:`Server` is a context manager: ``start()`` returns only once the server answers its
protocol's ping; ``stop()`` (also from ``__exit__``, ``atexit`` and after Ctrl-C) terminates it,
waits, and kills it if it lingers. Servers get their own session, so the terminal's Ctrl-C
reaches only the benchmark, which then stops them in order; on Linux they also get
``PR_SET_PDEATHSIG``, so a benchmark killed with SIGKILL does not leave them running.

Persistence is off (Redis: no RDB, no AOF) and they listen on loopback only.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO

from shmkv.bench.stats import percentile

READY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover -- runs in the child before exec
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _ask(port: int, request: bytes, timeout: float = 0.5) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        return s.recv(4096)


class ServerError(RuntimeError):
    """The server binary is missing or did not come up (the message has its log's tail)."""


class Server:
    """Base: subclasses give ``binary``, ``args(port)`` and the ping exchange."""

    binary = ""
    ping = b""
    pong = b""
    # How stop() ends it first (then SIGKILL after STOP_TIMEOUT).
    stop_signal = signal.SIGTERM

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._dir: str | None = None

    @classmethod
    def which(cls) -> str | None:
        return shutil.which(cls.binary)

    def args(self, port: int) -> list[str]:
        raise NotImplementedError

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Server:
        """Start and wait until it answers. :raises ServerError: missing binary or no answer."""
        if self.which() is None:
            raise ServerError(f"{self.binary} not found on PATH")
        self._dir = tempfile.mkdtemp(prefix=f"shmkv-bench-{self.binary}-")
        last = ""
        for _ in range(3):  # a port taken between free_port() and bind() is retried
            self.port = free_port()
            self._log = open(os.path.join(self._dir, "log"), "w+b")  # closed in stop()
            self.proc = subprocess.Popen(
                self.args(self.port),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # runs between fork and exec
            )
            atexit.register(self.stop)
            if self._wait_ready():
                return self
            last = self._log_tail()
            self._stop_process()
        self.stop()
        raise ServerError(f"{self.binary} did not start: {last or 'no output'}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                if _ask(self.port, self.ping).startswith(self.pong):
                    return True
            time.sleep(0.02)
        return False

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:])

    def _stop_process(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            atexit.unregister(self.stop)
            if proc.poll() is None:
                proc.send_signal(self.stop_signal)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        """Terminate (then kill) the server and remove its directory. Idempotent."""
        self._stop_process()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer(Server):
    """``redis-server`` without persistence; with ``maxmemory`` set, evicting allkeys-lru."""

    binary = "redis-server"
    ping = b"PING\r\n"
    pong = b"+PONG"

    def __init__(self, maxmemory: int | None = None) -> None:
        super().__init__()
        self.maxmemory = maxmemory

    def args(self, port: int) -> list[str]:
        a = [
            self.binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        if self.maxmemory:
            a += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", "allkeys-lru"]
        return a


class MemcachedServer(Server):
    """``memcached -m MB`` on loopback, TCP only, default threads (4) as users run it."""

    binary = "memcached"
    ping = b"version\r\n"
    pong = b"VERSION"
    # It holds nothing worth a clean exit, and on SIGTERM it waits for its 1 s clock tick.
    stop_signal = signal.SIGKILL

    def __init__(self, memory_mb: int = 64) -> None:
        super().__init__()
        self.memory_mb = memory_mb

    def args(self, port: int) -> list[str]:
        a = [self.binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", str(self.memory_mb)]
        if os.geteuid() == 0:
            a += ["-u", "root"]  # memcached refuses to run as root without it
        return a


def ping_rtt_us(port: int, ping: bytes, pong: bytes, n: int = 500) -> float:
    """Median round trip in µs of ``n`` raw protocol pings on one TCP connection (no client
    library): the floor under every op of a server peer on this machine."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            s.sendall(ping)
            if not s.recv(256).startswith(pong):
                raise ServerError(f"unexpected reply to {ping!r}")
            samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return percentile(samples, 50) / 1000.0


def server_version(binary: str) -> str:
    """``redis-server --version`` / ``memcached --version``, first line, or ``""``."""
    path = shutil.which(binary)
    if not path:
        return ""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    line = out.stdout.decode(errors="replace").strip().splitlines()[0] if out.stdout else ""
    m = re.search(r"\bv=(\S+)", line)  # redis: "Redis server v=7.0.15 sha=... malloc=..."
    return f"{binary} {m.group(1)}" if m else line
