"""Checkers over a history and the replicas' final states, in terms of shmkv's version model.

All are pure functions of their inputs, linear or near-linear in the history, and return a
:class:`~shmkv.torture.verdict.Verdict` whose problems carry the few ops that show each
violation (already minimal: the write, the op that superseded it, the read that saw it).

Vocabulary (shmkv/cluster/versions.py). Every write mints a *dot*; a context is a clock
``{node: counter}``; a context *saw* a dot when the dot is within it. The history does not name
dots, but it records contexts that are known to contain a value's dot:

    K(v) = { the context the put of v returned }  ∪  { the context of every read that returned v }

(the value's own dot is in each: a put's returned clock includes the dot it minted; a read's
clock includes the dots of the siblings it returned). So a context ``C`` *saw* ``v`` when
``descends(C, k)`` for some ``k`` in ``K(v)`` -- sound (never claims a sighting that did not
happen), complete when the put of ``v`` returned its context.

What a write *superseded*: ``sup(w)`` = the context it was given (a put or delete with a context
supersedes exactly what that context saw); for a put without a context, the context it returned
(it superseded everything its coordinator held); unknown otherwise (a blind write whose outcome
is unknown). The workloads (workload.py) always pass the context of the process' last operation
on the key, so ``sup`` is known for every write they make. Values are unique per write.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping

from ..cluster.versions import VersionSet, descends
from .history import DELETE, FAIL, OK, READ, WRITE, Clock, History, Op, value_text
from .verdict import Problem, Verdict, combine


def _ops(history: History | Iterable[Op]) -> list[Op]:
    ops = history.ops if isinstance(history, History) else list(history)
    return sorted(ops, key=lambda o: (o.invoke, o.id))


class _Knowledge:
    """K(v) and sup(w) for one key's ops."""

    def __init__(self, ops: list[Op]) -> None:
        self.writes: dict[str, Op] = {}  # value -> its put (the first, should values repeat)
        self.known: dict[str, list[Clock]] = {}
        for o in ops:
            if o.f == WRITE and o.outcome != FAIL:
                self.writes.setdefault(o.value, o)
                if o.outcome == OK and o.ctx_out is not None:
                    self.known.setdefault(o.value, []).append(o.ctx_out)
            elif o.f == READ and o.outcome == OK and o.ctx_out is not None:
                for v in o.read_values:
                    if v is not None:
                        self.known.setdefault(v, []).append(o.ctx_out)
        for ks in self.known.values():
            # The least contexts suffice: descends(C, k) for a bigger k implies it for a smaller.
            ks.sort(key=lambda c: sum(c.values()))
            del ks[8:]

    def saw(self, ctx: Mapping[str, int] | None, v: str) -> bool:
        if ctx is None:
            return False
        return any(descends(ctx, k) for k in self.known.get(v, ()))

    @staticmethod
    def sup(w: Op) -> Clock | None:
        if w.ctx_in is not None:
            return w.ctx_in
        if w.f == WRITE and w.outcome == OK:
            return w.ctx_out
        return None


class _Maxima:
    """The maximal clocks (under ``descends``) of a growing set, each with an op it came from.
    "Some clock of the set descends k" iff some maximal one does; in a history the maxima are
    few (one per group of writers that did not see each other), so queries are cheap."""

    def __init__(self) -> None:
        self.items: list[tuple[Clock, Op]] = []

    def add(self, clock: Clock, op: Op) -> None:
        if any(descends(m, clock) for m, _ in self.items):
            return
        self.items = [(m, o) for m, o in self.items if not descends(clock, m)]
        self.items.append((clock, op))

    def seeing(self, know: _Knowledge, v: str) -> Op | None:
        """An op whose clock saw ``v``, if any."""
        for m, o in self.items:
            if know.saw(m, v):
                return o
        return None


def merged_final(final: Mapping[str, Mapping[str, VersionSet]]) -> dict[str, VersionSet]:
    """Per key, the merge of every replica's final VersionSet (what a full read would see)."""
    out: dict[str, VersionSet] = {}
    for keys in final.values():
        for k, vs in keys.items():
            out[k] = out[k].merge(vs) if k in out else vs
    return out


