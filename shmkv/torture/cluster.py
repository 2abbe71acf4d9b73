"""What a torture run needs from a cluster: :class:`ClusterUnderTest` and :class:`KVClient`.

The runner, nemesis and workload only speak these two protocols, so the same run drives the
in-process reference cluster (inprocess.py), the real daemons on this machine (local.py, over
tools/cluster.py once ``shmkv serve`` exists), and later the deterministic simulation.

Errors a client raises, and what the history makes of them (workload.py):

- ``shmkv.MaybeApplied``, ``TimeoutError``, a dropped connection (``ConnectionError`` after the
  request was sent): *unknown* -- it may have taken effect;
- ``shmkv.QuorumError`` (not ``MaybeApplied``), a refused connection: *fail* -- not applied.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from ..cluster.versions import Context, VersionSet


class KVClient(Protocol):
    """One client connection; used by one worker thread at a time."""

    def get_versions(self, key: bytes) -> tuple[list[bytes | None], Context]:
        """Every concurrent value (``None``: a concurrent delete; ``[]``: absent) and the context."""
        ...

    def put(self, key: bytes, value: bytes, context: Context | None) -> Context:
        """Write; returns the context of the new version."""
        ...

    def delete(self, key: bytes, context: Context | None) -> Context | None:
        """Delete (a tombstone); returns its context when the cluster tells it."""
        ...

    def incr(self, key: bytes, delta: int) -> int:
        """Add to a counter; returns its value after the increment."""
        ...

    def read_counter(self, key: bytes) -> int:
        ...

    def close(self) -> None: ...


class ClusterUnderTest(Protocol):
    """A cluster a torture run can start, hurt, heal and inspect.

    ``config`` holds at least ``n``, ``w``, ``r`` (and ``sloppy`` when hinted writes count), so
    the checkers know whether the configuration is strict.
    """

    nodes: list[str]
    config: dict[str, Any]

    def start(self) -> None: ...

    def stop(self) -> None:
        """Stop every process this cluster started (also after a failed start)."""
        ...

    def kill(self, node: str) -> None:
        """SIGKILL the node (no chance to flush or say goodbye)."""
        ...

    def restart(self, node: str) -> None:
        """Start a killed node again, with whatever state it kept."""
        ...

    def pause(self, node: str) -> None:
        """SIGSTOP: connections still open, nothing answers."""
        ...

    def resume(self, node: str) -> None:
        """SIGCONT."""
        ...

    def client(self, timeout: float) -> KVClient:
        """A new client whose requests give up after ``timeout`` seconds."""
        ...

    def settle(self, keys: Iterable[bytes]) -> None:
        """After every fault healed: let replicas exchange state (anti-entropy, or a read of
        every key at R = N with read repair) so convergence can be judged."""
        ...

    def final_states(self, keys: Iterable[bytes]) -> dict[str, dict[bytes, VersionSet]]:
        """node -> key -> the VersionSet that node's replica holds (keys it lacks omitted)."""
        ...
