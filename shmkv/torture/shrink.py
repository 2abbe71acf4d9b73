"""The smallest failing sub-history of a key that is not linearizable.

A report that says "these 4,000 ops are not linearizable" helps nobody; "this write was
acknowledged, then this read returned the value before it" does. Shrinking removes ops while
the rest still fails the search -- but only *honest* removals (models.py ``blocked``): dropping
a write that a kept read observed would make any read look wrong ("it read a value nobody
wrote") and the shrunk history would blame the checker's cut, not the cluster. With honest
removals only, a sub-history that fails proves the whole history fails: every op in the result
is a real op, and none of the context that explains them has been cut away.

Two phases, both within one time budget (each search also gets a slice of it):

1. the shortest failing prefix in invocation order (binary search), closed under ``blocked``:
   later writes a kept op may have observed stay; then the same from the front (earlier writes
   a kept op observed stay);
2. delta debugging (Zeller's ddmin, the complement-only variant): drop chunks of half, then a
   quarter, ... then single ops, keeping any drop after which the rest still fails.

The result is 1-minimal (no single op can be dropped) when phase 2 finishes within the budget;
``complete`` says whether it did.
"""

from __future__ import annotations

import time

from .history import Op
from .models import Model
from .verdict import FAIL
from .wgl import search


def _close(kept: list[Op], rest: list[Op], model: Model) -> list[Op]:
    """``kept`` plus every op of ``rest`` that cannot be dropped honestly, until stable."""
    kept = list(kept)
    rest = list(rest)
    while rest:
        stuck = model.blocked(rest, kept)
        if not stuck:
            break
        kept += [o for o in rest if o.id in stuck]
        rest = [o for o in rest if o.id not in stuck]
    kept.sort(key=lambda o: (o.invoke, o.id))
    return kept


def shrink(ops: list[Op], model: Model, budget: float = 10.0) -> tuple[list[Op], bool]:
    """A failing sub-history of ``ops`` (which must fail :func:`search`), and whether it is
    1-minimal. ``ops`` is one key's prepared history."""
    end = time.monotonic() + budget
    slice_ = max(budget / 20, 0.05)

    def fails(sub: list[Op]) -> bool:
        now = time.monotonic()
        return search(sub, model, min(now + slice_, end)) == FAIL

    cur = sorted(ops, key=lambda o: (o.invoke, o.id))
    # Phase 1: binary search the shortest failing closed prefix. Invariant: prefix hi fails.
    lo, hi = 0, len(cur)
    while lo + 1 < hi and time.monotonic() < end:
        mid = (lo + hi) // 2
        if fails(_close(cur[:mid], cur[mid:], model)):
            hi = mid
        else:
            lo = mid
    cur = _close(cur[:hi], cur[hi:], model)
    # Phase 1b: the same from the front: the latest cut whose closed rest still fails.
    lo, hi = 0, len(cur)
    while lo + 1 < hi and time.monotonic() < end:
        mid = (lo + hi) // 2
        if fails(_close(cur[mid:], cur[:mid], model)):
            lo = mid
        else:
            hi = mid
    if lo:
        cur = _close(cur[lo:], cur[:lo], model)
    # Phase 2: ddmin by complements; at single ops, repeat until a whole pass drops nothing
    # (a drop can unblock an earlier op), which is 1-minimality.
    chunk = max(len(cur) // 2, 1)
    while time.monotonic() < end:
        i = 0
        dropped = False
        while i < len(cur):
            if time.monotonic() >= end:
                return cur, False
            removed = cur[i : i + chunk]
            cand = cur[:i] + cur[i + chunk :]
            if cand and not model.blocked(removed, cand) and fails(cand):
                cur = cand
                dropped = True
            else:
                i += chunk
        if chunk == 1 and not dropped:
            return cur, True
        chunk = max(chunk // 2, 1)
    return cur, False