# -- no acknowledged write is lost -------------------------------------------------------------


def check_lost_writes(
    history: History | Iterable[Op], final: Mapping[str, VersionSet]
) -> Verdict:
    """Every acknowledged put survives in the key's final state ``final[key]`` (the merge of the
    replicas after the faults healed: :func:`merged_final`).

    An ok put ``w`` of value ``v`` that returned context ``c_w`` is *kept* when

    1. the final clock descends ``c_w`` -- the final state has seen ``w`` and all ``w`` saw
       (a replica that forgot an acknowledged dot, a handoff dropped too early, fails here); and
    2. ``v`` is among the final siblings, or a kept-or-surviving write ``w'`` superseded it:
       ``sup(w')`` saw ``v`` (a version marked dead without any write that saw it -- a read
       repair that overwrote a newer version -- fails here).

    A collected key (no final VersionSet: tombstones past their grace period) skips 1 and counts
    every delete as surviving. When ``c_w`` was not recorded only 2 is judged; a write that no
    recorded context can be shown to have superseded, while a blind write of unknown outcome
    that may have done so exists, is reported ``unknown`` rather than lost.
    """
    per_key: dict[str, list[Op]] = {}
    for o in _ops(history):
        per_key.setdefault(o.key, []).append(o)
    problems: list[Problem] = []
    unknown: list[str] = []
    acked = 0
    for key, ops in sorted(per_key.items()):
        fin = final.get(key)
        know = _Knowledge(ops)
        writes = [o for o in ops if o.f in (WRITE, DELETE) and o.outcome != FAIL]
        targets = [o for o in writes if o.f == WRITE and o.outcome == OK]
        acked += len(targets)
        if not targets:
            continue
        fin_values = set() if fin is None else {value_text(v) for v in fin.values}
        collected = fin is None or (not fin.siblings and not fin.clock)
        alive: list[Op] = [
            w
            for w in writes
            if (w.f == WRITE and w.value in fin_values)
            or (w.f == DELETE and (collected or None in fin_values))
        ]
        kept_ids = {w.id for w in alive}
        # Fixpoint over supersession chains; usually one round, as contexts grow along
        # causality (the surviving writes' contexts dominate everything they superseded).
        maxima = _Maxima()
        frontier = list(alive)
        pending = [w for w in writes if w.id not in kept_ids and w.f == WRITE]
        while frontier and pending:
            for w in frontier:
                sup = know.sup(w)
                if sup is not None:
                    maxima.add(sup, w)
            frontier = [w for w in pending if maxima.seeing(know, w.value) is not None]
            kept_ids.update(w.id for w in frontier)
            pending = [w for w in pending if w.id not in kept_ids]
        blind_unknown = [w for w in writes if know.sup(w) is None]
        for w in targets:
            if not collected and w.ctx_out is not None and not descends(fin.clock, w.ctx_out):  # type: ignore[union-attr]
                problems.append(
                    Problem(
                        f"key {key!r}: acknowledged write of {w.value!r} is lost: the final state "
                        f"{fin!r} has not seen its context {w.ctx_out}",
                        key=key, ops=[w], extra={"final": repr(fin)},
                    )
                )
            elif w.id not in kept_ids:
                maybe = [b for b in blind_unknown if b.id != w.id and b.effective_end > w.invoke]
                if maybe and w.ctx_out is None:
                    unknown.append(
                        f"key {key!r}: write of {w.value!r} is not in the final state; a blind "
                        f"write of unknown outcome (op {maybe[0].id}) may have superseded it"
                    )
                    continue
                problems.append(
                    Problem(
                        f"key {key!r}: acknowledged write of {w.value!r} is lost: not in the final "
                        f"state {sorted(fin_values, key=str)} and no surviving write superseded it",
                        key=key, ops=[w], extra={"final": repr(fin)},
                    )
                )
    return combine("lost-writes", problems, unknown, keys=len(per_key), acknowledged=acked)


