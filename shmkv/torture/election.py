"""How long a 3-voter Raft group (cluster/raft/core.py) is leaderless after its leader dies.

A deterministic experiment in virtual seconds, by default with the configuration service's
timing (config_service.TICK, ELECTION_TICKS, HEARTBEAT_TICKS): every node ticks every ``tick``
s at its own phase (the daemons' tickers are not in step either), a message takes a uniform
``latency`` (default 1-20 ms: a loaded machine), a client proposes to the leader every 20 ms
(entries keep flowing, as under load). Once a leader has served for a while it is killed at a
random moment (SIGKILL: it sends nothing more), and the result is the virtual time from the
kill until a survivor is leader. Same seed, same run.

``python -m shmkv.torture.election [--seeds 200] [--loss 0.01]`` prints the distribution
(``--tick 0.1 --election-ticks 10 --heartbeat-ticks 1 --retry-ticks 10``: the old timing);
tests/cluster/raft/test_election_time.py asserts it.
"""

from __future__ import annotations

import heapq
import itertools
import random
from typing import Any

from ..bench.stats import percentile
from ..cluster.config_service import ELECTION_TICKS, HEARTBEAT_TICKS, TICK
from ..cluster.raft.core import Config, RaftNode, Role
from ..cluster.raft.types import Snapshot

#: virtual seconds after the kill before a run gives up (a bound, never reached in practice).
GIVE_UP = 30.0


def leaderless_after_kill(
    seed: int,
    *,
    config: Config | None = None,
    tick: float = TICK,
    latency: tuple[float, float] = (0.001, 0.020),
    loss: float = 0.0,
    voters: int = 3,
    trace: list[tuple[float, str, str, int]] | None = None,
) -> float:
    """Seconds from killing the leader until a survivor leads (GIVE_UP if none does).
    ``config`` defaults to the configuration service's; its seed is replaced by ``seed``.
    ``trace`` collects (time, node, role, term) at every role or term change."""
    t, _ = _run(seed, config, tick, latency, loss, voters, trace, healthy_for=None)
    assert t is not None
    return t


def leader_terms_without_kill(
    seed: int,
    seconds: float,
    *,
    config: Config | None = None,
    tick: float = TICK,
    latency: tuple[float, float] = (0.001, 0.020),
    loss: float = 0.0,
    voters: int = 3,
) -> int:
    """How many terms had a leader in ``seconds`` of a healthy group under the same load, from
    its first leader on: 1 unless some election was spurious."""
    _, terms = _run(seed, config, tick, latency, loss, voters, None, healthy_for=seconds)
    return len(terms)


def _run(
    seed: int,
    config: Config | None,
    tick: float,
    latency: tuple[float, float],
    loss: float,
    voters: int,
    trace: list[tuple[float, str, str, int]] | None,
    healthy_for: float | None,
) -> tuple[float | None, set[int]]:
    rng = random.Random(f"election/{seed}")
    base = config or Config(election_ticks=ELECTION_TICKS, heartbeat_ticks=HEARTBEAT_TICKS)
    ids = [f"r{i}" for i in range(1, voters + 1)]
    nodes = {
        i: RaftNode(
            i,
            Config(**{**base.__dict__, "seed": seed}),
            snapshot=Snapshot(voters=tuple(ids)),
        )
        for i in ids
    }
    live = set(ids)
    events: list[tuple[float, int, str, Any]] = []
    seq = itertools.count()

    def push(at: float, kind: str, payload: Any) -> None:
        heapq.heappush(events, (at, next(seq), kind, payload))

    def ready(i: str, now: float) -> None:
        n = nodes[i]
        while n.has_ready():
            rd = n.ready()
            for m in rd.messages:
                if rng.random() >= loss:
                    push(now + rng.uniform(*latency), "msg", m)
            n.advance(rd)

    for i in ids:
        push(rng.uniform(0.0, tick), "tick", i)
    push(0.02, "propose", None)
    kill_after_lead = rng.uniform(2.0, 3.0)  # the leader serves this long, then dies
    led_since: float | None = None
    killed: tuple[float, int] | None = None  # (when, its term)
    terms: set[int] = set()
    k = 0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if killed is not None and now - killed[0] > GIVE_UP:
            return GIVE_UP, terms
        if healthy_for is not None and led_since is not None and now - led_since > healthy_for:
            return None, terms
        if kind == "tick":
            if payload not in live:
                continue
            nodes[payload].tick()
            push(now + tick, "tick", payload)
            touched = payload
        elif kind == "msg":
            if payload.dst not in live:
                continue
            nodes[payload.dst].step(payload)
            touched = payload.dst
        else:
            push(now + 0.02, "propose", None)
            lead = next((nodes[i] for i in sorted(live) if nodes[i].role == Role.LEADER), None)
            if lead is None:
                continue
            k += 1
            lead.propose(b"e%d" % k)
            touched = lead.id
        ready(touched, now)
        n = nodes[touched]
        if trace is not None and (not trace or trace[-1][1:] != (n.id, n.role.value, n.term)):
            trace.append((round(now, 3), n.id, n.role.value, n.term))
        if n.role != Role.LEADER:
            continue
        terms.add(n.term)
        if killed is None:
            led_since = led_since if led_since is not None else now
            if healthy_for is None and now - led_since >= kill_after_lead:
                live.discard(n.id)
                killed = (now, n.term)
        elif n.term > killed[1]:
            return now - killed[0], terms
    raise AssertionError("event heap ran dry")  # ticks reschedule themselves: unreachable


def distribution(times: list[float]) -> dict[str, float]:
    s = sorted(times)

    return {"n": len(s), "p50": percentile(s, 50), "p90": percentile(s, 90), "p99": percentile(s, 99), "max": s[-1]}


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--loss", type=float, default=0.0, help="fraction of messages lost")
    p.add_argument("--tick", type=float, default=TICK, help="seconds per tick")
    p.add_argument("--election-ticks", type=int, default=ELECTION_TICKS)
    p.add_argument("--heartbeat-ticks", type=int, default=HEARTBEAT_TICKS)
    p.add_argument("--retry-ticks", type=int, default=0, help="0: election_ticks // 4")
    p.add_argument("--voters", type=int, default=3)
    a = p.parse_args(argv)
    cfg = Config(election_ticks=a.election_ticks, heartbeat_ticks=a.heartbeat_ticks,
                 retry_ticks=a.retry_ticks)
    times = [
        leaderless_after_kill(s, config=cfg, tick=a.tick, loss=a.loss, voters=a.voters)
        for s in range(a.seeds)
    ]
    d = distribution(times)
    print(
        f"leader SIGKILL -> new leader over {d['n']} seeds (virtual s): p50 {d['p50']:.2f}"
        f" p90 {d['p90']:.2f} p99 {d['p99']:.2f} max {d['max']:.2f}"
    )
    over = sum(1 for t in times if t >= 2.5)
    print(f"runs >= 2.5 s: {over}; >= 3 s: {sum(1 for t in times if t >= 3.0)}")


if __name__ == "__main__":
    main()
