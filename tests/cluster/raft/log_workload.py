"""A seeded sequence of Raft persistence steps, and a writer that performs them on a DurableLog.

Run as a script (``python log_workload.py DIR SEED``) it persists step after step and prints
the step number to stdout after each one returns -- i.e. after its fsync: the acknowledgement.
The crash test SIGKILLs it at a random moment and recomputes the same steps (:func:`steps`)
to know what every acknowledged state was.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from shmkv.cluster.raft.log import DurableLog
from shmkv.cluster.raft.types import Entry, EntryKind, HardState, Ready, Snapshot


@dataclass
class Model:
    """What the log must hold after a step (the same rules as DurableLog, kept simple)."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot = field(default_factory=Snapshot)
    entries: list[Entry] = field(default_factory=list)

    def last(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot.index

    def copy(self) -> Model:
        return Model(self.hard_state, self.snapshot, list(self.entries))


def steps(seed: int, n: int) -> Iterator[tuple[str, object, Model]]:
    """(kind, argument, model after) for n steps: appends, conflicting appends that truncate a
    suffix, hard state changes, snapshots."""
    rng = random.Random(seed)
    m = Model()
    term = 1
    for k in range(n):
        r = rng.random()
        commit = m.hard_state.commit
        if r < 0.6 or not m.entries:
            es = [
                Entry(term, m.last() + 1 + i, EntryKind.NORMAL, rng.randbytes(rng.randint(0, 300)))
                for i in range(rng.randint(1, 5))
            ]
            m.entries += es
            yield "ready", Ready(entries=tuple(es)), m.copy()
        elif r < 0.7:
            term += 1
            lo = max(commit, m.snapshot.index) + 1
            at = rng.randint(lo, m.last() + 1)
            es = [
                Entry(term, at + i, EntryKind.NORMAL, b"c%d/%d" % (k, i))
                for i in range(rng.randint(1, 3))
            ]
            m.entries = [e for e in m.entries if e.index < at] + es
            hs = HardState(term, f"n{rng.randint(1, 3)}", commit)
            m.hard_state = hs
            yield "ready", Ready(entries=tuple(es), hard_state=hs), m.copy()
        elif r < 0.9:
            new_commit = rng.randint(commit, m.last())
            hs = HardState(term, m.hard_state.vote, new_commit)
            m.hard_state = hs
            yield "ready", Ready(hard_state=hs), m.copy()
        elif commit > m.snapshot.index:
            at = rng.randint(m.snapshot.index + 1, commit)
            t = next(e.term for e in m.entries if e.index == at)
            s = Snapshot(at, t, ("n1", "n2", "n3"), b"state@%d" % at)
            m.snapshot = s
            m.entries = [e for e in m.entries if e.index > at]
            yield "snapshot", s, m.copy()


def main() -> None:
    path, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    d = DurableLog(path)
    for k, (kind, arg, _) in enumerate(steps(seed, n)):
        if kind == "ready":
            assert isinstance(arg, Ready)
            d.persist(arg)
        else:
            assert isinstance(arg, Snapshot)
            d.save_snapshot(arg)
        print(k, flush=True)
    d.close()


if __name__ == "__main__":
    main()
