"""A real etcd server for the tests of ``--config etcd://`` (Debian's ``etcd-server`` package).

One single-member etcd on 127.0.0.1 with a temporary data dir and free ports, started and
stopped by PID (SIGTERM, SIGKILL after a grace). ``restart()`` brings it back on the same ports
and data dir, as an operator's restart would. :func:`need_etcd` skips a test, naming what is
missing, where the binary or the Python client cannot be had (CI installs both: .ci/run).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .local_cluster import tc

free_ports = tc.free_ports  # one port picker (tools/cluster.py) for the daemons and etcd


def need_etcd() -> str:
    """The etcd binary's path; skips the test when etcd or aetcd is missing."""
    path = shutil.which("etcd")
    if path is None:
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    if importlib.util.find_spec("aetcd") is None:
        pytest.skip("the aetcd client is not installed (pip install 'shmkv[etcd]')")
    return path


class EtcdServer:
    def __init__(self, data_dir: Path) -> None:
        self.binary = need_etcd()
        self.data_dir = data_dir
        self.client_port, self.peer_port = free_ports(2)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.with_suffix(".log")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def url(self, prefix: str = "") -> str:
        return f"etcd://{self.endpoint}{prefix}"

    def start(self, timeout: float = 15.0) -> None:
        assert self.proc is None
        client, peer = f"http://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{self.peer_port}"
        cmd = [self.binary, "--name", "shmkvtest", "--data-dir", str(self.data_dir),
               "--listen-client-urls", client, "--advertise-client-urls", client,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"shmkvtest={peer}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # up: the client port takes connections
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited ({self.proc.returncode}): {self.log.read_text()[-600:]}")
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", self.client_port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not listen on {self.endpoint} within {timeout:g} s")

    def stop(self, grace: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()
