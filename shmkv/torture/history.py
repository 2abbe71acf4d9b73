"""A torture run's history: every client operation with when it started, when it ended, and how.

An operation is recorded twice in spirit -- invoked, then completed -- but stored as one
:class:`Op` once its outcome is known:

- ``ok``: the cluster answered and the operation took effect (for a read: these are the values
  it saw);
- ``fail``: the cluster answered that it was *not* performed (``QuorumError`` without "may have
  been applied"); the checkers treat it as never having happened, so a failed write that
  becomes visible later is caught by them;
- ``unknown``: a timeout, ``MaybeApplied``, a dropped connection: the operation may or may not
  have taken effect, at any instant after its invocation, even after the run ended. For the
  linearizability search its completion is +infinity; a read with an unknown outcome tells
  nothing and is ignored.

Values are ``str`` (the workloads write unique ASCII values such as ``"3-17"``: process 3's
17th write; the client adapter encodes them to bytes); ``None`` is a delete / a tombstone /
absent. Clocks (contexts) are ``{node: counter}`` dicts as in shmkv/cluster/versions.py.

Fields per operation ``f``:

    f        value                 result (when ok)                 ctx_in / ctx_out
    read     -                     list of sibling values            - / context read
    write    value written         -                                 context given / returned
    delete   -                     -                                 context given / returned
    incr     delta (int)           new counter value (int or None)   - / -
    cas      [expected, new]       True / False (applied or not)     - / -

On disk (JSON lines, one object per line; DO NOT CHANGE the field names: saved histories are
re-checked with ``shmkv torture --check FILE``): the first line is a header
``{"shmkv_history": 1, ...run metadata...}``, then one op per line with the short keys below,
then optionally lines ``{"final": {node: {key: versionset wire form}}}`` (the replicas' final
states, for the lost-write and convergence checkers), ``{"raft": [observation...]}``,
``{"group": {"observations": [...], "final": [...]}}`` (the daemons' configuration group as
polled, group.py) and
``{"fault": {...}}`` (the nemesis log, for the timeline plot).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import Error

HISTORY_FORMAT = 1

READ, WRITE, DELETE, INCR, CAS = "read", "write", "delete", "incr", "cas"
FUNCTIONS = (READ, WRITE, DELETE, INCR, CAS)
OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
OUTCOMES = (OK, FAIL, UNKNOWN)

Clock = dict[str, int]


class HistoryError(Error):
    """A saved history (or an op built by hand) is malformed; the message names the line/field."""


@dataclass(slots=True)
class Op:
    """One client operation. ``complete`` is when the client stopped waiting (``None`` if it
    never did, e.g. the run ended first); for an ``unknown`` op the effect may come later still.

    Invariant (checked by :meth:`validate`): ``invoke <= complete`` when both are known.
    """

    id: int
    process: int
    key: str
    f: str
    invoke: float
    complete: float | None = None
    outcome: str = OK
    value: Any = None
    result: Any = None
    ctx_in: Clock | None = None
    ctx_out: Clock | None = None
    error: str | None = None

    @property
    def is_write(self) -> bool:
        """Whether the op may change the key's state (every f but ``read``)."""
        return self.f != READ

    @property
    def effective_end(self) -> float:
        """The latest instant the op can take effect: +inf unless its outcome is known ok."""
        if self.outcome == OK and self.complete is not None:
            return self.complete
        return math.inf

    @property
    def written(self) -> str | None:
        """The value a write / delete / successful cas leaves (``None`` for a delete)."""
        if self.f == WRITE:
            return self.value  # type: ignore[no-any-return]
        if self.f == CAS:
            return self.value[1]  # type: ignore[no-any-return]
        return None

    @property
    def read_values(self) -> list[str | None]:
        """The siblings an ok read saw; a read of an absent key saw ``[None]``."""
        if isinstance(self.result, int):  # a counter's read
            return [self.result]  # type: ignore[list-item]
        vals = list(self.result or ())
        return vals or [None]

    def validate(self) -> Op:
        """:raises HistoryError: a field out of its domain (named)."""
        if self.f not in FUNCTIONS:
            raise HistoryError(f"op {self.id}: unknown function {self.f!r} (expected one of {FUNCTIONS})")
        if self.outcome not in OUTCOMES:
            raise HistoryError(f"op {self.id}: unknown outcome {self.outcome!r} (expected one of {OUTCOMES})")
        if not isinstance(self.key, str):
            raise HistoryError(f"op {self.id}: key must be a str, got {type(self.key).__name__}")
        if self.outcome == OK and self.complete is None:
            raise HistoryError(f"op {self.id}: outcome ok needs a completion time")
        if self.complete is not None and self.complete < self.invoke:
            raise HistoryError(f"op {self.id}: completes ({self.complete}) before it is invoked ({self.invoke})")
        if self.f == CAS and not (isinstance(self.value, (list, tuple)) and len(self.value) == 2):
            raise HistoryError(f"op {self.id}: cas value must be [expected, new], got {self.value!r}")
        if self.f == INCR and (isinstance(self.value, bool) or not isinstance(self.value, int)):
            raise HistoryError(f"op {self.id}: incr delta must be an int, got {self.value!r}")
        if self.f == READ and self.outcome == OK and self.result is not None and not isinstance(self.result, (list, int)):
            raise HistoryError(f"op {self.id}: a read's result must be a list of values or an int, got {self.result!r}")
        return self

    # -- JSON lines ------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "i": self.id, "p": self.process, "k": self.key, "f": self.f,
            "t0": self.invoke, "t1": self.complete, "o": self.outcome,
        }
        for name, short in (("value", "v"), ("result", "r"), ("ctx_in", "ci"), ("ctx_out", "co"), ("error", "e")):
            x = getattr(self, name)
            if x is not None:
                d[short] = x
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Op:
        try:
            op = cls(
                id=d["i"], process=d["p"], key=d["k"], f=d["f"], invoke=d["t0"],
                complete=d.get("t1"), outcome=d.get("o", OK), value=d.get("v"),
                result=d.get("r"), ctx_in=d.get("ci"), ctx_out=d.get("co"), error=d.get("e"),
            )
        except (KeyError, TypeError) as e:
            raise HistoryError(f"op record {d!r} lacks field {e}") from None
        if op.f == CAS and isinstance(op.value, list):
            op.value = tuple(op.value)
        return op.validate()


