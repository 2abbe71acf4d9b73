"""Placement: which nodes hold a key's replicas, given the ring and the live nodes (pure).

The twin of riak_core_apl:get_apl/4 -- the ring and the set of up nodes are arguments, never
global state, so a test says "with b down" by passing ``up={"a", "c", ...}``.

An *active preference list* (APL) is the list of nodes a coordinator sends a key's request to:
the up members of the key's preference list (the *primaries*), then, for each primary that is
down, the next up member further along the ring (a *fallback*), which keeps the write as a hint
for the primary it stands in for (sloppy quorum; handing it back is handoff.py's job).

Invariants:
- The targets are distinct; primaries come first, in preference-list order; fallbacks follow in
  ring order.
- len(apl) == min(n, number of up members): with enough live members a key always has n targets.
- A down primary is matched to the first fallback in ring order, the next down primary to the
  next fallback, so the hint-for mapping is as deterministic as the ring.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from typing import NamedTuple

from .ring import Ring


class Target(NamedTuple):
    """One replica target of a request: ``node``, whether it is a primary, and for a fallback
    the primary it stands in for (the node its hint is for)."""

    node: str
    is_primary: bool
    hint_for: str | None = None


def preference_list(key: bytes, n: int, ring: Ring) -> list[str]:
    """The key's primaries with every member up (:meth:`Ring.preference_list`)."""
    return ring.preference_list(key, n)


def apl(key: bytes, n: int, ring: Ring, up: Collection[str]) -> list[Target]:
    """The active preference list of ``key``: up primaries, then fallbacks for the down ones.

    :param up: names of the members believed up; names not in the ring are ignored.
    :raises ConfigError: ``n`` < 1 or ``n`` > the number of members.
    """
    primaries = ring.preference_list(key, n)  # checks n; the replication map's when there is one
    # Fallbacks in ring order past the primaries (with a replication map too: any DC's member).
    walk = (m for m in itertools.islice(ring.successors(key), n, None)) if ring.replication is None else (
        m for m in ring.successors(key) if m not in primaries
    )
    targets = [Target(p, True) for p in primaries if p in up]
    down = [p for p in primaries if p not in up]
    # Walk on only as far as the down primaries need: a long tail of members stays unvisited.
    for f in walk:
        if len(targets) == n:
            break
        if f in up:
            targets.append(Target(f, False, down[len(targets) - (n - len(down))]))
    return targets


__all__ = ["Target", "apl", "preference_list"]