# -- superseded values (deleted keys) never return -----------------------------------------------


def check_superseded(
    history: History | Iterable[Op],
    final: Mapping[str, VersionSet] | None = None,
    *,
    strict: bool = True,
) -> Verdict:
    """A value an acknowledged write superseded never comes back: once a delete (or put) ``d``
    with ``sup(d)`` that saw ``v`` completed ok, ``v`` is dead everywhere it meets ``d``'s
    version (merge: dead beats alive). So

    - with ``strict`` (R + W > N, hints not counted: every read quorum meets ``d``'s write
      quorum), no read invoked after ``d`` completed returns ``v``;
    - in any configuration, the final state (``final``, after the faults healed and the replicas
      exchanged state) does not hold ``v``.

    A deleted key that returns is the case ``d`` = a delete: "deleted keys never return".
    """
    per_key: dict[str, list[Op]] = {}
    for o in _ops(history):
        per_key.setdefault(o.key, []).append(o)
    problems: list[Problem] = []
    for key, ops in sorted(per_key.items()):
        know = _Knowledge(ops)
        killers = [
            o for o in ops if o.f in (WRITE, DELETE) and o.outcome == OK and know.sup(o) is not None
        ]
        if not killers:
            continue
        # Sweep reads in invocation order against the writes completed before each began.
        # Puts and deletes given a context never saw their own dot; a blind put's returned
        # context does include it, so those (rare: the workloads always pass a context) are
        # checked one by one, excluding their own value.
        done = sorted((d for d in killers if d.ctx_in is not None), key=lambda d: d.effective_end)
        blind = [d for d in killers if d.ctx_in is None]
        maxima = _Maxima()

        def killer(
            v: str, before: float, maxima: _Maxima = maxima, know: _Knowledge = know,
            blind: list[Op] = blind,
        ) -> Op | None:
            d = maxima.seeing(know, v)
            if d is not None:
                return d
            for b in blind:
                if b.effective_end < before and b.value != v and know.saw(know.sup(b), v):
                    return b
            return None

        reported: set[str] = set()
        if strict:
            j = 0
            for r in ops:
                if r.f != READ or r.outcome != OK:
                    continue
                while j < len(done) and done[j].effective_end < r.invoke:
                    maxima.add(done[j].ctx_in, done[j])  # type: ignore[arg-type]
                    j += 1
                for v in r.read_values:
                    if v is None or v in reported:
                        continue
                    d = killer(v, r.invoke)
                    if d is None:
                        continue
                    reported.add(v)
                    what = "deleted" if d.f == DELETE else f"overwritten by {d.value!r}"
                    problems.append(
                        Problem(
                            f"key {key!r}: {v!r} returned by a read after it was {what} "
                            f"(op {d.id} completed at {d.effective_end:.6g}, the read began at {r.invoke:.6g})",
                            key=key, ops=[o for o in (know.writes.get(v), d, r) if o is not None],
                        )
                    )
        if final is not None and key in final:
            for d in done:
                maxima.add(d.ctx_in, d)  # type: ignore[arg-type]
            held = {value_text(x) for x in final[key].values}
            for v in sorted(x for x in held if x is not None):
                d = killer(v, float("inf"))
                if d is not None and v not in reported:
                    what = "deleted" if d.f == DELETE else f"overwritten by {d.value!r}"
                    problems.append(
                        Problem(
                            f"key {key!r}: the final state holds {v!r}, which was {what} (op {d.id})",
                            key=key, ops=[o for o in (know.writes.get(v), d) if o is not None],
                            extra={"final": repr(final[key])},
                        )
                    )
    return combine("superseded", problems, [], keys=len(per_key), strict=strict)


# -- siblings stay bounded by the concurrent writers ----------------------------------------------


