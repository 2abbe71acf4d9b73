"""Raft safety over observations of the configuration group's nodes (the group comes later;
the input format and the checks are fixed now).

An observation is one node's state at one instant, as a debug endpoint or a log line reports it:

    [node, term, role, commit, log]      role: "leader" | "candidate" | "follower"
                                         commit: the node's commit index (1-based; 0 = none)
                                         log: [[term, entry], ...], log[0] is index 1

``entry`` is any JSON value (a configuration change is e.g. ``{"config": [...members]}``). The
list is in observation order, but no check relies on it. The properties (Ongaro's thesis, §3.6):

- *election safety*: at most one leader per term;
- *log matching*: two logs holding an entry of the same index and term agree on every entry up
  to that index;
- *state machine safety*: no two observations have committed different entries at one index;
- *leader completeness*: an entry some node had committed when at term ``t`` is in the log of
  every leader of a later term. This is "no committed entry (configuration) lost": a leader that
  commits without a majority, or a node that forgets a committed entry and wins an election,
  fails here.

A node's commit index may go down across a restart (it is volatile in Raft) without a violation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .history import HistoryError
from .verdict import Problem, Verdict, combine

ROLES = ("leader", "candidate", "follower")


@dataclass(frozen=True)
class Observation:
    node: str
    term: int
    role: str
    commit: int
    log: tuple[tuple[int, Any], ...]

    @classmethod
    def of(cls, x: Any) -> Observation:
        """From ``[node, term, role, commit, log]`` or the same as a dict.

        :raises HistoryError: malformed (the message says which field)."""
        if isinstance(x, Observation):
            return x
        if isinstance(x, dict):
            x = [x.get(f) for f in ("node", "term", "role", "commit", "log")]
        if not (isinstance(x, (list, tuple)) and len(x) == 5):
            raise HistoryError(f"a raft observation is [node, term, role, commit, log], got {x!r}")
        node, term, role, commit, log = x
        if role not in ROLES:
            raise HistoryError(f"raft observation of {node!r}: role {role!r} is not one of {ROLES}")
        if not isinstance(term, int) or not isinstance(commit, int) or commit < 0:
            raise HistoryError(f"raft observation of {node!r}: term and commit must be ints >= 0")
        entries = tuple((int(e[0]), e[1]) for e in log)
        if commit > len(entries):
            raise HistoryError(
                f"raft observation of {node!r}: commit index {commit} beyond its log of {len(entries)}"
            )
        return cls(str(node), term, role, commit, entries)

    def to_json(self) -> list[Any]:
        return [self.node, self.term, self.role, self.commit, [list(e) for e in self.log]]


def _h(prev: bytes, entry: tuple[int, Any]) -> bytes:
    return hashlib.blake2b(prev + json.dumps(entry, sort_keys=True).encode(), digest_size=16).digest()


def check_raft(observations: Iterable[Any]) -> Verdict:
    obs = [Observation.of(x) for x in observations]
    problems: list[Problem] = []
    # Election safety.
    leaders: dict[int, Observation] = {}
    for o in obs:
        if o.role != "leader":
            continue
        first = leaders.setdefault(o.term, o)
        if first.node != o.node:
            problems.append(
                Problem(
                    f"two leaders in term {o.term}: {first.node!r} and {o.node!r}",
                    extra={"observations": [first.to_json(), o.to_json()]},
                )
            )
    # Log matching: (index, term) -> hash of the log prefix ending there.
    prefix: dict[tuple[int, int], tuple[bytes, Observation]] = {}
    for o in obs:
        h = b""
        for i, e in enumerate(o.log, 1):
            h = _h(h, e)
            seen = prefix.setdefault((i, e[0]), (h, o))
            if seen[0] != h:
                problems.append(
                    Problem(
                        f"log matching violated at index {i} term {e[0]}: {seen[1].node!r} and "
                        f"{o.node!r} hold different logs up to it",
                        extra={"observations": [seen[1].to_json(), o.to_json()]},
                    )
                )
                break
    # State machine safety: one committed entry per index.
    committed: dict[int, tuple[tuple[int, Any], Observation]] = {}
    for o in obs:
        for i in range(1, o.commit + 1):
            e = o.log[i - 1]
            first_c = committed.setdefault(i, (e, o))
            if first_c[0] != e:
                problems.append(
                    Problem(
                        f"index {i} committed as {first_c[0]!r} by {first_c[1].node!r} and as "
                        f"{e!r} by {o.node!r}",
                        extra={"observations": [first_c[1].to_json(), o.to_json()]},
                    )
                )
                break
    # Leader completeness: what was committed at term t is in every leader's log of term > t.
    # Checking the last committed entry suffices: log matching (above) covers the prefix.
    leader_obs = [x for x in obs if x.role == "leader"]
    for o in obs:
        if not o.commit:
            continue
        i, e = o.commit, o.log[o.commit - 1]
        for ldr in leader_obs:
            if ldr.term > o.term and (len(ldr.log) < i or ldr.log[i - 1] != e):
                problems.append(
                    Problem(
                        f"committed entry {i} {e!r} ({o.node!r} in term {o.term}) is missing "
                        f"from the log of {ldr.node!r}, leader of term {ldr.term}",
                        extra={"observations": [o.to_json(), ldr.to_json()]},
                    )
                )
    return combine("raft", _dedupe(problems), [], observations=len(obs), terms=len(leaders))


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[str] = set()
    out = []
    for p in problems:
        if p.message not in seen:
            seen.add(p.message)
            out.append(p)
    return out
