"""Errors of the federation (shmkv/cluster/). All derive from :class:`shmkv.Error`.

Contract kept by every raiser: the message names the problem and the numbers behind it (how many
replicas answered, which epoch was expected), so a log line is enough to tell what happened.

The one distinction users must never lose: :class:`QuorumError` means the write (or read) was
*not* performed by enough replicas and nothing was reached that we know of; :class:`MaybeApplied`
means some replica acknowledged but fewer than W did before the deadline -- the write may be
visible later (and may even reach W by itself through handoff or anti-entropy), so retrying it is
the caller's call. A timed-out write is never reported as simply "failed".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import Error, InvalidArgument


class ClusterError(Error):
    """Base class of the federation's errors."""


class QuorumError(ClusterError):
    """Fewer than W (writes) or R (reads) replicas answered; the message says how many.

    ``needed`` is W or R, ``answered`` how many replicas answered in time, ``n`` the replica count.
    """

    def __init__(self, message: str, *, needed: int = 0, answered: int = 0, n: int = 0) -> None:
        super().__init__(message)
        self.needed = needed
        self.answered = answered
        self.n = n


class MaybeApplied(QuorumError):
    """A write reached some replicas (0 < acks < W) but not W before its deadline.

    It *may have been applied*: a later read can see it. It derives from :class:`QuorumError`
    so ``except QuorumError`` still sees every quorum shortfall, but its type and message say
    what a plain failure would hide.
    """


class Conflict(ClusterError):
    """A read found concurrent versions (siblings) and no ``resolve=`` function was given.

    ``values`` are all concurrent values (``None`` stands for a concurrent delete); ``context``
    is the opaque causal context to pass back with the resolved ``put``/``delete``.
    """

    def __init__(
        self, message: str, *, values: Sequence[bytes | None] = (), context: Any = None
    ) -> None:
        super().__init__(message)
        self.values = list(values)
        self.context = context


class ProtocolError(ClusterError, ValueError):
    """A frame or an encoded version/counter is malformed, oversized or of an unknown version."""


class WrongEpoch(ClusterError):
    """The request was routed with a ring configuration other than the node's.

    ``expected`` is the node's epoch, ``got`` the request's; the client refreshes its ring.
    """

    def __init__(self, message: str, *, expected: int = 0, got: int = 0) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got


class ConfigError(ClusterError, InvalidArgument):
    """A cluster configuration or request parameter is invalid: N > nodes, W or R > N, an epoch
    that does not grow, a duplicate member name, a non-positive weight... The message names it.
    Also a :class:`shmkv.InvalidArgument`, so ``except ValueError`` sees it too."""


class ConcurrentChange(ConfigError):
    """A configuration change lost a race: the configuration it was checked against (its epoch)
    was changed by another before it could commit (``--config etcd://``'s compare-and-swap,
    etcd_kv.py). Nothing was changed by this one; checking it again and retrying is safe.
    ``current``: the configuration's encoded value at the time, when known."""

    current: bytes | None = None


__all__ = [
    "ClusterError",
    "QuorumError",
    "MaybeApplied",
    "Conflict",
    "ProtocolError",
    "WrongEpoch",
    "ConfigError",
    "ConcurrentChange",
]
