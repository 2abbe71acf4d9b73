"""A bounded SIGKILL soak of one host's persistent store: nothing acknowledged is lost.

Writer processes put and delete keys of a store with ``durability="fsync"`` and log, per
operation, a ``try-`` line before the call and the operation after it returned. Each round
SIGKILLs every writer at a random moment; every ``unlink_every`` rounds the segment is unlinked
too (a reboot: memory gone, only the disk left). At the end the store is opened from its
directory alone and checked against the logs (:func:`check`):

- an acknowledged put is there with its own value -- or with a *later* attempt's value, or
  gone because of a later attempted delete (a call killed midway may or may not land);
- an acknowledged delete left the key absent, unless a later put was attempted;
- every value is whole (self-checking: :func:`make_value`), and ``verify()`` finds nothing.

Bounded: ``rounds`` rounds of at most ``max_round`` seconds each, and every writer is joined
with a timeout. ``tools/soak.py`` is its command line; ``tests/test_tiered.py`` runs it small.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
import signal
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import shmkv

#: the fork context: a writer inherits nothing but its arguments that matters, and forks fast
_CTX = mp.get_context("fork")

#: value sizes a writer picks from (one chunk class, a larger one, one past a page of 4 KiB)
SIZES = (50, 500, 5000)


def make_value(writer: int, seq: int, size: int) -> bytes:
    """A self-checking value: header (writer, seq, length) + a body derived from it + a digest
    of both, so a torn, mixed or misplaced value is recognised."""
    body = hashlib.blake2b(struct.pack("<II", writer, seq), digest_size=32).digest()
    body = (body * (size // 32 + 1))[:size]
    head = struct.pack("<III", writer, seq, size)
    return head + body + hashlib.blake2b(head + body, digest_size=8).digest()


def check_value(v: bytes) -> tuple[int, int]:
    """(writer, seq) of a value made by :func:`make_value`.

    :raises ValueError: the value is not one ``make_value`` made (torn, mixed, foreign).
    """
    if len(v) < 20:
        raise ValueError(f"{len(v)} bytes: shorter than any made value")
    writer, seq, size = struct.unpack_from("<III", v)
    if len(v) != 12 + size + 8 or v != make_value(writer, seq, size):
        raise ValueError(f"not a whole value of writer {writer}, seq {seq} ({len(v)} bytes)")
    return writer, seq


@dataclass
class SoakResult:
    """What :func:`check` found. ``ok`` when nothing was lost, wrong or damaged."""

    acknowledged: int = 0  # keys whose last acknowledged operation was checked
    rounds: int = 0
    kills: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged puts gone
    wrong: list[str] = field(default_factory=list)  # values neither acknowledged nor attempted later
    problems: list[str] = field(default_factory=list)  # verify()'s findings

    @property
    def ok(self) -> bool:
        return not (self.lost or self.wrong or self.problems)


def _writer(name: str, path: str, size: str, wid: int, log: str, round_no: int, keys: int) -> None:
    kv = shmkv.attach(name, size=size, path=path, durability="fsync")
    rnd = random.Random(wid * 1000 + round_no)
    with open(log, "a", buffering=1) as out:
        seq = round_no * 1_000_000  # grows across rounds: a newer write has a larger seq
        while True:
            seq += 1
            k = f"w{wid}-{rnd.randrange(keys)}"
            if rnd.random() < 0.85:
                out.write(f"try-put {k} {seq}\n")
                kv.put(k, make_value(wid, seq, rnd.choice(SIZES)))
                out.write(f"put {k} {seq}\n")
            else:
                out.write(f"try-del {k} {seq}\n")
                kv.delete(k)
                out.write(f"del {k} {seq}\n")


def run(name: str, path: Path, *, writers: int = 3, rounds: int = 6, size: str = "4MiB",
        keys: int = 400, min_round: float = 0.3, max_round: float = 1.0, unlink_every: int = 2,
        seed: int = 7) -> SoakResult:
    """The soak (module docstring); logs go to ``path``'s parent as ``NAME.acks<w>``.

    :raises ValueError: bounds that make no soak (no writers or rounds, max_round < min_round).
    """
    if writers < 1 or rounds < 1 or not 0 < min_round <= max_round or keys < 1 or unlink_every < 1:
        raise ValueError("soak: writers, rounds, keys and unlink_every >= 1, 0 < min_round <= max_round")
    path = Path(path)
    shmkv.attach(name, size=size, path=path).close()
    rnd = random.Random(seed)
    logs = [path.parent / f"{name}.acks{w}" for w in range(writers)]
    for f in logs:
        f.unlink(missing_ok=True)
    kills = 0
    for round_no in range(rounds):
        procs = [_CTX.Process(target=_writer, args=(name, str(path), size, w, str(logs[w]), round_no, keys))
                 for w in range(writers)]
        for p in procs:
            p.start()
        time.sleep(rnd.uniform(min_round, max_round))
        for p in procs:
            if p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                kills += 1
        for p in procs:
            p.join(10)
        if (round_no + 1) % unlink_every == 0 and name in shmkv.list_stores():
            shmkv.unlink(name)  # a reboot: memory gone, only the disk remains
    if name in shmkv.list_stores():
        shmkv.unlink(name)
    result = check(name, path, logs, size)
    result.rounds, result.kills = rounds, kills
    return result


#: per key, its last acknowledged operation (op, writer, seq); per key, every attempt (op, seq)
Acked = dict[str, tuple[str, int, int]]
Attempts = dict[str, list[tuple[str, int]]]


def read_logs(logs: list[Path]) -> tuple[Acked, Attempts]:
    """The writers' logs: whole lines only (a kill may cut the last one); a missing log is empty."""
    expect: Acked = {}
    attempts: Attempts = {}
    for w, f in enumerate(logs):
        text = f.read_text() if f.exists() else ""
        for line in text.split("\n")[:-1]:
            parts = line.split()
            if len(parts) != 3:
                continue
            op, k, seq = parts[0], parts[1], int(parts[2])
            if op.startswith("try-"):
                attempts.setdefault(k, []).append((op[4:], seq))
            else:
                expect[k] = (op, w, seq)
    return expect, attempts


def held_to(kv: shmkv.Store, expect: Acked, attempts: Attempts) -> SoakResult:
    """``kv`` held to what the logs say (module docstring): lost, wrong, verify()'s problems."""
    out = SoakResult(acknowledged=len(expect))
    out.problems = [str(p) for p in kv.verify()]
    for k, (op, w, seq) in expect.items():
        later = [(o, s) for o, s in attempts.get(k, []) if s > seq]
        v = kv.get(k)
        if v is None:
            if op == "put" and not any(o == "del" for o, _ in later):
                out.lost.append(k)
            continue
        try:
            vw, vseq = check_value(v)
        except ValueError as e:
            out.wrong.append(f"{k}: {e}")
            continue
        if vw != w or ((op == "del" or vseq != seq) and ("put", vseq) not in later):
            out.wrong.append(f"{k}: value of writer {vw} seq {vseq}, acknowledged {op} {seq} by {w}")
    return out


def check(name: str, path: Path, logs: list[Path], size: str = "4MiB") -> SoakResult:
    """Open the store from its directory and hold it to the logs (module docstring)."""
    expect, attempts = read_logs(logs)
    with shmkv.attach(name, size=size, path=path) as kv:
        return held_to(kv, expect, attempts)


__all__ = ["SoakResult", "check", "check_value", "held_to", "make_value", "read_logs", "run"]
