"""The real daemons' configuration group, watched: observations polled from every node during a
``--cluster local`` run, and the checker over them (``raft-group`` in the report).

raft.py's :func:`~shmkv.torture.raft.check_raft` needs every node's whole log, which only the
simulated group (raftsim.py) can show. A daemon shows less: its answer to CONFIG (the
``raft`` view of config_service.ConfigService.status and the committed configuration). The
:class:`GroupWatcher` thread asks every node for it every ``POLL_INTERVAL`` s and records one
observation per answer::

    {"t": s since the run began, "node": name, "pid": the daemon's pid (its incarnation),
     "role": "leader"|"follower"|"candidate"|... (None: a learner, no Raft member),
     "term", "leader": who the node follows in that term (None: nobody), "commit", "applied",
     "epoch": the ring epoch it serves by, "config_epoch": the epoch of its committed
     configuration, "config": a digest of it}

An answer is kept only if the node's pid was the same before and after the request (a restart
in between could pair an old process's name with a new one's state). :func:`check_group` then
checks what those observations can show of Raft's promises:

- *election safety*: at most one leader per term, across every observation -- a node's own
  ``role == "leader"`` and a follower's ``leader`` at its term both name the term's leader;
- *monotonic*: within one incarnation a node's commit index, applied index, committed epoch and
  the ring epoch it serves by never go down ("never goes back to an older epoch"); across a restart (its Raft log in its ``--raft-dir``) its committed epoch and
  its commit index never fall below the epoch / the applied index it had reported before (what
  it applied, it had persisted as committed: the durability contract, config_service.py). Only
  for a voter (an observation with a ``role``): a learner holds no log, so a restarted one
  reports no configuration (epoch 0) until its first pull -- by design, not checked;
- *one configuration per epoch*: every node reporting committed epoch E reports the same
  configuration (state machine safety of the configuration log);
- *no committed configuration lost*: the last poll (``final``, after the run healed) finds a
  node whose committed epoch is at least every epoch any node ever reported committed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from .raft import _dedupe  # one copy: the same problem seen twice is one problem
from .verdict import Problem, Verdict, combine

POLL_INTERVAL = 0.2  # seconds between two polls of every node
REQUEST_TIMEOUT = 0.3  # a node that does not answer in time (paused, killed) is skipped this round

#: () -> [(name, addr, pid)] of the nodes to poll now (a node being started or stopped is absent)
Targets = Callable[[], list[tuple[str, str, int | None]]]


def digest(config_wire: Any) -> str | None:
    if config_wire is None:
        return None
    return hashlib.blake2b(json.dumps(config_wire, sort_keys=True, default=repr).encode(),
                           digest_size=8).hexdigest()


def observation(t: float, name: str, pid: int | None, fields: dict[str, Any]) -> dict[str, Any]:
    """One CONFIG answer (``fields``: the reply's ``raft`` and ``config``) as an observation."""
    raft = fields.get("raft") or {}
    return {
        "t": round(t, 4), "node": name, "pid": pid, "role": raft.get("role"),
        "term": raft.get("term"), "leader": raft.get("leader"), "commit": raft.get("commit"),
        "applied": raft.get("applied"), "epoch": raft.get("epoch"), "config_epoch": raft.get("config_epoch"),
        "config": digest(fields.get("config")),
    }


class GroupWatcher(threading.Thread):
    """Polls ``targets()`` every ``POLL_INTERVAL`` s until :meth:`stop`; ``observations`` grows."""

    def __init__(self, targets: Targets, t0: float | None = None) -> None:
        super().__init__(name="group-watcher", daemon=True)
        self.targets = targets
        self.t0 = time.monotonic() if t0 is None else t0
        self.observations: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            asyncio.run(self._loop())
        except Exception as e:  # noqa: BLE001 -- reported with the run, never fatal to it
            self.errors.append(f"group watcher: {type(e).__name__}: {e}")

    async def _loop(self) -> None:
        from ..cluster.transport import TcpTransport

        t = TcpTransport()
        try:
            while not self._halt.is_set():
                self.observations.extend(await self.poll_once(t))
                await asyncio.sleep(POLL_INTERVAL)
        finally:
            await t.close()

    async def poll_once(self, t: Any) -> list[dict[str, Any]]:
        """Ask every target once (concurrently); the observations kept (not added to
        ``observations``: the caller decides)."""
        from ..cluster import wire
        from ..cluster.wire import Message

        try:
            before = self.targets()
        except Exception:  # noqa: BLE001 -- cluster.json being rewritten: next round
            return []

        async def ask(name: str, addr: str, pid: int | None) -> dict[str, Any] | None:
            try:
                reply = await t.request(addr, Message(wire.CONFIG, 0, {}), REQUEST_TIMEOUT)
            except Exception:  # noqa: BLE001 -- down, paused or cut off: nothing observed
                return None
            if not isinstance(reply.fields.get("raft"), dict):
                return None
            return observation(time.monotonic() - self.t0, name, pid, dict(reply.fields))

        got = await asyncio.gather(*(ask(*x) for x in before))
        try:
            after = {name: pid for name, _, pid in self.targets()}
        except Exception:  # noqa: BLE001
            return []
        return [o for o in got if o is not None and after.get(o["node"]) == o["pid"]]


def _problem(msg: str, *obs: dict[str, Any]) -> Problem:
    return Problem(msg, extra={"observations": list(obs)})


def check_group(observations: Iterable[dict[str, Any]], final: Iterable[dict[str, Any]] | None = None) -> Verdict:
    """The properties in the module docstring over ``observations`` (in poll order); ``final``:
    the observations of the last poll after the run (default: none, that check is skipped)."""
    obs = list(observations)
    problems: list[Problem] = []
    # Election safety: term -> (leader, the observation that named it).
    leaders: dict[int, tuple[str, dict[str, Any]]] = {}
    for o in obs:
        term = o.get("term")
        if term is None:
            continue
        who = o["node"] if o.get("role") == "leader" else o.get("leader")
        if not who:
            continue
        first = leaders.setdefault(term, (who, o))
        if first[0] != who:
            problems.append(_problem(f"two leaders in term {term}: {first[0]!r} (seen by {first[1]['node']!r}) "
                                     f"and {who!r} (seen by {o['node']!r})", first[1], o))
    # Monotonic, per node; per incarnation (pid) for the volatile parts.
    last: dict[str, dict[str, Any]] = {}  # node -> its previous observation
    current: dict[str, dict[str, tuple[int, dict[str, Any]]]] = {}  # node -> field -> this incarnation's max
    prior: dict[str, dict[str, tuple[int, dict[str, Any]]]] = {}  # ... of every earlier incarnation
    for o in obs:
        n, prev = o["node"], last.get(o["node"])
        if prev is not None and prev.get("pid") == o.get("pid"):
            for f in ("commit", "applied", "config_epoch", "epoch"):
                if o.get(f) is not None and prev.get(f) is not None and o[f] < prev[f]:
                    problems.append(_problem(f"{n!r}'s {f} went back from {prev[f]} to {o[f]} "
                                             f"(same process, pid {o.get('pid')})", prev, o))
        elif prev is not None:  # a new incarnation: fold the old one's highs into prior
            for f, hi in current.pop(n, {}).items():
                if f not in prior.setdefault(n, {}) or hi[0] > prior[n][f][0]:
                    prior[n][f] = hi
        floor = prior.get(n, {})
        if o.get("commit") is not None and "applied" in floor and o["commit"] < floor["applied"][0]:
            problems.append(_problem(f"{n!r} restarted with commit index {o['commit']}, below the "
                                     f"{floor['applied'][0]} entries it had applied before", floor["applied"][1], o))
        if o.get("role") is not None and o.get("config_epoch") is not None and "config_epoch" in floor \
                and o["config_epoch"] < floor["config_epoch"][0]:  # a voter: its log is durable
            problems.append(_problem(f"{n!r} restarted at committed epoch {o['config_epoch']}, below the "
                                     f"epoch {floor['config_epoch'][0]} it had committed before",
                                     floor["config_epoch"][1], o))
        for f in ("applied", "config_epoch"):
            v = o.get(f)
            if v is not None and (f not in current.setdefault(n, {}) or v > current[n][f][0]):
                current[n][f] = (v, o)
        last[n] = o
    # One configuration per epoch.
    configs: dict[int, tuple[str, dict[str, Any]]] = {}
    for o in obs:
        ep, cfg = o.get("config_epoch"), o.get("config")
        if ep is None or cfg is None:
            continue
        first_c = configs.setdefault(ep, (cfg, o))
        if first_c[0] != cfg:
            problems.append(_problem(f"epoch {ep} committed as two configurations: {first_c[0]} on "
                                     f"{first_c[1]['node']!r}, {cfg} on {o['node']!r}", first_c[1], o))
    # No committed configuration lost.
    extra: dict[str, Any] = {"observations": len(obs), "terms": len(leaders),
                             "epochs": [min(configs), max(configs)] if configs else []}
    if final is not None:
        fin = [o for o in final if o.get("config_epoch") is not None]
        top = max((o for o in obs if o.get("config_epoch") is not None),
                  key=lambda o: o["config_epoch"], default=None)
        if not fin:
            problems.append(Problem("no node answered the final poll of the configuration group"))
        elif top is not None:
            best = max(fin, key=lambda o: o["config_epoch"])
            if best["config_epoch"] < top["config_epoch"]:
                problems.append(_problem(
                    f"committed epoch {top['config_epoch']} (reported by {top['node']!r}) is lost: the "
                    f"final poll's highest is {best['config_epoch']}", top, best))
        extra["final_epoch"] = max((o["config_epoch"] for o in fin), default=None)
    return combine("raft-group", _dedupe(problems), [], **extra)
