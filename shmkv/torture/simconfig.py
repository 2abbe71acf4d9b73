"""A simulated run's settings (``SimConfig``) and the command that replays it: what both
simulate.py (which runs it) and report.py (which prints the replay line) need, in a module of
its own so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field

SIM_NEMESES = ("kill", "partition", "loss", "delay")


@dataclass
class SimConfig:
    seed: int = 0
    time: float = 6.0  # virtual seconds of client load
    nodes: int = 3
    n: int = 3
    w: int = 2
    r: int = 2
    clients: int = 4
    keys: int = 3
    workload: str = "register"
    nemesis: list[str] = field(default_factory=lambda: list(SIM_NEMESES))
    op_timeout: float = 0.5
    bug: str | None = None
    raft: bool = True  # also run the Raft core under the same seed (raftsim.py)
    #: what makes the replicas converge after the faults heal: "ae" (anti-entropy rounds every
    #: ae_interval virtual s, throughout the run) or "hints" (no anti-entropy exchanges: hinted
    #: handoff alone must bring every replica every write it missed; refused with kill, since
    #: a coordinator killed mid-write leaves a copy no hint covers -- anti-entropy's job)
    converge: str = "ae"
    ae_interval: float = 0.5
    #: tombstone grace (virtual s); None: the run's time plus 0.5 s, so that tombstones are
    #: collected while the run settles, after the clients stopped (antientropy.py's known gap:
    #: a write through a replica that already collected the key may mint a dot a lagging
    #: replica's tombstone has seen)
    grace: float | None = None

    @property
    def grace_s(self) -> float:
        return self.time + 0.5 if self.grace is None else self.grace


def replay_command(cfg: SimConfig) -> str:
    parts = [f"shmkv torture --simulate --seed {cfg.seed} --time {cfg.time:g}",
             f"--workload {cfg.workload} --nodes {cfg.nodes} --clients {cfg.clients} --keys {cfg.keys}",
             f"--op-timeout {cfg.op_timeout:g} --nemesis {','.join(cfg.nemesis) or 'none'}"]
    if cfg.converge != "ae":
        parts.append(f"--converge {cfg.converge}")
    if cfg.grace is not None:
        parts.append(f"--grace {cfg.grace:g}")
    if cfg.bug:
        parts.append(f"--bug {cfg.bug}")
    return " ".join(parts)
