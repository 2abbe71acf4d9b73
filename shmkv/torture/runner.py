"""One torture run: start the cluster, run the workers and the nemesis, heal, read the final
states, check, report.

Order of a run (each step bounded in time):

1. ``cluster.start()``; workers (one client each) run for ``time`` seconds while the nemesis
   applies its seeded schedule;
2. the nemesis heals whatever is still broken, the workers stop;
3. ``cluster.settle(keys)`` (anti-entropy; local.py records what it saw in ``settled``, which
   goes into the history's metadata as ``settle`` and into the report), then one final read of every key by a fresh
   process (recorded in the history like any other op), then ``cluster.final_states(keys)``
   (local.py: of the ring's current members) and, with the daemons' configuration group, its
   observations (``cluster.group_history()``: polled during the run, plus a final poll);
4. ``cluster.stop()`` -- always, also when a step failed;
5. the history (JSON lines), the report (text and JSON) and the timeline PNG go to ``out``.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument
from .cluster import ClusterUnderTest
from .history import History, versions_to_final
from .nemesis import Nemesis, schedule
from .report import check_history, passed, render_text, to_json
from .verdict import Verdict
from .workload import Recorder, Worker

IMPLEMENTED = ("kill", "pause")


@dataclass
class RunConfig:
    time: float = 10.0
    seed: int = 0
    nemesis: list[str] = field(default_factory=list)
    workload: str = "register"
    clients: int = 4
    keys: int = 4
    op_timeout: float = 0.5
    cluster: str = "inprocess"
    nodes: int = 3
    think: float = 0.001  # seconds a worker waits between ops (bounds the history's size)
    raft: bool = False  # --cluster local: run the configuration group and watch it (always with scale)


@dataclass
class RunResult:
    history: History
    verdicts: list[Verdict]
    skipped: list[str]
    text: str
    errors: list[str]

    @property
    def passed(self) -> bool:
        return passed(self.verdicts) and not self.errors


def run(
    cluster: ClusterUnderTest, cfg: RunConfig, out: str | Path | None = None,
    *, time_limit: float = 10.0,
) -> RunResult:
    supported = getattr(cluster, "kinds", IMPLEMENTED)
    unsupported = [k for k in cfg.nemesis if k not in supported]
    if unsupported:
        raise InvalidArgument(
            f"nemesis {', '.join(unsupported)} is not implemented by the {cfg.cluster} cluster "
            f"(it injects {', '.join(supported)}): partition, loss, delay, hold, reset and skew need "
            "--cluster local (nftables and a proxy in a private network namespace, libfaketime), "
            "and so does scale (live scaling through the daemons' configuration group); "
            "crash needs --simulate"
        )
    faults = schedule(cfg.seed, cfg.time, cfg.nemesis, cluster.nodes)
    rec = Recorder()
    nemesis = Nemesis(cluster, faults, rec.t0)
    processes = itertools.count()
    shared: dict[str, Any] = {}
    errors: list[str] = []
    final: dict[str, dict[str, Any]] | None = None
    group: dict[str, Any] | None = None
    cluster.start()
    try:
        rec.t0 = nemesis.t0 = time.monotonic()  # the run's clock starts once the cluster is up
        watch = getattr(cluster, "watch", None)  # local.py with the configuration group: poll it
        if watch is not None:
            watch(rec.t0)
        workers = [
            Worker(cluster.client(cfg.op_timeout), rec, cfg.workload, cfg.keys,
                   cfg.seed * 1000 + i, cfg.time, processes, shared, think=cfg.think)
            for i in range(cfg.clients)
        ]
        nemesis.start()
        for w in workers:
            w.start()
        for w in workers:
            w.join(cfg.time + 10 * cfg.op_timeout + 30)
            if w.is_alive():
                errors.append(f"{w.name} did not stop")
            elif w.error is not None:
                errors.append(f"{w.name} crashed: {type(w.error).__name__}: {w.error}")
        nemesis.stop()
        nemesis.join(60)
        errors += nemesis.errors
        keys = sorted({o.key for o in rec.ops})
        cluster.settle([k.encode() for k in keys])
        # The final reads: a fresh process per key, after every fault healed.
        reader = Worker(cluster.client(max(cfg.op_timeout, 2.0)), rec, cfg.workload, 0, 0,
                        0, processes, shared)
        for k in keys:
            reader.invoke("read", k)
        states = cluster.final_states([k.encode() for k in keys])
        group_history = getattr(cluster, "group_history", None)
        group = group_history() if group_history is not None else None
        if group is not None:
            errors += group.pop("errors")
        if cfg.workload != "counter":
            final = versions_to_final(
                {n: {k.decode(): vs for k, vs in held.items()} for n, held in states.items()}
            )
    finally:
        cluster.stop()
    meta = {**asdict(cfg), **{k: v for k, v in cluster.config.items() if v is not None}}
    settled = getattr(cluster, "settled", None)  # local.py: what waiting for anti-entropy saw
    if settled:
        meta["settle"] = dict(settled)
    h = History(ops=rec.ops, meta=meta, final=final, faults=nemesis.log, group=group)
    verdicts, skipped = check_history(h, time_limit=time_limit)
    text = render_text(h, verdicts, skipped)
    if settled:
        text += (f"\nsettle: anti-entropy converged the stored copies in {settled['seconds']} s"
                 if settled.get("converged") else
                 f"\nsettle: {settled.get('differ')} keys' stored copies still differed after "
                 f"{settled['seconds']} s (see convergence)")
    if errors:
        text += "\nharness errors:\n" + "\n".join(f"  {e}" for e in errors)
    if out is not None:
        write_outputs(Path(out), h, verdicts, skipped, text)
    return RunResult(h, verdicts, skipped, text, errors)


def write_outputs(out: Path, h: History, verdicts: list[Verdict], skipped: list[str], text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    h.save(out / "history.jsonl")
    (out / "report.txt").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps(to_json(h, verdicts, skipped), indent=1) + "\n")
    try:
        from .plot import PlotUnavailable, timeline

        timeline(h, out / "timeline.png")
    except PlotUnavailable as e:
        (out / "report.txt").write_text(text + f"\n(no timeline: {e})\n")


def make_cluster(cfg: RunConfig, bug: str | None = None) -> ClusterUnderTest:
    """The cluster named by ``cfg.cluster``: ``inprocess`` (the reference) or ``local`` (real
    daemons on 127.0.0.1 through tools/cluster.py, see local.py)."""
    if cfg.cluster == "inprocess" and not cfg.raft:
        from .inprocess import InProcessCluster

        return InProcessCluster(cfg.nodes, seed=cfg.seed, bug=bug)
    if cfg.cluster == "local":
        if bug is not None:
            raise InvalidArgument("--bug breaks the in-process cluster only")
        from .local import LocalCluster

        return LocalCluster(cfg.nodes, nemesis=cfg.nemesis, raft=True if cfg.raft else None)
    if cfg.raft:
        raise InvalidArgument("--raft needs --cluster local (the daemons' configuration group)")
    raise InvalidArgument(f"unknown cluster {cfg.cluster!r}: expected inprocess or local")
