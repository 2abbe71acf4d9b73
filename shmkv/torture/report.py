"""Every checker over one history, and the report: pass/fail/unknown per checker, the smallest
failing sub-history of each problem, the seed and the command that replays the run.

A checker whose input the history lacks (no final states: lost writes and convergence; no Raft
observations) is *skipped*, listed as such, and does not decide the exit status; ``unknown``
does (it is not a pass). Linearizability (of registers; counters get their bounds check),
the counters' bounds and "no read returns a superseded value" judge reads
against acknowledged writes, which only a strict configuration promises (R + W > N, hints not
counted): with any other configuration in the history's metadata they are skipped and the
final-state checks carry the proof.
"""

from __future__ import annotations

import json
from typing import Any

from . import linearizable
from .checkers import (
    check_convergence,
    check_lost_writes,
    check_siblings,
    check_superseded,
    merged_final,
)
from .group import check_group
from .history import History
from .raft import check_raft
from .simconfig import SimConfig
from .simconfig import replay_command as sim_replay
from .verdict import PASS, Verdict


def is_strict(meta: dict[str, Any]) -> bool:
    """R + W > N without hinted (sloppy) writes counting; True when the metadata is silent."""
    n, w, r = meta.get("n"), meta.get("w"), meta.get("r")
    if None in (n, w, r):
        return not meta.get("sloppy", False)
    return bool(r + w > n and not meta.get("sloppy", False))  # type: ignore[operator]


def check_history(
    h: History, *, time_limit: float = 10.0, shrink_budget: float = 10.0
) -> tuple[list[Verdict], list[str]]:
    """(verdicts, skipped): each applicable checker's verdict, and why the others were skipped."""
    verdicts: list[Verdict] = []
    skipped: list[str] = []
    strict = is_strict(h.meta)
    if strict:
        # Counter keys are CRDTs: checked for their bounds, not for linearizability (why:
        # linearizable.check_counters).
        verdicts.append(
            linearizable.check(h, time_limit=time_limit, shrink_budget=shrink_budget, counters=False)
        )
        if any(o.f == "incr" for o in h.ops):
            verdicts.append(linearizable.check_counters(h))
    else:
        skipped.append("linearizable: not a strict configuration (R + W <= N or sloppy quorum)")
    final = h.final_versions()
    merged = merged_final(final) if final is not None else None
    if merged is not None:
        verdicts.append(check_lost_writes(h, merged))
    else:
        skipped.append("lost-writes: the history holds no final states")
    verdicts.append(check_superseded(h, merged, strict=strict))
    verdicts.append(check_siblings(h))
    if final is not None:
        verdicts.append(check_convergence(final))
    else:
        skipped.append("convergence: the history holds no final states")
    if h.raft is not None:
        verdicts.append(check_raft(h.raft))
    if h.group is not None:
        verdicts.append(check_group(h.group.get("observations") or [], h.group.get("final")))
    return verdicts, skipped


def passed(verdicts: list[Verdict]) -> bool:
    return all(v.status == PASS for v in verdicts)


def replay_command(meta: dict[str, Any]) -> str | None:
    if "seed" not in meta:
        return None
    if meta.get("simulate"):
        fields = SimConfig.__dataclass_fields__
        return sim_replay(SimConfig(**{k: v for k, v in meta.items() if k in fields}))
    parts = ["shmkv torture", f"--seed {meta['seed']}"]
    for k in ("time", "workload", "cluster", "nodes", "clients", "keys"):
        if k in meta:
            parts.append(f"--{k} {meta[k]}")
    if meta.get("nemesis"):
        parts.append(f"--nemesis {','.join(meta['nemesis'])}")
    if meta.get("raft") and meta.get("cluster") == "local" and "scale" not in (meta.get("nemesis") or []):
        parts.append("--raft")  # the daemons' configuration group (scale turns it on by itself)
    return " ".join(parts)


def _op_line(d: dict[str, Any]) -> str:
    t1 = d.get("t1")
    span = f"[{d['t0']:.6f}, {'...' if t1 is None else f'{t1:.6f}'}]"
    what = {"read": f"read -> {d.get('r')!r}", "write": f"write {d.get('v')!r}",
            "delete": "delete", "incr": f"incr {d.get('v')} -> {d.get('r')!r}",
            "cas": f"cas {d.get('v')!r} -> {d.get('r')!r}"}.get(d["f"], d["f"])
    ctx = "".join(f" {k}={d[k]}" for k in ("ci", "co") if k in d)
    return f"    op {d['i']:>6} p{d['p']:<4} {span:>30} {d['o']:>7}  {what}{ctx}"


def render_text(h: History, verdicts: list[Verdict], skipped: list[str]) -> str:
    lines = []
    meta = h.meta
    lines.append(
        f"history: {len(h.ops)} ops, {len({o.key for o in h.ops})} keys, {len(h.faults)} faults"
        + (f", seed {meta['seed']}" if "seed" in meta else "")
    )
    for v in verdicts:
        stats = ", ".join(f"{k} {val}" for k, val in v.stats.items())
        lines.append(f"{v.checker:14} {v.status.upper():8} {stats}")
        for p in v.problems[:5]:
            lines.append(f"  - {p.message}" + ("" if p.shrunk else " (shrinking stopped at its budget)"))
            for o in p.ops[:20]:
                lines.append(_op_line(o.to_json()))
            if "observations" in p.extra:
                for ob in p.extra["observations"]:
                    lines.append(f"    {json.dumps(ob)}")
        if len(v.problems) > 5:
            lines.append(f"  ... and {len(v.problems) - 5} more")
        for u in v.unknown[:5]:
            lines.append(f"  ? {u}")
    for s in skipped:
        lines.append(f"{'skipped':14} {s}")
    lines.append("verdict: " + ("PASS" if passed(verdicts) else "FAIL (exit status 1)"))
    cmd = replay_command(meta)
    if cmd and not passed(verdicts):
        lines.append(f"replay: {cmd}")
    return "\n".join(lines)


def to_json(h: History, verdicts: list[Verdict], skipped: list[str]) -> dict[str, Any]:
    return {
        "meta": h.meta, "ops": len(h.ops), "faults": len(h.faults), "passed": passed(verdicts),
        "verdicts": [v.to_json() for v in verdicts], "skipped": skipped,
        "replay": replay_command(h.meta),
    }
