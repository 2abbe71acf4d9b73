"""Consistency levels (Cassandra's) beside numeric W/R: what one request needs (pure).

A request's W or R is an int (that many replicas of the key, wherever they are) or a level:

- ``one``: 1 replica; ``quorum``: N//2 + 1 of the key's N; ``all``: N.
- ``local_quorum``: a quorum (RF//2 + 1) of the key's replicas in the *coordinator's* data centre
  (RF: how many replicas that DC holds); the other DCs are written/read too, but not waited for.
- ``each_quorum``: a quorum of the key's replicas in *every* DC that holds some.

A level resolves, per key, to a :class:`Need`: the total count the tally waits for and, per DC,
the count that DC must supply. Without data centres (every member's dc is None: one implicit DC)
``local_quorum`` and ``each_quorum`` are both ``quorum``, and an int is what it always was.

Invariant: ``Need.total >= sum(Need.per_dc.values())`` and every per-DC count is at most the
number of the key's replicas in that DC, so a Need is always satisfiable with every replica up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import ConfigError

LEVELS = ("one", "quorum", "all", "local_quorum", "each_quorum")
#: A request's W or R as given: a count or a level name.
Level = int | str


@dataclass(frozen=True)
class Need:
    """What a request waits for: ``total`` replies, of which ``per_dc[dc]`` from each such DC."""

    total: int
    per_dc: Mapping[str | None, int] = field(default_factory=dict)
    level: Level = 0


def check_level(level: object, what: str = "W") -> Level:
    """``level`` if it is an int >= 1 or a known level name.

    :raises ConfigError: anything else, naming the accepted levels.
    """
    if isinstance(level, str):
        if level not in LEVELS:
            raise ConfigError(
                f"{what}={level!r} is not a consistency level: use an int or one of {', '.join(LEVELS)}"
            )
        return level
    if isinstance(level, bool) or not isinstance(level, int) or level < 1:
        raise ConfigError(f"{what} must be an int >= 1 or one of {', '.join(LEVELS)}, got {level!r}")
    return level


def need(
    level: Level, prefs: Sequence[str], dc_of: Callable[[str], str | None], local_dc: str | None
) -> Need:
    """The Need of ``level`` for a key whose replicas are ``prefs`` (an int is returned as is:
    quorum.check_quorum judges it against N).

    :raises ConfigError: an unknown level.
    """
    check_level(level)
    n = len(prefs)
    if isinstance(level, int):
        return Need(level, {}, level)
    if level == "one":
        return Need(1, {}, level)
    if level == "quorum":
        return Need(n // 2 + 1, {}, level)
    if level == "all":
        return Need(n, {}, level)
    rf: dict[str | None, int] = {}
    for p in prefs:
        d = dc_of(p)
        rf[d] = rf.get(d, 0) + 1
    if level == "local_quorum":
        if local_dc not in rf:  # the coordinator holds a copy, so only a misrouted call gets here
            raise ConfigError(f"local_quorum: no replica of the key in the coordinator's DC {local_dc!r}")
        q = rf[local_dc] // 2 + 1
        return Need(q, {local_dc: q}, level)
    per = {d: c // 2 + 1 for d, c in rf.items()}
    return Need(sum(per.values()), per, level)


__all__ = ["LEVELS", "Level", "Need", "check_level", "need"]
