"""shmkv/cluster/raft/log.py: the durable Raft log, hard state and snapshot, over real files."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shmkv.cluster.raft.core import RaftNode
from shmkv.cluster.raft.log import LOG_HEADER, DurableLog
from shmkv.cluster.raft.types import Entry, EntryKind, HardState, Ready, Snapshot
from shmkv.errors import Corruption

from .log_workload import Model, steps

WORKLOAD = Path(__file__).with_name("log_workload.py")


def _entries(lo: int, hi: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i, EntryKind.NORMAL, b"v%d" % i) for i in range(lo, hi + 1)]


def test_persisted_state_survives_reopen(tmp_path: Path) -> None:
    d = DurableLog(tmp_path)
    d.persist(Ready(entries=tuple(_entries(1, 5)), hard_state=HardState(1, "n2", 3)))
    d.close()
    with DurableLog(tmp_path) as d:
        assert d.entries == _entries(1, 5) and d.hard_state == HardState(1, "n2", 3)
        node = RaftNode("n1", **d.restore())
    assert node.last_index() == 5 and node.term == 1 and node.vote == "n2" and node.commit == 3


def test_conflicting_suffix_is_truncated(tmp_path: Path) -> None:
    d = DurableLog(tmp_path)
    d.append(_entries(1, 6))
    d.append(_entries(4, 5, term=2))
    d.close()
    with DurableLog(tmp_path) as d:
        assert d.entries == _entries(1, 3) + _entries(4, 5, term=2)


def test_snapshot_compacts_and_keeps_a_matching_suffix(tmp_path: Path) -> None:
    d = DurableLog(tmp_path)
    d.append(_entries(1, 8))
    d.save_snapshot(Snapshot(5, 1, ("n1",), b"state"))
    assert d.entries == _entries(6, 8)
    d.append(_entries(9, 9))
    d.close()
    with DurableLog(tmp_path) as d:
        assert d.snapshot == Snapshot(5, 1, ("n1",), b"state") and d.entries == _entries(6, 9)


def test_received_snapshot_replaces_the_log(tmp_path: Path) -> None:
    d = DurableLog(tmp_path)
    d.append(_entries(1, 8))
    d.persist(Ready(snapshot=Snapshot(10, 3, ("n1", "n2"), b"s")))
    assert d.entries == [] and d.last_index() == 10
    d.append(_entries(11, 12, term=3))
    d.close()
    with DurableLog(tmp_path) as d:
        assert d.entries == _entries(11, 12, term=3)


def test_snapshot_written_but_log_not_compacted_is_fixed_at_open(tmp_path: Path) -> None:
    # The window between the snapshot's rename and the log's rewrite: the log still holds
    # entries the snapshot covers, and conflicting ones beyond it.
    d = DurableLog(tmp_path)
    d.append(_entries(1, 8))
    d.close()
    (tmp_path / "log.bak").write_bytes((tmp_path / "log").read_bytes())
    d = DurableLog(tmp_path)
    d.save_snapshot(Snapshot(6, 2, ("n1",), b"s"), keep_matching=False)  # term 2 != entry's 1
    d.close()
    os.replace(tmp_path / "log.bak", tmp_path / "log")
    with DurableLog(tmp_path) as d:
        assert d.snapshot.index == 6 and d.entries == []


def test_torn_tail_is_dropped(tmp_path: Path) -> None:
    d = DurableLog(tmp_path)
    d.append(_entries(1, 3))
    d.close()
    p = tmp_path / "log"
    whole = p.read_bytes()
    rec = _record(Entry(1, 4, EntryKind.NORMAL, b"x" * 40))
    for cut in range(1, len(rec)):  # every way a write can be cut short: header, payload
        p.write_bytes(whole + rec[:cut])
        d = DurableLog(tmp_path)
        assert d.entries == _entries(1, 3) and d.torn_bytes_dropped == cut
        d.close()
        assert p.read_bytes() == whole  # cut off on disk too, before anything is appended
    p.write_bytes(whole + bytes(64))  # zeros to EOF: the size grew, the data never landed
    with DurableLog(tmp_path) as d:
        assert d.entries == _entries(1, 3)


def _record(e: Entry) -> bytes:
    from shmkv.cluster.raft.log import encode_entry

    return encode_entry(e)


def test_complete_last_record_with_bad_crc_is_corruption(tmp_path: Path) -> None:
    d = DurableLog(tmp_path)
    d.append(_entries(1, 3))
    d.close()
    p = tmp_path / "log"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # the last record is whole, its payload damaged
    p.write_bytes(bytes(data))
    with pytest.raises(Corruption, match=r"log: bad record checksum at offset \d+"):
        DurableLog(tmp_path)


def test_gap_in_the_log_is_corruption(tmp_path: Path) -> None:
    p = tmp_path / "log"
    p.write_bytes(
        LOG_HEADER.pack(b"SHMKVRFT", 1, 0) + _record(_entries(1, 1)[0]) + _record(_entries(3, 3)[0])
    )
    with pytest.raises(Corruption, match="entry 3 at offset .* follows entry 1"):
        DurableLog(tmp_path)


def test_damaged_hard_state_is_corruption_naming_the_file(tmp_path: Path) -> None:
    d = DurableLog(tmp_path)
    d.set_hard_state(HardState(4, "n3", 0))
    d.close()
    p = tmp_path / "hardstate"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(Corruption, match="hardstate: checksum mismatch"):
        DurableLog(tmp_path)


def test_append_refuses_a_gap(tmp_path: Path) -> None:
    with DurableLog(tmp_path) as d:
        d.append(_entries(1, 2))
        with pytest.raises(ValueError, match="append at 5"):
            d.append(_entries(5, 5))


def _allowed(before: Model, after: Model | None, cut: int | None, got: DurableLog) -> bool:
    """The recovered state is the last acknowledged one, or the next step (complete or cut
    between its fsyncs: snapshot, truncation, append, hard state)."""
    models = [before] + ([after] if after is not None else [])
    if got.hard_state not in [m.hard_state for m in models]:
        return False
    if got.snapshot not in [m.snapshot for m in models]:
        return False
    options = [m.entries for m in models]
    if cut is not None:
        options.append([e for e in before.entries if e.index < cut])  # truncated, not appended
        # after a snapshot: entries it covers are dropped at open
        options += [[e for e in o if e.index > got.snapshot.index] for o in list(options)]
    return got.entries in options


def _crash_round(tmp: Path, seed: int, rng: random.Random) -> int:
    d = tmp / f"r{seed}"
    with subprocess.Popen(
        [sys.executable, str(WORKLOAD), str(d), str(seed), "400"], stdout=subprocess.PIPE, text=True
    ) as p:
        try:
            assert p.stdout is not None
            want = rng.randint(0, 120)
            for _ in range(want):
                if not p.stdout.readline():
                    break
            time.sleep(rng.random() * 0.003)
            p.send_signal(signal.SIGKILL)
            rest = p.stdout.read()
        finally:
            p.kill()
            p.wait()
    acked = int(([str(want - 1)] + rest.split())[-1]) if want or rest.split() else -1
    trail = list(steps(seed, 400))
    before = trail[acked][2] if acked >= 0 else Model()
    after, cut = None, None
    if acked + 1 < len(trail):
        _, arg, after = trail[acked + 1]
        if isinstance(arg, Ready) and arg.entries:
            cut = arg.entries[0].index  # where that step's append begins (and truncates)
    got = DurableLog(d)
    assert _allowed(before, after, cut, got), (
        f"seed {seed}: acknowledged step {acked} lost: hard state {got.hard_state} vs "
        f"{before.hard_state}, snapshot {got.snapshot.index} vs {before.snapshot.index}, "
        f"{len(got.entries)} entries vs {len(before.entries)}"
    )
    got.close()
    return acked


@pytest.mark.multiprocess
def test_sigkilled_writer_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random(11)
    acks = [_crash_round(tmp_path, seed, rng) for seed in range(12)]
    assert max(acks) > 0  # the kills did land after some acknowledged steps


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigkilled_writer_loses_nothing_acknowledged_many(tmp_path: Path) -> None:
    rng = random.Random(12)
    for seed in range(100, 180):
        _crash_round(tmp_path, seed, rng)