@dataclass
class History:
    """A run: its ops (in invocation order), metadata (seed, nemesis, config), and optionally the
    replicas' final states (``final[node][key]`` = VersionSet wire form), Raft observations and
    the nemesis' fault log."""

    ops: list[Op] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    final: dict[str, dict[str, Any]] | None = None
    raft: list[Any] | None = None
    faults: list[dict[str, Any]] = field(default_factory=list)
    group: dict[str, Any] | None = None  # group.py: {"observations": [...], "final": [...]}

    def by_key(self) -> dict[str, list[Op]]:
        """P-compositionality: each key's sub-history, in invocation order."""
        out: dict[str, list[Op]] = {}
        for op in sorted(self.ops, key=lambda o: (o.invoke, o.id)):
            out.setdefault(op.key, []).append(op)
        return out

    def final_versions(self) -> dict[str, dict[str, Any]] | None:
        """``final`` decoded into VersionSets (node -> key -> VersionSet)."""
        if self.final is None:
            return None
        from ..cluster.versions import VersionSet

        return {
            node: {k: VersionSet.from_wire(_wire_bytes(w)) for k, w in keys.items()}
            for node, keys in self.final.items()
        }

    # -- JSON lines ------------------------------------------------------------------------------

    def dump(self, fp: IO[str]) -> None:
        fp.write(json.dumps({"shmkv_history": HISTORY_FORMAT, **self.meta}) + "\n")
        for op in self.ops:
            fp.write(json.dumps(op.to_json()) + "\n")
        for fault in self.faults:
            fp.write(json.dumps({"fault": fault}) + "\n")
        if self.final is not None:
            fp.write(json.dumps({"final": _jsonable_final(self.final)}) + "\n")
        if self.raft is not None:
            fp.write(json.dumps({"raft": self.raft}) + "\n")
        if self.group is not None:
            fp.write(json.dumps({"group": self.group}) + "\n")

    def save(self, path: str | Path) -> None:
        tmp = Path(str(path) + ".tmp")
        with open(tmp, "w") as fp:
            self.dump(fp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> History:
        """:raises HistoryError: not a saved history (the message names the line)."""
        with open(path) as fp:
            return cls.parse(fp)

    @classmethod
    def parse(cls, lines: Iterable[str]) -> History:
        it: Iterator[tuple[int, str]] = enumerate(lines, 1)
        h = cls()
        header = False
        for lineno, line in it:
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
            except ValueError as e:
                raise HistoryError(f"line {lineno}: not JSON ({e})") from None
            if not isinstance(d, dict):
                raise HistoryError(f"line {lineno}: expected a JSON object")
            if not header:
                if d.get("shmkv_history") != HISTORY_FORMAT:
                    raise HistoryError(
                        f"line {lineno}: not a shmkv history of format {HISTORY_FORMAT} (header {d!r})"
                    )
                h.meta = {k: v for k, v in d.items() if k != "shmkv_history"}
                header = True
            elif "final" in d:
                h.final = d["final"]
            elif "raft" in d:
                h.raft = d["raft"]
            elif "group" in d:
                h.group = d["group"]
            elif "fault" in d:
                h.faults.append(d["fault"])
            else:
                try:
                    h.ops.append(Op.from_json(d))
                except HistoryError as e:
                    raise HistoryError(f"line {lineno}: {e}") from None
        if not header:
            raise HistoryError("empty history: no header line")
        return h


def _jsonable_final(final: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """VersionSet wire forms hold bytes values; JSON holds them as latin-1 strings tagged ``b``."""

    def conv(x: Any) -> Any:
        if isinstance(x, bytes):
            return {"b": x.decode("latin-1")}
        if isinstance(x, (list, tuple)):
            return [conv(y) for y in x]
        return x

    return {n: {k: conv(w) for k, w in keys.items()} for n, keys in final.items()}


def _wire_bytes(x: Any) -> Any:
    if isinstance(x, dict) and set(x) == {"b"}:
        return x["b"].encode("latin-1")
    if isinstance(x, list):
        return [_wire_bytes(y) for y in x]
    return x


def versions_to_final(states: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """node -> key -> VersionSet into the ``History.final`` form (wire lists)."""
    return {n: {k: vs.to_wire() for k, vs in keys.items()} for n, keys in states.items()}


def value_text(v: bytes | None) -> str | None:
    """A stored value as the history's str (the workloads write ASCII; anything else survives
    as latin-1, so no value is ever reported as another)."""
    return None if v is None else v.decode("latin-1")
