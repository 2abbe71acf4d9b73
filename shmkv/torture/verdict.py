"""What a checker says: pass, fail or unknown, and the smallest failing sub-history behind it.

Every checker in shmkv/torture/ returns one :class:`Verdict`. ``unknown`` is an honest answer,
not a soft pass: the search ran out of time, or the history lacks what the checker needs (no
final states, contexts not recorded). ``torture`` exits 0 only when every verdict is ``pass``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .history import Op

PASS, FAIL, UNKNOWN = "pass", "fail", "unknown"


@dataclass
class Problem:
    """One violation: what is wrong (a sentence), on which key, and the ops that show it --
    shrunk so that removing any one of them would no longer show the violation (or as far as
    the shrinking budget allowed: ``shrunk`` says which)."""

    message: str
    key: str | None = None
    ops: list[Op] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    shrunk: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "message": self.message, "key": self.key, "shrunk": self.shrunk,
            "ops": [o.to_json() for o in self.ops], **({"extra": self.extra} if self.extra else {}),
        }


@dataclass
class Verdict:
    """A checker's answer. ``problems`` is non-empty when ``status`` is fail; ``unknown`` lists
    what could not be decided (keys whose search timed out, ...)."""

    checker: str
    status: str
    problems: list[Problem] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == PASS

    def to_json(self) -> dict[str, Any]:
        return {
            "checker": self.checker, "status": self.status,
            "problems": [p.to_json() for p in self.problems],
            "unknown": self.unknown, "stats": self.stats,
        }


def combine(checker: str, problems: list[Problem], unknown: list[str], **stats: Any) -> Verdict:
    """fail if any problem, else unknown if anything was undecided, else pass."""
    status = FAIL if problems else UNKNOWN if unknown else PASS
    return Verdict(checker, status, problems, unknown, dict(stats))
