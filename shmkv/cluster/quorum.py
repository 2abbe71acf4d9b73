"""Quorum tallies: one request's replies in, its outcome out (pure; no I/O, no clock).

The coordinator sends a request to every target of the key's active preference list, then feeds
each reply to a tally -- ``ack``/``answer`` for a reply, ``fail`` for an error, ``timeout()`` when
its deadline passes (the coordinator owns the clock) -- and answers the client as soon as the
tally's state leaves ``pending``:

    pending --(W acks / R answers)--------------------------------> ok
    pending --(too few replies still possible, or timeout())------> failed

The first decision is final (the client has been answered); replies that arrive later are still
recorded, because read repair and hinted handoff want to know about them.

What a failed write reports is the point of this module. A write is definitely *not applied*
only when no replica acknowledged it and every failure was definite (the request never left: a
refused connection, an overloaded answer). If any replica acknowledged, or any request timed out
after it was sent, the write *may have been applied* -- later reads may see it -- and the error
is :class:`MaybeApplied`, never a plain failure. Rejected: reporting "failed" on any shortfall
(Dynamo-style stores that do so invite a retry that duplicates, or a caller that believes a
value is gone which later appears).

Invariants of a tally (checked by the tests): ``acked``/``answered`` and ``failed`` are disjoint
subsets of the targets; ``outstanding`` is the rest; the state is ok exactly when the needed
count was reached before any failure decision.

Per data centre (levels.py's local_quorum / each_quorum): a tally may also need ``per_dc[dc]``
replies from the targets in each such DC (``dc_of`` names a target's DC). It is ok only when the
total *and* every DC's count are reached, and failed as soon as one DC can no longer reach its
count -- at construction already, when the targets (the up replicas) are too few in a DC: a DC
cut off fails at once, naming the DC.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Generic, Literal, Protocol, TypeVar

from .errors import ConfigError, MaybeApplied, QuorumError

State = Literal["pending", "ok", "failed"]
PENDING: State = "pending"
OK: State = "ok"
FAILED: State = "failed"

TIMED_OUT = "timed out"


def check_quorum(n: int, k: int, what: str) -> None:
    """:raises ConfigError: unless 1 <= ``k`` <= ``n`` (``what`` is "W" or "R")."""
    for name, v in (("N", n), (what, k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
    if k > n:
        raise ConfigError(f"{what}={k} > N={n}: a quorum cannot need more replicas than there are")


class _Tally:
    """What write and read tallies share: targets, replies, failures, the state machine."""

    def __init__(
        self,
        n: int,
        need: int,
        replicas: Sequence[str],
        what: str,
        per_dc: Mapping[str | None, int] | None = None,
        dc_of: Callable[[str], str | None] | None = None,
    ) -> None:
        check_quorum(n, need, what)
        targets = list(replicas)
        if len(set(targets)) != len(targets):
            raise ConfigError(f"replica targets must be distinct, got {targets}")
        if len(targets) > n:
            raise ConfigError(f"{len(targets)} replica targets for N={n}")
        self.n = n
        self.need = need
        self._what = what
        self._targets = targets
        self._replied: list[str] = []  # in arrival order
        self._failed: dict[str, str] = {}
        self._maybe: set[str] = set()  # failed nodes the request may have reached
        # dc -> (its targets, replies needed from them); empty: no per-DC need
        self._groups: dict[str | None, tuple[frozenset[str], int]] = {}
        for dc, count in (per_dc or {}).items():
            members = frozenset(t for t in targets if (dc_of(t) if dc_of else None) == dc)
            self._groups[dc] = (members, count)
        self._state: State = PENDING
        self._decide()  # too few targets to ever reach the quorum: failed from the start

    @property
    def state(self) -> State:
        return self._state

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self._targets)

    @property
    def failed(self) -> dict[str, str]:
        """Failed targets and why."""
        return dict(self._failed)

    @property
    def outstanding(self) -> tuple[str, ...]:
        """Targets that neither replied nor failed yet."""
        return tuple(t for t in self._targets if t not in self._failed and t not in self._replied)

    @property
    def done(self) -> bool:
        """Every target replied or failed: nothing more will be learnt."""
        return not self.outstanding

    def fail(self, node: str, reason: str, *, maybe_reached: bool = False) -> State:
        """Record that ``node`` failed. ``maybe_reached``: the request may have reached it (it
        was sent, the reply did not come); False for a definite failure (refused, overloaded).

        A failure of a node that already replied is ignored (its reply stands).
        """
        self._check(node)
        if node not in self._replied and node not in self._failed:
            self._failed[node] = reason
            if maybe_reached:
                self._maybe.add(node)
            self._decide()
        return self._state

    def timeout(self) -> State:
        """The deadline passed: every outstanding target failed with "timed out" (its request was
        sent, so it may have been reached); the tally decides now if it has not yet."""
        for node in self.outstanding:
            self._failed[node] = TIMED_OUT
            self._maybe.add(node)
        self._decide(final=True)
        return self._state

    def _reply(self, node: str) -> bool:
        # Returns whether this is the node's first reply. A late reply after a failure (a
        # timed-out replica that answers after all) replaces the failure: it is the fact.
        self._check(node)
        if node in self._replied:
            return False
        self._failed.pop(node, None)
        self._maybe.discard(node)
        self._replied.append(node)
        self._decide()
        return True

    def _check(self, node: str) -> None:
        if node not in self._targets:
            raise ConfigError(
                f"{node!r} is not a target of this request (targets: {self._targets})"
            )

    def _decide(self, final: bool = False) -> None:
        if self._state != PENDING:
            return
        if len(self._replied) >= self.need and not self._groups_short(possible=False):
            self._state = OK
        elif (
            final
            # replied + outstanding = targets - failed (replied and failed are disjoint targets)
            or len(self._targets) - len(self._failed) < self.need
            or self._groups_short(possible=True)
        ):
            self._state = FAILED

    def _groups_short(self, possible: bool) -> list[str | None]:
        """The DCs short of their count: of replies so far, or (``possible``) of replies still
        possible (replied + outstanding)."""
        if not self._groups:
            return []
        have = set(self._replied)
        if possible:
            have.update(self.outstanding)
        return [dc for dc, (members, count) in self._groups.items() if len(members & have) < count]

    def dc_shortfall(self) -> str:
        """Which DCs cannot (or did not) supply their count, e.g. "dc2: 0 of 2 needed"; "" if none."""
        replied = set(self._replied)
        return "; ".join(
            f"DC {dc}: {len(self._groups[dc][0] & replied)} replied of "
            f"{len(self._groups[dc][0])} reachable, {self._groups[dc][1]} needed"
            for dc in self._groups_short(possible=True) or self._groups_short(possible=False)
        )

    def _shortfall(self, verb: str) -> str:
        why = "; ".join(f"{node}: {reason}" for node, reason in self._failed.items())
        unreached = self.n - len(self._targets)
        if unreached:
            why = "; ".join(
                filter(None, [why, f"{unreached} of N={self.n} replicas had no reachable target"])
            )
        if self._groups:
            why = "; ".join(filter(None, [self.dc_shortfall(), why]))
        return (
            f"{len(self._replied)} of {self.n} replicas {verb}, {self._what}={self.need} needed"
            + (f" ({why})" if why else "")
        )


class WriteTally(_Tally):
    """The acks of one write to N replicas, W of which must acknowledge.

    :param n: the replica count N of the request. :param w: acks needed, 1 <= W <= N.
    :param replicas: the targets the write was sent to (fewer than N when not enough nodes are up).
    :raises ConfigError: W or N out of range, duplicate targets, more targets than N.
    """

    def __init__(
        self,
        n: int,
        w: int,
        replicas: Sequence[str],
        per_dc: Mapping[str | None, int] | None = None,
        dc_of: Callable[[str], str | None] | None = None,
    ) -> None:
        super().__init__(n, w, replicas, "W", per_dc, dc_of)

    @property
    def w(self) -> int:
        return self.need

    @property
    def acked(self) -> tuple[str, ...]:
        """Targets that acknowledged, in arrival order."""
        return tuple(self._replied)

    def ack(self, node: str) -> State:
        """Record ``node``'s acknowledgement (repeats are ignored)."""
        self._reply(node)
        return self._state

    @property
    def may_have_been_applied(self) -> bool:
        """Some replica acknowledged, or a failed one may have been reached."""
        return bool(self._replied) or bool(self._maybe)

    def error(self) -> QuorumError | None:
        """The error to raise to the client: None unless the state is failed; then
        :class:`MaybeApplied` when the write may have been applied, else :class:`QuorumError`."""
        if self._state != FAILED:
            return None
        kw = {"needed": self.need, "answered": len(self._replied), "n": self.n}
        if self.may_have_been_applied:
            return MaybeApplied(
                "write may have been applied: "
                + self._shortfall("acknowledged")
                + "; later reads may see it, or not",
                **kw,
            )
        return QuorumError("write not applied: " + self._shortfall("acknowledged"), **kw)