def check_siblings(history: History | Iterable[Op]) -> Verdict:
    """No read shows more siblings than there were writers, and siblings are really concurrent.

    For an ok read ``r`` with siblings ``V``:

    - ``len(V)`` is at most the number of distinct processes that issued a (not failed) write
      or delete of the key invoked before ``r`` completed. A process is sequential and passes
      the context of its last operation on the key (workload.py; a worker whose op timed out
      continues as a new process, as in Jepsen), so each process' writes form a causal chain
      and at most its last one is alive: siblings are bounded by writers, not by writes;
    - no sibling's write superseded another sibling (``sup(w(v2))`` saw ``v1``): a dead version
      shown alive.
    """
    per_key: dict[str, list[Op]] = {}
    for o in _ops(history):
        per_key.setdefault(o.key, []).append(o)
    problems: list[Problem] = []
    most = 0
    for key, ops in sorted(per_key.items()):
        know = _Knowledge(ops)
        writers = [o for o in ops if o.f in (WRITE, DELETE) and o.outcome != FAIL]
        # distinct[i]: how many processes issued the first i writes (in invocation order).
        w_t = [w.invoke for w in writers]
        distinct, procs_seen = [0], set()
        for w in writers:
            procs_seen.add(w.process)
            distinct.append(len(procs_seen))
        for r in ops:
            if r.f != READ or r.outcome != OK or len(r.read_values) < 2:
                continue
            vals = r.read_values
            most = max(most, len(vals))
            nprocs = distinct[bisect.bisect_left(w_t, r.effective_end)]
            if len(vals) > nprocs:
                problems.append(
                    Problem(
                        f"key {key!r}: a read returned {len(vals)} siblings {vals!r} but only "
                        f"{nprocs} processes had written the key",
                        key=key, ops=[r] + [know.writes[v] for v in vals if v in know.writes],
                    )
                )
                continue
            for v2 in vals:
                w2 = know.writes.get(v2) if v2 is not None else None
                sup = know.sup(w2) if w2 is not None else None
                for v1 in vals:
                    if v1 is not None and v1 != v2 and know.saw(sup, v1):
                        problems.append(
                            Problem(
                                f"key {key!r}: a read returned {v1!r} beside {v2!r}, whose write "
                                f"superseded it",
                                key=key, ops=[o for o in (know.writes.get(v1), w2, r) if o is not None],
                            )
                        )
    return combine("siblings", problems, [], keys=len(per_key), most_siblings=most)


# -- convergence ----------------------------------------------------------------------------------


def check_convergence(
    final: Mapping[str, Mapping[str, VersionSet]],
    replicas: Callable[[str], Iterable[str]] | None = None,
) -> Verdict:
    """After the faults healed and anti-entropy ran, every replica of a key holds the same
    versions (equal VersionSets: the same clock and the same siblings).

    ``final`` is node -> key -> VersionSet. With ``replicas`` (key -> the nodes that should hold
    it, e.g. its preference list) a replica without the key counts as holding nothing; without
    it only the nodes that hold the key are compared.
    """
    keys = sorted({k for held in final.values() for k in held})
    problems: list[Problem] = []
    for key in keys:
        nodes = list(replicas(key)) if replicas else [n for n in final if key in final[n]]
        groups: dict[VersionSet, list[str]] = {}
        for n in nodes:
            groups.setdefault(final.get(n, {}).get(key, VersionSet()), []).append(n)
        if len(groups) > 1:
            desc = "; ".join(f"{sorted(ns)} hold {vs!r}" for vs, ns in groups.items())
            problems.append(
                Problem(
                    f"key {key!r}: replicas disagree: {desc}", key=key,
                    extra={"groups": {",".join(sorted(ns)): repr(vs) for vs, ns in groups.items()}},
                )
            )
    return combine("convergence", problems, [], keys=len(keys), nodes=len(final))


def unknown_verdict(checker: str, why: str) -> Verdict:
    """A checker that could not run (its input is missing): honest ``unknown``."""
    return combine(checker, [], [why])


__all__ = [
    "check_convergence",
    "check_lost_writes",
    "check_siblings",
    "check_superseded",
    "merged_final",
    "unknown_verdict",
]
