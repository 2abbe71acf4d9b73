"""Scenario files in etcd-io/raft's data-driven style: tests/cluster/raft/testdata/*.txt.

Each file opens with ``#`` lines saying what the scenario shows, then blocks of::

    command args
    ----
    expected output
    <blank line>

Commands (node ids are small integers, written as in etcd's files):

- ``add-nodes N [voters=(1 2 3)]``: N new nodes; voters default to the nodes added
  (``voters=()``: a node that will join later and knows no configuration).
- ``campaign ID``; ``tick ID [N]``; ``tick-election ID`` (election_ticks ticks);
  ``tick-heartbeat ID``.
- ``propose ID DATA``; ``propose-conf-change ID add|remove NODE``; ``read-index ID CTX``;
  ``compact ID INDEX`` (snapshot the applied state at INDEX and drop the log up to it).
- ``process-ready ID...``: handle each node's Ready (persist, queue messages, apply).
- ``deliver-msgs [ID...] [drop=(ID...)]``: deliver the queued messages to those nodes (all by
  default), losing those addressed to ``drop``.
- ``stabilize [ID...]``: process-ready and deliver-msgs until nothing moves.
- ``partition (1) (2 3)``; ``heal``: messages across groups are lost at delivery.
- ``crash ID`` (unpersisted state lost, queued messages to it dropped); ``restart ID``.
- ``raft-state``; ``raft-log ID``; ``applied ID``.

``SHMKV_REWRITE=1 pytest tests/cluster/raft/test_scenarios.py`` rewrites the expected output
(then read the diff: the output is the specification).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from shmkv.cluster.raft.core import Config, RaftNode
from shmkv.cluster.raft.types import (
    ConfChange,
    Entry,
    EntryKind,
    Message,
    MsgType,
    NotLeader,
    ProposalRefused,
    Ready,
    Snapshot,
)

from .harness import MemStorage

TESTDATA = Path(__file__).with_name("testdata")


def fmt_entry(e: Entry) -> str:
    if e.kind == EntryKind.CONF:
        cc = ConfChange.decode(e.data)
        return f"{e.term}/{e.index} EntryConfChange {cc.op} {cc.node}"
    return f"{e.term}/{e.index} EntryNormal {e.data.decode()!r}"


def fmt_msg(m: Message) -> str:
    s = f"{m.src}->{m.dst} {m.type.value} Term:{m.term}"
    t = m.type
    if t in (MsgType.VOTE, MsgType.PRE_VOTE, MsgType.APP):
        s += f" Log:{m.log_term}/{m.index}"
    if t == MsgType.APP:
        s += f" Commit:{m.commit}"
        if m.entries:
            s += " Entries:[" + ", ".join(fmt_entry(e) for e in m.entries) + "]"
    if t == MsgType.APP_RESP:
        s += f" Index:{m.index}"
        if m.reject:
            s += f" Rejected (Hint: {m.hint}, LogTerm: {m.log_term})"
    if t in (MsgType.VOTE_RESP, MsgType.PRE_VOTE_RESP) and m.reject:
        s += " Rejected"
    if t == MsgType.HEARTBEAT:
        s += f" Commit:{m.commit}"
    if t == MsgType.READ_INDEX_RESP:
        s += f" Index:{m.index}"
    if m.context:
        s += f" Context:{m.context.decode()}"
    if m.snapshot is not None:
        sn = m.snapshot
        s += f" Snapshot: Index:{sn.index} Term:{sn.term} Voters:({' '.join(sn.voters)})"
    return s


class Env:
    def __init__(self) -> None:
        # Short timeouts keep the transcripts readable: a heartbeat every 3 ticks, elections
        # after 6-11 ticks of silence.
        self.cfg = Config(election_ticks=6, heartbeat_ticks=3, seed=1)
        self.nodes: dict[str, RaftNode] = {}
        self.storage: dict[str, MemStorage] = {}
        self.applied: dict[str, list[str]] = {}
        self.queue: list[Message] = []
        self.groups: list[set[str]] = []
        self.down: set[str] = set()

    def _blocked(self, m: Message) -> bool:
        for g in self.groups:
            if (m.src in g) != (m.dst in g):
                return True
        return False

    def run(self, cmd: str, args: list[str]) -> list[str]:
        kw = {}
        pos = []
        for a in args:
            if "=" in a:
                k, v = a.split("=", 1)
                kw[k] = v.strip("()").split()
            else:
                pos.append(a)
        out: list[str] = []
        if cmd == "add-nodes":
            n0 = len(self.nodes)
            ids = [str(n0 + k + 1) for k in range(int(pos[0]))]
            voters = tuple(kw.get("voters", ids))
            for i in ids:
                self.storage[i] = MemStorage(snapshot=Snapshot(voters=voters))
                self._start(i)
                out.append(f"{i} started, voters=({' '.join(voters)})")
        elif cmd == "campaign":
            self.nodes[pos[0]].campaign()
        elif cmd in ("tick", "tick-election", "tick-heartbeat"):
            n = {
                "tick": int(pos[1]) if len(pos) > 1 else 1,
                "tick-election": self.cfg.election_ticks,
                "tick-heartbeat": self.cfg.heartbeat_ticks,
            }[cmd]
            for _ in range(n):
                self.nodes[pos[0]].tick()
        elif cmd == "propose":
            try:
                out.append(f"index {self.nodes[pos[0]].propose(pos[1].encode())}")
            except NotLeader as e:
                out.append(f"NotLeader: {e} (leader {e.leader or 'unknown'})")
        elif cmd == "propose-conf-change":
            try:
                idx = self.nodes[pos[0]].propose_conf_change(ConfChange(pos[1], pos[2]))
                out.append(f"index {idx}")
            except (NotLeader, ProposalRefused) as e:
                out.append(f"{type(e).__name__}: {e}")
        elif cmd == "read-index":
            try:
                self.nodes[pos[0]].read_index(pos[1].encode())
            except NotLeader as e:
                out.append(f"NotLeader: {e}")
        elif cmd == "compact":
            i = pos[0]
            snap = self.nodes[i].compact(
                int(pos[1]), b"applied=" + ",".join(self.applied[i]).encode()
            )
            self.storage[i].save_snapshot(snap)
            out.append(
                f"snapshot {snap.index}/{snap.term} voters=({' '.join(snap.voters)}), "
                f"log from {self.nodes[i].first_index()}"
            )
        elif cmd == "process-ready":
            for i in pos:
                out += self._process_ready(i)
        elif cmd == "deliver-msgs":
            out += self._deliver(set(pos) or None, set(kw.get("drop", [])))
        elif cmd == "stabilize":
            ids = pos or sorted(self.nodes, key=int)
            for _ in range(1000):  # bounded: a scenario that never settles fails loudly
                step: list[str] = []
                for i in ids:
                    step += self._process_ready(i)
                step += self._deliver(set(ids), set())
                if not step:
                    break
                out += step
            else:
                raise AssertionError("stabilize did not settle in 1000 rounds")
        elif cmd == "partition":
            groups = re.findall(r"\(([^)]*)\)", " ".join(args))
            self.groups = [set(g.split()) for g in groups]
        elif cmd == "heal":
            self.groups = []
        elif cmd == "crash":
            self.down.add(pos[0])
            self.queue = [m for m in self.queue if m.dst != pos[0] and m.src != pos[0]]
        elif cmd == "restart":
            self._start(pos[0])
        elif cmd == "raft-state":
            for i in sorted(self.nodes, key=int):
                node = self.nodes[i]
                state = (
                    "down" if i in self.down else f"State{node.role.value.title().replace('-', '')}"
                )
                out.append(
                    f"{i}: {state} Term:{node.term} Lead:{node.lead or 0} Commit:{node.commit} "
                    f"Applied:{node.applied} Last:{node.last_index()} Voters:({' '.join(node.voters)})"
                )
        elif cmd == "raft-log":
            node = self.nodes[pos[0]]
            out.append(f"snapshot {node.snapshot.index}/{node.snapshot.term}")
            out += [fmt_entry(e) for e in node.log()]
        elif cmd == "applied":
            out.append(" ".join(self.applied[pos[0]]) or "(nothing)")
        else:
            raise ValueError(f"unknown command {cmd!r}")
        return out or ["ok"]

    def _start(self, i: str) -> None:
        st = self.storage[i]
        self.nodes[i] = RaftNode(
            i, self.cfg, hard_state=st.hard_state, snapshot=st.snapshot, entries=list(st.entries)
        )
        data = st.snapshot.data.decode()
        self.applied[i] = data.removeprefix("applied=").split(",") if data else []
        self.down.discard(i)

    def _process_ready(self, i: str) -> list[str]:
        n = self.nodes[i]
        if i in self.down or not n.has_ready():
            return []
        rd: Ready = n.ready()
        out = [f"> {i} handling Ready"]
        if rd.hard_state is not None:
            hs = rd.hard_state
            out.append(f"  HardState Term:{hs.term} Vote:{hs.vote or 0} Commit:{hs.commit}")
        if rd.snapshot is not None:
            out.append(
                f"  Snapshot Index:{rd.snapshot.index} Term:{rd.snapshot.term} "
                f"Voters:({' '.join(rd.snapshot.voters)})"
            )
        if rd.entries:
            out.append("  Entries:")
            out += [f"  {fmt_entry(e)}" for e in rd.entries]
        if rd.committed:
            out.append("  CommittedEntries:")
            out += [f"  {fmt_entry(e)}" for e in rd.committed]
        if rd.read_states:
            out.append("  ReadStates:")
            out += [f"  Index:{r.index} Context:{r.context.decode()}" for r in rd.read_states]
        if rd.messages:
            out.append("  Messages:")
            out += [f"  {fmt_msg(m)}" for m in rd.messages]
        self.storage[i].persist(rd)
        self.queue += rd.messages
        if rd.snapshot is not None:
            data = rd.snapshot.data.decode()
            self.applied[i] = data.removeprefix("applied=").split(",") if data else []
        for e in rd.committed:
            if e.kind == EntryKind.NORMAL and e.data:
                self.applied[i].append(e.data.decode())
        n.advance(rd)
        return out

    def _deliver(self, to: set[str] | None, drop: set[str]) -> list[str]:
        out: list[str] = []
        keep: list[Message] = []
        by_dst: dict[str, list[str]] = {}
        for m in self.queue:
            if to is not None and m.dst not in to:
                keep.append(m)
                continue
            lines = by_dst.setdefault(m.dst, [])
            if m.dst in drop or m.dst in self.down or self._blocked(m):
                lines.append(f"  {fmt_msg(m)} (dropped)")
                continue
            lines.append(f"  {fmt_msg(m)}")
            self.nodes[m.dst].step(m)
        self.queue = keep
        for dst in sorted(by_dst, key=int):
            out.append(f"> {dst} receiving messages")
            out += by_dst[dst]
        return out


def parse(path: Path) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(the opening paragraph, [(command, expected output lines)])."""
    lines = path.read_text().splitlines()
    header: list[str] = []
    i = 0
    while i < len(lines) and (lines[i].startswith("#") or not lines[i].strip()):
        if lines[i].startswith("#"):
            header.append(lines[i])
        i += 1
    blocks: list[tuple[str, list[str]]] = []
    while i < len(lines):  # terminates: each pass consumes at least one line
        if not lines[i].strip():
            i += 1
            continue
        cmd = lines[i]
        if i + 1 >= len(lines) or lines[i + 1] != "----":
            raise AssertionError(f"{path.name}:{i + 2}: expected ---- after {cmd!r}")
        i += 2
        out: list[str] = []
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        blocks.append((cmd, out))
    return header, blocks


SCENARIOS = sorted(TESTDATA.glob("*.txt"))


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path) -> None:
    header, blocks = parse(path)
    assert header and header[0].startswith("#"), f"{path.name} must open with a paragraph"
    env = Env()
    actual = []
    for cmd, _ in blocks:
        name, *args = cmd.split()
        actual.append((cmd, env.run(name, args)))
    if os.environ.get("SHMKV_REWRITE"):
        text = "\n".join(header) + "\n"
        for cmd, out in actual:
            text += f"\n{cmd}\n----\n" + "\n".join(out) + "\n"
        path.write_text(text)
        return
    for (cmd, want), (_, got) in zip(blocks, actual, strict=True):
        assert got == want, f"{path.name}: {cmd}\n--- got:\n" + "\n".join(got)