class Mergeable(Protocol):
    """A replica's state of a key: VersionSet or PNCounter."""

    def merge(self: M, other: M, /) -> M: ...


M = TypeVar("M", bound=Mergeable)


class ReadTally(_Tally, Generic[M]):
    """The answers of one read from N replicas, R of which must answer.

    An answer is the replica's state of the key (a VersionSet or a PNCounter), or ``None`` when
    the replica holds nothing for it -- a miss is an answer too.

    :param n: the replica count N. :param r: answers needed, 1 <= R <= N.
    :param replicas: the targets the read was sent to.
    :raises ConfigError: R or N out of range, duplicate targets, more targets than N.
    """

    def __init__(
        self,
        n: int,
        r: int,
        replicas: Sequence[str],
        per_dc: Mapping[str | None, int] | None = None,
        dc_of: Callable[[str], str | None] | None = None,
    ) -> None:
        super().__init__(n, r, replicas, "R", per_dc, dc_of)
        self._answers: dict[str, M | None] = {}

    @property
    def r(self) -> int:
        return self.need

    @property
    def answered(self) -> tuple[str, ...]:
        """Targets that answered, in arrival order."""
        return tuple(self._replied)

    def answer(self, node: str, value: M | None) -> State:
        """Record ``node``'s answer (``None``: it has nothing for the key). A repeated answer
        from one node replaces its earlier one."""
        self._answers[node] = value
        self._reply(node)
        return self._state

    def answer_of(self, node: str) -> M | None:
        """``node``'s answer (``None``: it had nothing, or has not answered)."""
        return self._answers.get(node)

    def merged(self) -> M | None:
        """The merge of every answer so far; ``None`` when no replica had anything."""
        out: M | None = None
        for v in self._answers.values():
            if v is not None:
                out = v if out is None else out.merge(v)
        return out

    def result(self) -> M | None:
        """The merged answers, once R replicas answered.

        :raises QuorumError: the state is not ok (failed, or still pending), saying how many answered.
        """
        if self._state != OK:
            err = self.error()
            raise (
                err
                if err is not None
                else QuorumError(
                    "read quorum not reached yet: " + self._shortfall("answered"),
                    needed=self.need,
                    answered=len(self._replied),
                    n=self.n,
                )
            )
        return self.merged()

    def stale(self) -> list[str]:
        """The targets whose answer lacks something the merge has: they need read repair.

        Only answers are judged; a target that failed or has not answered is not listed.
        """
        merged = self.merged()
        if merged is None:
            return []
        return [node for node in self._replied if self._answers[node] != merged]

    def error(self) -> QuorumError | None:
        """None unless the state is failed; then a :class:`QuorumError` saying how many answered."""
        if self._state != FAILED:
            return None
        return QuorumError(
            "read quorum not met: " + self._shortfall("answered"),
            needed=self.need,
            answered=len(self._replied),
            n=self.n,
        )


__all__ = [
    "WriteTally",
    "ReadTally",
    "Mergeable",
    "State",
    "PENDING",
    "OK",
    "FAILED",
    "check_quorum",
]
