"""A reference cluster in one process, for testing the torture machinery itself.

N replicas as dicts of VersionSets and PN-counters (the real version algebra of
shmkv/cluster/), every node a replica of every key, one global lock: each request takes effect
at one instant between its invocation and its answer. A write reaches the coordinator and W - 1
other replicas at once and the rest later (replication in flight, delivered at random moments
and at ``settle``); a read merges R replicas and repairs them before answering. Kill makes a node refuse requests (it
keeps its state, as a node with ``--path`` and fsync would); pause makes requests it coordinates
hang until the client's timeout -- and they still take effect when the node resumes, as a
request queued in a stopped process's socket does. A correct configuration (R + W > N, reads
that repair every replica they read before answering) passes every checker; ``bug=`` breaks one
thing on purpose so tests can show a torture run catching it:

- ``"ack-one"``: a write is acknowledged after the coordinator alone has it (W = 1 in
  disguise) and a killed node restarts empty (memory only), its unsent replication gone:
  acknowledged writes are lost;
- ``"stale-read"``: a read answers from one random replica, without repair: stale reads;
- ``"lww-repair"``: read repair keeps only the newest sibling (last write wins): concurrent
  acknowledged writes are silently dropped.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..cluster.crdt import PNCounter
from ..cluster.errors import MaybeApplied, QuorumError
from ..cluster.versions import Context, VersionSet

BUGS = ("ack-one", "stale-read", "lww-repair")


class InProcessCluster:
    def __init__(
        self, nodes: int = 3, *, w: int = 2, r: int = 2, seed: int = 0, bug: str | None = None
    ) -> None:
        if bug is not None and bug not in BUGS:
            raise ValueError(f"unknown bug {bug!r}: expected one of {BUGS}")
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.config: dict[str, Any] = {"n": nodes, "w": w, "r": r, "sloppy": False, "bug": bug}
        self.bug = bug
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.data: dict[str, dict[bytes, VersionSet]] = {n: {} for n in self.nodes}
        self.counters: dict[str, dict[bytes, PNCounter]] = {n: {} for n in self.nodes}
        self.down: set[str] = set()
        self.paused: set[str] = set()
        self._queued: dict[str, list[Callable[[], Any]]] = {n: [] for n in self.nodes}
        self._incarnation = dict.fromkeys(self.nodes, 0)
        # Replication in flight: (node, table, key, version, from) not yet delivered.
        self._deferred: list[tuple[str, dict[str, dict[bytes, Any]], bytes, Any, str]] = []

    # -- ClusterUnderTest -------------------------------------------------------------------------

    def start(self) -> None:
        pass

    def stop(self) -> None:
        with self._lock:
            for n in list(self.paused):
                self._resume_locked(n)

    def kill(self, node: str) -> None:
        with self._lock:
            self.down.add(node)
            self._queued[node].clear()
            if self.bug == "ack-one":
                # a memory-only node loses what it holds and what it had not sent yet
                self._deferred = [d for d in self._deferred if node not in (d[0], d[4])]
            self.paused.discard(node)
            if self.bug == "ack-one":
                self.data[node] = {}
                self.counters[node] = {}

    def restart(self, node: str) -> None:
        with self._lock:
            self.down.discard(node)
            self._incarnation[node] += 1

    def pause(self, node: str) -> None:
        with self._lock:
            self.paused.add(node)

    def resume(self, node: str) -> None:
        with self._lock:
            self._resume_locked(node)

    def _resume_locked(self, node: str) -> None:
        self.paused.discard(node)
        queued, self._queued[node] = self._queued[node], []
        for job in queued:
            try:
                job()
            except QuorumError:
                pass

    def client(self, timeout: float) -> InProcessClient:
        return InProcessClient(self, timeout, self._rng.randrange(2**32))

    def settle(self, keys: Iterable[bytes]) -> None:
        """Anti-entropy: every replica merges every other's state."""
        with self._lock:
            for n, table, key, x, _ in self._deferred:
                cur = table[n].get(key)
                table[n][key] = x if cur is None else cur.merge(x)
            self._deferred = []
            for table in (self.data, self.counters):
                for k in {k for held in table.values() for k in held}:
                    merged: Any = None
                    for n in self.nodes:
                        x = table[n].get(k)
                        if x is not None:
                            merged = x if merged is None else merged.merge(x)
                    for n in self.nodes:
                        table[n][k] = merged

    def final_states(self, keys: Iterable[bytes]) -> dict[str, dict[bytes, VersionSet]]:
        wanted = set(keys)
        with self._lock:
            return {n: {k: v for k, v in held.items() if k in wanted} for n, held in self.data.items()}

    # -- one request, under the lock ---------------------------------------------------------------

    def _actor(self, node: str) -> str:
        # A node that may have forgotten its dots mints under a fresh actor (versions.py REQUIRES).
        inc = self._incarnation[node]
        return node if not inc or self.bug != "ack-one" else f"{node}@{inc}"

    def _up(self) -> list[str]:
        return [n for n in self.nodes if n not in self.down and n not in self.paused]

    def _need(self, k: int, what: str) -> list[str]:
        up = self._up()
        if len(up) < k:
            raise QuorumError(
                f"{len(up)} of {len(self.nodes)} replicas up, {what} = {k}",
                needed=k, answered=len(up), n=len(self.nodes),
            )
        return up

    def _spread(self, coord: str, table: dict[str, dict[bytes, Any]], key: bytes, x: Any, w: int) -> None:
        """``x`` (already on ``coord``) onto w - 1 more up replicas now, the rest later."""
        others = [n for n in self._up() if n != coord]
        self._rng.shuffle(others)
        for n in others[: w - 1]:
            cur = table[n].get(key)
            table[n][key] = x if cur is None else cur.merge(x)
        for n in self.nodes:
            if n != coord and n not in others[: w - 1]:
                self._deferred.append((n, table, key, x, coord))

    def _pump(self) -> None:
        """Deliver some of the replication still in flight (to nodes that are up)."""
        keep = []
        up = set(self._up())
        for item in self._deferred:
            n, table, key, x, _ = item
            if n in up and self._rng.random() < 0.3:
                cur = table[n].get(key)
                table[n][key] = x if cur is None else cur.merge(x)
            else:
                keep.append(item)
        self._deferred = keep

    def _write_locked(self, coord: str, key: bytes, value: bytes | None, ctx: Context | None) -> Context:
        w = 1 if self.bug == "ack-one" else self.config["w"]
        self._need(w, "W")
        new = self.data[coord].get(key, VersionSet()).put(value, ctx, self._actor(coord))
        self.data[coord][key] = new
        self._spread(coord, self.data, key, new, w)
        return new.context

    def _read_set(self, coord: str) -> list[str]:
        r = 1 if self.bug == "stale-read" else self.config["r"]
        up = self._need(r, "R")
        others = [n for n in up if n != coord]
        self._rng.shuffle(others)
        return [coord, *others][:r]

    def _read_locked(self, coord: str, key: bytes) -> VersionSet:
        frm = self._read_set(coord)
        merged = VersionSet()
        for n in frm:
            merged = merged.merge(self.data[n].get(key, VersionSet()))
        if self.bug == "stale-read":
            return merged  # one replica, no repair
        if self.bug == "lww-repair" and len(merged.siblings) > 1:
            newest = max(merged.siblings, key=lambda s: (s.dot[1], s.dot[0]))
            merged = VersionSet(merged.clock, [newest])  # the bug: replace, not merge
        for n in frm:  # read repair before answering: every replica read holds the answer
            self.data[n][key] = merged
        return merged

    def _incr_locked(self, coord: str, key: bytes, delta: int) -> int:
        w = self.config["w"]
        self._need(w, "W")
        # Merge R replicas into the coordinator's first, so the value it answers includes every
        # completed increment (R + W > N), then count under the coordinator's own entry.
        c = PNCounter()
        for n in self._read_set(coord):
            c = c.merge(self.counters[n].get(key, PNCounter()))
        c = c.increment(self._actor(coord), delta)
        self.counters[coord][key] = c
        self._spread(coord, self.counters, key, c, w)
        return c.value

    def _counter_locked(self, coord: str, key: bytes, frm: list[str] | None = None) -> int:
        c = PNCounter()
        for n in frm if frm is not None else self._read_set(coord):
            c = c.merge(self.counters[n].get(key, PNCounter()))
        return c.value

    def request(self, coord: str, timeout: float, job: Callable[[], Any], writes: bool) -> Any:
        with self._lock:
            self._pump()
            if coord in self.down:
                raise ConnectionRefusedError(f"{coord} is down")
            if coord not in self.paused:
                return job()
            self._queued[coord].append(job)  # runs when the node resumes
        time.sleep(timeout)
        if writes:
            raise MaybeApplied(f"{coord} did not answer within {timeout} s: the write may have been applied")
        raise TimeoutError(f"{coord} did not answer within {timeout} s")


