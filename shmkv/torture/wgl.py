"""The Wing–Gong search with Lowe's cache over one key's ops: the engine of linearizable.py
(whose docstring tells the algorithm) and of shrink.py, which re-runs it on smaller
sub-histories. Its own module so that both import it and neither imports the other."""

from __future__ import annotations

import math
import time
from collections.abc import Hashable

from .history import Op
from .models import Model
from .verdict import FAIL, PASS, UNKNOWN

_CHECK_EVERY = 512


def search(ops: list[Op], model: Model, deadline: float | None = None) -> str:
    """Whether ``ops`` (one key's, already :meth:`Model.prepare`-d) is linearizable under
    ``model``: ``PASS``, ``FAIL``, or ``UNKNOWN`` once ``time.monotonic()`` passes
    ``deadline``."""
    n = len(ops)
    if n == 0:
        return PASS
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        events.append((op.invoke, 0, i))
        events.append((op.effective_end, 1, i))
    events.sort()
    # Entry 0 is the head; entries 1..2n in time order; -1 ends the list.
    m = 2 * n + 1
    nxt = list(range(1, m + 1))
    nxt[m - 1] = -1
    prv = list(range(-1, m - 1))
    is_ret = [False] * m
    at_inf = [False] * m
    op_of = [0] * m
    match = [0] * m  # call entry -> its return entry
    call_entry = [0] * n
    # before[i]: the previous op (in invocation order) with the same blind signature, or -1.
    before = [-1] * n
    last: dict[Hashable, int] = {}
    for i in sorted(range(n), key=lambda j: (ops[j].invoke, j)):
        sig = model.blind(ops[i])
        if sig is not None:
            before[i] = last.get(sig, -1)
            last[sig] = i
    for e, (t, kind, i) in enumerate(events, 1):
        op_of[e] = i
        if kind:
            is_ret[e] = True
            at_inf[e] = t == math.inf
            match[call_entry[i]] = e
        else:
            call_entry[i] = e

    step = model.step
    state: Hashable = model.init
    linearized = 0
    cache: set[tuple[int, Hashable]] = set()
    stack: list[tuple[int, Hashable]] = []
    entry = nxt[0]
    steps = 0
    while nxt[0] != -1:
        steps += 1
        if deadline is not None and steps % _CHECK_EVERY == 0 and time.monotonic() > deadline:
            return UNKNOWN
        if not is_ret[entry]:
            i = op_of[entry]
            b = before[i]
            if b >= 0 and not (linearized >> b) & 1:
                entry = nxt[entry]
                continue
            legal, new_state = step(state, ops[i])
            if legal:
                bits = linearized | (1 << i)
                seen = (bits, new_state)
                if seen not in cache:
                    cache.add(seen)
                    stack.append((entry, state))
                    state = new_state
                    linearized = bits
                    # lift the call and its return out of the list
                    r = match[entry]
                    nxt[prv[entry]] = nxt[entry]
                    prv[nxt[entry]] = prv[entry]
                    nxt[prv[r]] = nxt[r]
                    if nxt[r] != -1:
                        prv[nxt[r]] = prv[r]
                    entry = nxt[0]
                    continue
            entry = nxt[entry]
        else:
            if at_inf[entry]:
                return PASS  # only unknown ops are left; see the module docstring
            if not stack:
                return FAIL
            entry, state = stack.pop()
            linearized &= ~(1 << op_of[entry])
            # put the return back, then the call (the reverse of lifting)
            r = match[entry]
            nxt[prv[r]] = r
            if nxt[r] != -1:
                prv[nxt[r]] = r
            nxt[prv[entry]] = entry
            prv[nxt[entry]] = entry
            entry = nxt[entry]
    return PASS
