"""A node's identity and the cluster defaults it was started with (``Config``): what the
coordinator serves by and membership checks joining peers against. Its own module so both import
it and neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .levels import Level

#: The replica timeout when a request names none (seconds).
DEFAULT_TIMEOUT = 1.0


@dataclass
class Config:
    """This node's identity and the cluster defaults it was started with."""

    name: str
    addr: str
    weight: float = 1.0
    n: int = 3
    #: default write acks / read answers: a count or a consistency level (levels.py)
    w: Level = 2
    r: Level = 2
    timeout: float = DEFAULT_TIMEOUT
    #: strict quorums by default: only primaries' acks count toward W (no hinted fallbacks)
    strict: bool = False
    #: this node's data centre (None: the one implicit DC)
    dc: str | None = None
    #: the replication map (--n-per-dc): replicas per key in each DC; N is its sum. None: the
    #: plain ring walk (ring.py)
    n_per_dc: dict[str, int] | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "addr": self.addr,
            "weight": float(self.weight),
            "n": self.n,
            "w": self.w,
            "r": self.r,
        }
        # Only when set: a cluster without DCs answers STATUS exactly as before.
        if self.dc is not None:
            out["dc"] = self.dc
        if self.n_per_dc is not None:
            out["n_per_dc"] = dict(self.n_per_dc)
        return out