class InProcessClient:
    def __init__(self, cluster: InProcessCluster, timeout: float, seed: int) -> None:
        self.c = cluster
        self.timeout = timeout
        self.rng = random.Random(seed)

    def _coord(self) -> str:
        return self.rng.choice(self.c.nodes)

    def get_versions(self, key: bytes) -> tuple[list[bytes | None], Context]:
        coord = self._coord()
        vs = self.c.request(coord, self.timeout, lambda: self.c._read_locked(coord, key), False)
        return vs.values, vs.context

    def put(self, key: bytes, value: bytes, context: Context | None) -> Context:
        coord = self._coord()
        return self.c.request(coord, self.timeout, lambda: self.c._write_locked(coord, key, value, context), True)  # type: ignore[no-any-return]

    def delete(self, key: bytes, context: Context | None) -> Context | None:
        coord = self._coord()
        return self.c.request(coord, self.timeout, lambda: self.c._write_locked(coord, key, None, context), True)  # type: ignore[no-any-return]

    def incr(self, key: bytes, delta: int) -> int:
        coord = self._coord()
        return self.c.request(coord, self.timeout, lambda: self.c._incr_locked(coord, key, delta), True)  # type: ignore[no-any-return]

    def read_counter(self, key: bytes) -> int:
        coord = self._coord()
        return self.c.request(coord, self.timeout, lambda: self.c._counter_locked(coord, key), False)  # type: ignore[no-any-return]

    def close(self) -> None:
        pass
