"""Client workers: each issues operations one at a time and records them in the history.

Workloads:

- ``register``: read / write / delete over a few keys. Every value is unique (``"<process>-<n>"``)
  and every write or delete carries the context of the process' last operation on that key (its
  last read's or put's), so the version checkers know what each write superseded: a process
  without a context for the key reads it first;
- ``set``: each write goes to a fresh key (an insert-only set of keys), reads pick written
  keys: every acknowledged insert must survive (the lost-write checker over many keys);
- ``counter``: increments (random deltas, some negative) and reads of a few counters.

Outcomes (cluster.py): ok; fail for a refused request or a QuorumError that is not
MaybeApplied; unknown for MaybeApplied, a timeout or a dropped connection. After an unknown op
the worker continues as a *new process id* (Jepsen's convention): its old op may still be in
flight, so the process that issued it never "completes" -- the checkers rely on processes being
sequential.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from typing import Any

from ..cluster.errors import MaybeApplied, QuorumError
from ..cluster.versions import Context
from .cluster import KVClient
from .history import DELETE, FAIL, INCR, OK, READ, UNKNOWN, WRITE, Op, value_text

WORKLOADS = ("register", "set", "counter")


class Recorder:
    """The ops of a run, from every worker thread; times in seconds since ``t0``."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.ops: list[Op] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def record(self, op: Op) -> None:
        with self._lock:
            op.id = next(self._ids)
            self.ops.append(op)


def classify(e: BaseException) -> str:
    if isinstance(e, MaybeApplied):
        return UNKNOWN
    if isinstance(e, (QuorumError, ConnectionRefusedError)):
        return FAIL
    return UNKNOWN  # timeouts, resets, anything unexpected: we do not know


def _clock(ctx: Context | None) -> dict[str, int] | None:
    return None if ctx is None else ctx.clock


class Worker(threading.Thread):
    """One client thread. ``processes`` is shared by all workers (fresh ids after unknowns)."""

    def __init__(
        self,
        client: KVClient,
        recorder: Recorder,
        workload: str,
        keys: int,
        seed: int,
        until: float,
        processes: itertools.count[int],
        shared: dict[str, Any],
        think: float = 0.0,
    ) -> None:
        super().__init__(name=f"worker-{seed}", daemon=True)
        self.client, self.rec, self.workload = client, recorder, workload
        self.keys = [f"k{i}" for i in range(keys)]
        self.rng = random.Random(seed)
        self.until = until
        self.processes = processes
        self.process = next(processes)
        self.shared = shared  # "set" workload: the keys inserted so far, across workers
        self.ctx: dict[str, Context] = {}
        self.n = 0
        self.error: BaseException | None = None
        self.think = think

    def run(self) -> None:
        try:
            while self.rec.now() < self.until:
                self.step()
                if self.think:
                    time.sleep(self.think)
        except BaseException as e:  # a bug in the harness itself: surfaced by the runner
            self.error = e

    def step(self) -> None:
        rng = self.rng
        if self.workload == "counter":
            key = rng.choice(self.keys)
            if rng.random() < 0.6:
                self.invoke(INCR, key, rng.choice((1, 1, 2, 5, -1, -3)))
            else:
                self.invoke(READ, key)
        elif self.workload == "set":
            inserted: list[str] = self.shared.setdefault("inserted", [])
            if rng.random() < 0.6 or not inserted:
                self.n += 1
                key = f"s{self.process}-{self.n}"
                inserted.append(key)
                self.invoke(WRITE, key, f"{self.process}-{self.n}")
            else:
                self.invoke(READ, rng.choice(inserted))
        else:
            key = rng.choice(self.keys)
            roll = rng.random()
            if key not in self.ctx:
                self.invoke(READ, key)  # no blind writes: what each write supersedes is known
            elif roll < 0.45:
                self.n += 1
                self.invoke(WRITE, key, f"{self.process}-{self.n}")
            elif roll < 0.55:
                self.invoke(DELETE, key)
            else:
                self.invoke(READ, key)

    def invoke(self, f: str, key: str, value: Any = None) -> None:
        c = self.client
        k = key.encode()
        ctx = self.ctx.get(key)
        counter = self.workload == "counter"
        op = Op(0, self.process, key, f, self.rec.now(), value=value)
        if f in (WRITE, DELETE):
            op.ctx_in = _clock(ctx)
        try:
            if f == READ and counter:
                op.result = c.read_counter(k)
            elif f == READ:
                values, got = c.get_versions(k)
                op.result = [value_text(v) for v in values]
                op.ctx_out = got.clock
                self.ctx[key] = got
            elif f == WRITE:
                got = c.put(k, value.encode(), ctx)
                op.ctx_out = got.clock
                self.ctx[key] = got
            elif f == DELETE:
                got_d = c.delete(k, ctx)
                op.ctx_out = _clock(got_d)
                if got_d is not None:
                    self.ctx[key] = got_d
                else:
                    self.ctx.pop(key, None)
            elif f == INCR:
                op.result = c.incr(k, value)
            op.outcome = OK
        except Exception as e:
            op.outcome = classify(e)
            op.error = f"{type(e).__name__}: {e}"[:200]
        op.complete = self.rec.now()
        self.rec.record(op.validate())
        if op.outcome == UNKNOWN:
            self.process = next(self.processes)
            self.ctx.clear()
