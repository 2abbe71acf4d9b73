"""Sequential specifications a key's history is checked against: a register and a counter.

A model is what one key would do if the cluster ran its operations one at a time: an initial
state, and ``step(state, op) -> (legal, next_state)``. States are hashable (the search caches
(linearized set, state) pairs).

Register (read / write / delete / cas; state: the value, ``None`` = absent):

- a write of ``v`` leaves ``v``; a delete leaves ``None``;
- a read is legal when the state is among the values it returned. A read that returned one
  value is the classic register read. A read that returned *siblings* (concurrent versions) is
  judged leniently: the register must hold one of them. Strict-quorum Dynamo is not
  linearizable when blind writes meet at different coordinators (they become siblings); this
  lets such a history still pass when every read is explained by *some* order of the writes,
  and the sibling checker (checkers.py) judges the siblings themselves;
- ``cas([expected, new])`` with result True needs ``state == expected`` and leaves ``new``;
  with result False needs ``state != expected``; with an unknown result it does whichever the
  state allows.

Counter (incr / read; state: an int, initially 0): ``incr(d)`` leaves ``state + d`` and, when
it returned the new value, needs that value to equal ``state + d``; a read needs its value.

Each model also says which ops a sub-history may drop *honestly* -- so that a sub-history that
is not linearizable proves the whole history is not (``blocked`` below, used by shrink.py):
reads (and cas that returned False) change nothing, so dropping them never turns a legal
history illegal; a write may be dropped only when no kept op could have observed it (none
observed its value, or all that did ended before it began).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import Protocol

from .history import CAS, DELETE, FAIL, INCR, OK, READ, WRITE, Op


class Model(Protocol):
    name: str
    init: Hashable

    def step(self, state: Hashable, op: Op) -> tuple[bool, Hashable]: ...

    def blind(self, op: Op) -> Hashable | None:
        """For an op of unknown outcome: a signature such that two such ops with equal
        signatures have the same effect in every state (linearizable.py breaks the symmetry
        between them); ``None`` for every other op."""
        ...

    def prepare(self, ops: list[Op]) -> list[Op]:
        """The ops the search needs, verdict unchanged: without failed ops and unknown reads."""
        ...

    def blocked(self, removed: Iterable[Op], kept: list[Op]) -> set[int]:
        """ids of the ops of ``removed`` that may NOT be dropped honestly, all of ``removed``
        being dropped together while ``kept`` stays."""
        ...


def _informative(ops: list[Op]) -> list[Op]:
    # A failed op never happened; a read that never answered observed nothing.
    return [o for o in ops if o.outcome != FAIL and not (o.f == READ and o.outcome != OK)]


class Register:
    name = "register"
    init: Hashable = None

    def step(self, state: Hashable, op: Op) -> tuple[bool, Hashable]:
        f = op.f
        if f == READ:
            return state in op.read_values, state
        if f == WRITE:
            return True, op.value
        if f == DELETE:
            return True, None
        if f == CAS:
            expected, new = op.value
            if op.outcome == OK and op.result is not None:
                if op.result:
                    return state == expected, new
                return state != expected, state
            return True, new if state == expected else state
        return False, state  # incr on a register key: never legal

    def blind(self, op: Op) -> Hashable | None:
        if op.outcome == OK or op.f == READ:
            return None
        if op.f == CAS:
            return (CAS, *op.value)
        return (op.f, op.value)

    @staticmethod
    def _observed(ops: Iterable[Op]) -> set[object]:
        seen: set[object] = set()
        for o in ops:
            if o.f == READ:
                seen.update(o.read_values)
            elif o.f == CAS:
                seen.add(o.value[0])
        return seen

    @staticmethod
    def _negative(o: Op) -> bool:
        """A cas that returned False observed "the state is not ``expected``"."""
        return o.f == CAS and o.outcome == OK and o.result is False

    def prepare(self, ops: list[Op]) -> list[Op]:
        ops = _informative(ops)
        if any(self._negative(o) for o in ops):
            return ops
        # An unknown write nobody observed can be placed at +inf (never applied): dropping it
        # leaves the verdict unchanged, and saves the search its 2^k placements.
        seen = self._observed(ops)
        return [o for o in ops if o.outcome == OK or o.f == READ or o.written in seen]

    def blocked(self, removed: Iterable[Op], kept: list[Op]) -> set[int]:
        removed = list(removed)
        # Dropped reads go first, so only kept ops and dropped writes (a cas observes its
        # expected value) can observe a dropped write. A write may go when nobody kept observed
        # its value, or when everybody who did had ended before it began (they saw another
        # write of that value: deletes all "write" None).
        writes = [o for o in removed if o.f != READ and not self._negative(o)]
        last_seen: dict[object, float] = {}
        for o in [*kept, *writes]:
            for v in self._observed((o,)):
                last_seen[v] = max(last_seen.get(v, -1.0), o.effective_end)
        neg_end = max((o.effective_end for o in kept if self._negative(o)), default=-1.0)
        return {
            o.id for o in writes
            if o.invoke <= last_seen.get(o.written, -2.0) or o.invoke <= neg_end
        }

class Counter:
    name = "counter"
    init: Hashable = 0

    def step(self, state: Hashable, op: Op) -> tuple[bool, Hashable]:
        assert isinstance(state, int)
        if op.f == INCR:
            new = state + op.value
            if op.outcome == OK and op.result is not None:
                return op.result == new, new
            return True, new
        if op.f == READ:
            r = op.result
            if isinstance(r, list):  # a read through the register path: one sibling, an int
                r = r[0] if len(r) == 1 else None
            return r == state or (r is None and state == 0), state
        return False, state

    def blind(self, op: Op) -> Hashable | None:
        if op.f == INCR and (op.outcome != OK or op.result is None):
            return (INCR, op.value)
        return None

    def prepare(self, ops: list[Op]) -> list[Op]:
        return _informative(ops)

    @staticmethod
    def _observer(o: Op) -> bool:
        return o.f == READ or (o.f == INCR and o.outcome == OK and o.result is not None)

    def blocked(self, removed: Iterable[Op], kept: list[Op]) -> set[int]:
        # A dropped increment changes every later sum: it may go only when every kept
        # observer (and dropped incr that returned a value) ended before it was invoked.
        removed = list(removed)
        incrs = [o for o in removed if o.f != READ]
        ends = sorted(
            ((o.effective_end, o.id) for o in kept + incrs if self._observer(o)), reverse=True
        )
        out = set()
        for o in incrs:
            latest = next((e for e, i in ends if i != o.id), -1.0)
            if o.invoke <= latest:
                out.add(o.id)
        return out


REGISTER = Register()
COUNTER = Counter()


def model_for(ops: Iterable[Op]) -> Model:
    """The counter for keys that see increments or read numbers, the register otherwise."""
    counter = any(
        o.f == INCR or (o.f == READ and isinstance(o.result, int) and not isinstance(o.result, bool))
        for o in ops
    )
    return COUNTER if counter else REGISTER
