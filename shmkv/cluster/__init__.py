"""The federation: a Dynamo-style cluster of shmkv daemons (see DESIGN.md, "The federation").

Two floors. The pure floor decides -- ring, placement, versions, counters, quorum tally -- and
takes messages and time as arguments, doing no I/O; the asyncio floor above it (transport,
coordinator, daemon) drives it. Import the pure modules directly (``shmkv.cluster.ring``...);
this package re-exports only the errors so ``import shmkv.cluster`` stays cheap.
"""

from __future__ import annotations

from . import _compiled

_compiled.install()  # before any submodule is imported: a stale built module is never used

from .errors import (  # noqa: E402
    ClusterError,
    ConfigError,
    Conflict,
    MaybeApplied,
    ProtocolError,
    QuorumError,
    WrongEpoch,
)

__all__ = [
    "ClusterError",
    "ConfigError",
    "Conflict",
    "MaybeApplied",
    "ProtocolError",
    "QuorumError",
    "WrongEpoch",
]
