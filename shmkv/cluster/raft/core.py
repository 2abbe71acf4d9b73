"""Raft as a pure state machine: messages and ticks in, a Ready out. No I/O, no clock, no threads.

The shape is etcd-io/raft's: :meth:`RaftNode.step` takes a message, :meth:`RaftNode.tick` is
the only notion of time, and everything the node wants done -- store entries, send messages,
apply committed entries -- is queued and handed out by :meth:`RaftNode.ready`; the caller does
it (see :class:`~shmkv.cluster.raft.types.Ready` for the order, which is the durability
contract) and calls :meth:`RaftNode.advance`. Then the same code runs over sockets, in the
simulator, and in scenario files.

What is here: leader election with seeded randomised timeouts; PreVote (thesis 9.6: a node
that cannot win does not raise the term, so a rejoining node does not depose a healthy leader);
CheckQuorum (thesis 6.2: a leader that has not heard from a majority within an election timeout
steps down; followers that heard from a leader within it ignore votes -- the "leader lease" on
voting); log replication with the conflict-hint fast backtracking (one round trip per
conflicting term, not per entry); ReadIndex (thesis 6.4) on the leader and for followers;
single-voter membership changes (thesis 4.1: a configuration entry takes effect as soon as it
is appended, on every node, and one change at a time); snapshots and InstallSnapshot for a
follower that needs compacted entries.

Rejected: joint consensus (thesis 4.3). Single-server changes are enough to add and remove
configuration voters one at a time, and are much smaller; the known bug in them (thesis errata:
a change proposed by a leader that has not yet committed an entry of its term can be lost and
contradict a concurrent one) is closed by refusing changes until the leader's term-start entry
commits, as the errata prescribes.

Roles are separate step functions (:meth:`_step_leader`, :meth:`_step_candidate`,
:meth:`_step_follower`); term checks common to all roles happen first in :meth:`step`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from .types import (
    NONE,
    ConfChange,
    Entry,
    EntryKind,
    HardState,
    Message,
    MsgType,
    NotLeader,
    ProposalRefused,
    ReadState,
    Ready,
    Snapshot,
)

M = MsgType


class Role(str, Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass
class Config:
    """:param election_ticks: a follower that hears nothing for a random number of ticks in
        [election_ticks, 2 * election_ticks) campaigns; also the CheckQuorum window.
    :param heartbeat_ticks: the leader sends heartbeats this often (< election_ticks).
    :param retry_ticks: a node already campaigning (pre-candidate or candidate) whose round
        neither won nor lost outright retries after a random number of ticks in
        [retry_ticks, 2 * retry_ticks), doubling per further failed round up to the follower's
        window (0: election_ticks // 4, at least 1). See :meth:`RaftNode._draw_timeout`.
    :param seed: seeds the election timeout draws; same seed and inputs, same run.
    """

    election_ticks: int = 10
    heartbeat_ticks: int = 1
    retry_ticks: int = 0
    pre_vote: bool = True
    check_quorum: bool = True
    max_entries_per_msg: int = 64
    seed: int = 0


class ProgressState(str, Enum):
    PROBE = "probe"  # one MsgApp per heartbeat until the follower's match is found
    REPLICATE = "replicate"  # match known: stream entries, next advanced optimistically


@dataclass
class Progress:
    """The leader's view of one voter (etcd's tracker/progress.go).

    Invariant: 0 <= match < next. ``match`` is the highest index known to be durably stored on
    that voter (only ever raised, within a term); ``next`` the next index to send.
    ``probe_sent``: in PROBE, an append is in flight and no more are sent until an answer or
    the next heartbeat response (so a lost probe is retried, and probes do not pile up).
    ``recent_active``: heard from since the last CheckQuorum round.
    """

    match: int
    next: int
    state: ProgressState = ProgressState.PROBE
    probe_sent: bool = False
    recent_active: bool = False


@dataclass
class _PendingRead:
    context: bytes  # the requester's, handed back with the answer
    key: bytes  # ours, carried by the confirming heartbeat round (contexts may collide)
    index: int  # the leader's commit when the read was asked: the read point
    requester: str  # NONE for a read asked of the leader itself
    acks: set[str]


class RaftNode:
    """One Raft peer. See the module docstring; the public methods are the whole API.

    Field invariants (checked by :meth:`check_invariants`):

    - ``_snap.index <= commit <= last_index()``; ``applied <= commit``; ``_snap.index <= applied``.
    - ``_entries[i].index == _snap.index + 1 + i`` (the log is contiguous after the snapshot);
      terms never decrease along the log and never exceed ``term``.
    - ``_stable`` (entries up to it were handed out in a Ready) ``<= last_index()``.
    - ``lead`` is a leader of ``term`` or NONE; role LEADER iff ``lead == id``.
    - ``_voters`` is the configuration of the last CONF entry in the log, or ``_snap.voters``.
    """

    def __init__(
        self,
        id: str,
        config: Config | None = None,
        *,
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
        entries: tuple[Entry, ...] | list[Entry] = (),
    ) -> None:
        """A node from what its durable log holds (all empty for a brand-new node).

        A fresh cluster starts every initial voter with ``snapshot=Snapshot(voters=(...))``; a
        node joining later starts with no voters at all and learns the configuration from the
        leader (it never campaigns while it is not a voter in its own log).
        """
        self.id = id
        self.cfg = config or Config()
        if not 0 < self.cfg.heartbeat_ticks < self.cfg.election_ticks:
            raise ValueError("need 0 < heartbeat_ticks < election_ticks")
        self._rng = random.Random(f"{self.cfg.seed}/{id}")
        hs = hard_state or HardState()
        self._snap = snapshot or Snapshot()
        self._entries: list[Entry] = [e for e in entries if e.index > self._snap.index]
        for i, e in enumerate(self._entries):
            if e.index != self._snap.index + 1 + i:
                raise ValueError(f"log not contiguous after snapshot {self._snap.index}: {e.index}")
        self.term = hs.term
        self.vote = hs.vote
        self.commit = max(hs.commit, self._snap.index)
        self.commit = min(self.commit, self.last_index())
        self.applied = self._snap.index
        self._stable = self.last_index()
        self._persisted_hs = HardState(self.term, self.vote, self.commit)
        self._pending_snapshot: Snapshot | None = None  # received, not yet handed out
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._reads: list[_PendingRead] = []
        self._read_seq = 0
        self._waiting_reads: list[tuple[bytes, str]] = []  # before the term-start entry commits
        self.role = Role.FOLLOWER
        self.lead = NONE
        self._votes: dict[str, bool] = {}
        self._progress: dict[str, Progress] = {}
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._rounds = 0  # campaign rounds since we last had (or were) a leader
        self._timeout = self._draw_timeout()
        self._voters: tuple[str, ...] = ()
        self._recompute_voters()
        self._in_ready = False

    # -- the log ----------------------------------------------------------------------------

    def first_index(self) -> int:
        return self._snap.index + 1

    def last_index(self) -> int:
        return self._entries[-1].index if self._entries else self._snap.index

    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self._snap.term

    def term_at(self, index: int) -> int | None:
        """The term of the entry at ``index``; None if it is compacted away or not there."""
        if index == self._snap.index:
            return self._snap.term
        if index < self._snap.index or index > self.last_index():
            return None
        return self._entries[index - self._snap.index - 1].term

    def _slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries [lo, hi). REQUIRES: first_index() <= lo."""
        base = self._snap.index + 1
        return self._entries[lo - base : hi - base]

    def _matches(self, index: int, term: int) -> bool:
        return self.term_at(index) == term

    def _truncate_and_append(self, entries: list[Entry]) -> None:
        """Append, dropping our entries from the first one that conflicts (same index, other
        term). REQUIRES: entries contiguous, entries[0].index <= last_index() + 1."""
        for k, e in enumerate(entries):
            t = self.term_at(e.index)
            if t is None and e.index <= self._snap.index:
                continue  # already covered by our snapshot: committed, hence equal
            if t == e.term:
                continue
            # Nothing committed can conflict (log matching + leader completeness); not asserted
            # here so that the property checker, not this line, is what catches a broken rule.
            del self._entries[e.index - self._snap.index - 1 :]
            self._entries.extend(entries[k:])
            self._stable = min(self._stable, e.index - 1)
            self._recompute_voters()
            return

    def _find_conflict_by_term(self, index: int, term: int) -> int:
        """The largest index <= ``index`` whose term <= ``term`` (or where our log is
        compacted): the most the two logs can agree on, given that the other has ``term`` at
        ``index``. Loop bounded by the log length."""
        while index > self._snap.index:
            t = self.term_at(index)
            if t is not None and t <= term:
                break
            index -= 1
        return index

    def _recompute_voters(self) -> None:
        voters = self._snap.voters
        self._conf_index = self._snap.index
        for e in self._entries:
            if e.kind == EntryKind.CONF:
                voters = ConfChange.decode(e.data).voters
                self._conf_index = e.index
        self._voters = voters
        if self.role == Role.LEADER:
            for v in voters:
                if v not in self._progress:
                    self._progress[v] = Progress(match=0, next=self.last_index() + 1)
            for v in list(self._progress):
                if v not in voters and v != self.id:
                    del self._progress[v]
        if self.role != Role.LEADER:
            return
        self._maybe_commit()

    @property
    def voters(self) -> tuple[str, ...]:
        return self._voters

    def _quorum(self) -> int:
        return len(self._voters) // 2 + 1

    def _promotable(self) -> bool:
        return self.id in self._voters

    # -- time -------------------------------------------------------------------------------

    def _draw_timeout(self) -> int:
        """Ticks until we campaign (again).

        A follower waits [election_ticks, 2 * election_ticks): that is what keeps elections
        from being spurious -- a leader that is merely slow under load has that long to be
        heard, and a follower within election_ticks of hearing it ignores (pre-)votes.

        A node whose round is still open (``_rounds`` > 0: it already waited out a follower
        timeout, so the leader is presumed gone) retries sooner: [r, 2r) with r = retry_ticks,
        doubling per failed round, capped at the follower window. Otherwise a split vote, or
        a pre-vote ignored by a peer still in its lease (it heard the last heartbeat a tick
        later) or lost, costs a whole new 1-2 s: measured in shmkv/torture/election.py, that
        was what pushed a new leader past 3 s. Safety does not depend on timeouts at all; a
        retry cannot disturb a live leader either (a pre-vote never raises a term, and the
        leader and its followers ignore it while in lease); the doubling bounds the extra
        traffic of a node that cannot win (cut off), and gives a slow vote round time.
        """
        e = self.cfg.election_ticks
        if self._rounds == 0:
            return e + self._rng.randrange(e)
        r = min(e, (self.cfg.retry_ticks or max(1, e // 4)) << min(self._rounds - 1, 8))
        return r + self._rng.randrange(r)

    def tick(self) -> None:
        """One unit of time passed."""
        self._election_elapsed += 1
        if self.role == Role.LEADER:
            self._heartbeat_elapsed += 1
            if self._election_elapsed >= self.cfg.election_ticks:
                self._election_elapsed = 0
                if self.cfg.check_quorum and not self._quorum_active():
                    self._become_follower(self.term, NONE)
                    return
            if self._heartbeat_elapsed >= self.cfg.heartbeat_ticks:
                self._heartbeat_elapsed = 0
                self._broadcast_heartbeat(b"")
        elif self._election_elapsed >= self._timeout and self._promotable():
            self.campaign()

    def _quorum_active(self) -> bool:
        """CheckQuorum: did a majority (counting ourselves) talk to us in the last window?"""
        active = 0
        for v in self._voters:
            pr = self._progress.get(v)
            if v == self.id or (pr is not None and pr.recent_active):
                active += 1
        for pr in self._progress.values():
            pr.recent_active = False
        return active >= self._quorum()

    # -- role changes -----------------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = self._draw_timeout()
        self._votes = {}
        self._progress = {}
        self._reads = []
        self._waiting_reads = []

    def _become_follower(self, term: int, lead: str) -> None:
        self._rounds = 0
        self._reset(term)
        self.role = Role.FOLLOWER
        self.lead = lead

    def campaign(self) -> None:
        """Start an election now (a pre-vote first when configured). A non-voter does not."""
        if not self._promotable() or self.role == Role.LEADER:
            return
        self._rounds += 1  # one round: a pre-vote and the vote it may lead to
        if self.cfg.pre_vote:
            # The term does not move: a node that cannot win leaves no trace (thesis 9.6). A
            # pre-candidate that times out polls again -- never straight to a real election.
            self._reset(self.term)
            self.role = Role.PRE_CANDIDATE
            self._poll(M.PRE_VOTE, self.term + 1)
        else:
            self._start_election()

    def _start_election(self) -> None:
        self._reset(self.term + 1)
        self.role = Role.CANDIDATE
        self.vote = self.id
        self._poll(M.VOTE, self.term)

    def _poll(self, kind: MsgType, term: int) -> None:
        self._votes = {self.id: True}
        if self._tally() >= self._quorum():
            self._won(kind)
            return
        for v in self._voters:
            if v != self.id:
                self._send(
                    Message(
                        kind, self.id, v, term, log_term=self.last_term(), index=self.last_index()
                    )
                )

    def _tally(self) -> int:
        return sum(1 for v, ok in self._votes.items() if ok and v in self._voters)

    def _won(self, kind: MsgType) -> None:
        if kind == M.PRE_VOTE:
            self._start_election()
        else:
            self._become_leader()

    def _become_leader(self) -> None:
        self._rounds = 0
        self._reset(self.term)
        self.role = Role.LEADER
        self.lead = self.id
        last = self.last_index()
        self._progress = {
            v: Progress(match=0, next=last + 1, recent_active=True) for v in self._voters
        }
        if self.id in self._progress:
            self._progress[self.id].match = self._stable
        # An empty entry of the new term: committing it commits everything before it (a
        # leader may count replicas only for entries of its own term, Raft paper 5.4.2), and
        # until it commits, reads and configuration changes wait.
        self._append([Entry(self.term, last + 1)])
        self._broadcast_append()

    # -- messages in ------------------------------------------------------------------------

    def step(self, m: Message) -> None:
        """Feed one message addressed to this node."""
        assert not self._in_ready, "step between ready() and advance()"
        if m.term > self.term:
            if m.type in (M.VOTE, M.PRE_VOTE):
                in_lease = (
                    self.cfg.check_quorum
                    and self.lead != NONE
                    and self._election_elapsed < self.cfg.election_ticks
                )
                if in_lease:
                    return  # heard from a live leader recently: do not let it be deposed
            if m.type == M.PRE_VOTE or (m.type == M.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes never move terms; a granted pre-vote carries a future term
            elif m.type in (M.APP, M.HEARTBEAT, M.SNAP):
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, NONE)
        elif m.term < self.term:
            if m.type in (M.APP, M.HEARTBEAT) and (self.cfg.check_quorum or self.cfg.pre_vote):
                # A stale leader (maybe cut off, with PreVote the others never bumped its
                # term) learns our term from this and steps down.
                self._send(Message(M.APP_RESP, self.id, m.src, self.term))
            elif m.type == M.PRE_VOTE:
                self._send(Message(M.PRE_VOTE_RESP, self.id, m.src, self.term, reject=True))
            return

        if m.type in (M.VOTE, M.PRE_VOTE):
            self._handle_vote(m)
        elif self.role == Role.LEADER:
            self._step_leader(m)
        elif self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(m)
        else:
            self._step_follower(m)

    def _handle_vote(self, m: Message) -> None:
        can_vote = (
            self.vote == m.src
            or (self.vote == NONE and self.lead == NONE)
            or (m.type == M.PRE_VOTE and m.term > self.term)
        )
        up_to_date = (m.log_term, m.index) >= (self.last_term(), self.last_index())
        resp = M.PRE_VOTE_RESP if m.type == M.PRE_VOTE else M.VOTE_RESP
        if can_vote and up_to_date:
            self._send(Message(resp, self.id, m.src, m.term))
            if m.type == M.VOTE:
                self.vote = m.src
                self._election_elapsed = 0
        else:
            self._send(Message(resp, self.id, m.src, self.term, reject=True))

    def _step_follower(self, m: Message) -> None:
        if m.type == M.APP:
            self._election_elapsed = 0
            self.lead = m.src
            self._handle_append(m)
        elif m.type == M.HEARTBEAT:
            self._election_elapsed = 0
            self.lead = m.src
            self._handle_heartbeat(m)
        elif m.type == M.SNAP:
            self._election_elapsed = 0
            self.lead = m.src
            self._handle_snapshot(m)
        elif m.type == M.READ_INDEX_RESP:
            self._read_states.append(ReadState(m.index, m.context))

    def _step_candidate(self, m: Message) -> None:
        if m.type in (M.APP, M.HEARTBEAT, M.SNAP):
            # A leader of our term exists (for a pre-candidate: of the term we are in).
            self._become_follower(m.term, m.src)
            self._step_follower(m)
            return
        want = M.PRE_VOTE_RESP if self.role == Role.PRE_CANDIDATE else M.VOTE_RESP
        if m.type != want:
            return
        self._votes.setdefault(m.src, not m.reject)
        if self._tally() >= self._quorum():
            self._won(M.PRE_VOTE if self.role == Role.PRE_CANDIDATE else M.VOTE)
        elif sum(1 for ok in self._votes.values() if not ok) >= self._quorum():
            self._become_follower(self.term, NONE)

    def _step_leader(self, m: Message) -> None:
        pr = self._progress.get(m.src)
        if pr is None:
            return  # not a voter (any more)
        if m.type == M.APP_RESP:
            pr.recent_active = True
            self._handle_append_resp(m, pr)
        elif m.type == M.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.probe_sent = False
            if pr.match < self.last_index():
                self._send_append(m.src)
            if m.context:
                self._ack_read(m.context, m.src)
        elif m.type == M.READ_INDEX:
            self._read_index(m.context, m.src)

    # -- replication: follower side -----------------------------------------------------------

    def _handle_append(self, m: Message) -> None:
        if m.index < self.commit:
            # Everything up to our commit is settled; tell the leader where we are.
            self._send(Message(M.APP_RESP, self.id, m.src, self.term, index=self.commit))
            return
        if self._matches(m.index, m.log_term):
            entries = list(m.entries)
            self._truncate_and_append(entries)
            last_new = m.index + len(entries)
            self._commit_to(min(m.commit, last_new))
            self._send(Message(M.APP_RESP, self.id, m.src, self.term, index=last_new))
            return
        hint = self._find_conflict_by_term(min(m.index, self.last_index()), m.log_term)
        self._send(
            Message(
                M.APP_RESP,
                self.id,
                m.src,
                self.term,
                index=m.index,
                reject=True,
                hint=hint,
                log_term=self.term_at(hint) or 0,
            )
        )

    def _handle_heartbeat(self, m: Message) -> None:
        self._commit_to(min(m.commit, self.last_index()))
        self._send(Message(M.HEARTBEAT_RESP, self.id, m.src, self.term, context=m.context))

    def _handle_snapshot(self, m: Message) -> None:
        s = m.snapshot
        assert s is not None
        if s.index <= self.commit:
            self._send(Message(M.APP_RESP, self.id, m.src, self.term, index=self.commit))
            return
        if self._matches(s.index, s.term):
            # We already have the entry: keep the log, just commit (etcd: "fast-forward").
            self._commit_to(s.index)
        else:
            self._snap = s
            self._entries = []
            self._stable = s.index
            self.commit = s.index
            self.applied = s.index
            self._pending_snapshot = s
            self._recompute_voters()
        # s.index, not last_index(): entries we keep past it are not known to match the leader.
        self._send(Message(M.APP_RESP, self.id, m.src, self.term, index=s.index))

    def _commit_to(self, index: int) -> None:
        if index > self.commit:
            self.commit = index

    # -- replication: leader side -------------------------------------------------------------

    def _append(self, entries: list[Entry]) -> None:
        self._entries.extend(entries)
        if any(e.kind == EntryKind.CONF for e in entries):
            self._recompute_voters()  # takes effect when appended, not when committed
        # Our own match moves in advance(), when the entries are durable.

    def _broadcast_append(self) -> None:
        if self.role != Role.LEADER:
            return  # a commit just now removed us (_on_commit stepped down)
        for v in self._voters:
            if v != self.id:
                self._send_append(v)

    def _send_append(self, to: str) -> None:
        pr = self._progress[to]
        if pr.state == ProgressState.PROBE and pr.probe_sent:
            return
        prev = pr.next - 1
        prev_term = self.term_at(prev)
        if prev_term is None:
            # Compacted away: send the snapshot, then probe right after it. Its acknowledgement
            # moves the follower to REPLICATE; if it is lost, the next heartbeat response
            # re-probes, the follower rejects with a hint below our first index, and we land
            # here again -- no separate snapshot state or timer to get stuck in.
            pr.next = self._snap.index + 1
            pr.state = ProgressState.PROBE
            pr.probe_sent = True
            self._send(Message(M.SNAP, self.id, to, self.term, snapshot=self._snap))
            return
        ents = self._slice(
            pr.next, min(self.last_index() + 1, pr.next + self.cfg.max_entries_per_msg)
        )
        self._send(
            Message(
                M.APP,
                self.id,
                to,
                self.term,
                log_term=prev_term,
                index=prev,
                entries=tuple(ents),
                commit=self.commit,
            )
        )
        if pr.state == ProgressState.REPLICATE and ents:
            pr.next = ents[-1].index + 1
        elif pr.state == ProgressState.PROBE:
            pr.probe_sent = True

    def _handle_append_resp(self, m: Message, pr: Progress) -> None:
        if m.reject:
            if m.index <= pr.match:
                return  # stale rejection
            if pr.state == ProgressState.PROBE and m.index != pr.next - 1:
                return  # answer to an earlier probe
            next_probe = m.hint
            if m.log_term > 0:
                next_probe = self._find_conflict_by_term(m.hint, m.log_term)
            pr.next = max(min(m.index, next_probe + 1), pr.match + 1)
            pr.state = ProgressState.PROBE
            pr.probe_sent = False
            self._send_append(m.src)
            return
        if m.index > pr.match:
            pr.match = m.index
            pr.next = max(pr.next, m.index + 1)
            if pr.state != ProgressState.REPLICATE:
                pr.state = ProgressState.REPLICATE
                pr.next = m.index + 1
            pr.probe_sent = False
            if self._maybe_commit():
                self._broadcast_append()
            elif pr.match < self.last_index() and self.role == Role.LEADER:
                self._send_append(m.src)
        elif pr.state == ProgressState.PROBE:
            pr.probe_sent = False
            if pr.match < self.last_index():
                self._send_append(m.src)

    def _maybe_commit(self) -> bool:
        index = quorum_index(self)
        if index > self.commit and self.term_at(index) == self.term:
            self.commit = index
            self._on_commit()
            return True
        return False

    def _on_commit(self) -> None:
        if self._waiting_reads and self.term_at(self.commit) == self.term:
            waiting, self._waiting_reads = self._waiting_reads, []
            for ctx, who in waiting:
                self._read_index(ctx, who)
        if self.id not in self._voters and self.commit >= self._conf_index:
            # Our own removal is committed: stop leading (thesis 4.2.2); the others elect.
            self._become_follower(self.term, NONE)

    def _broadcast_heartbeat(self, ctx: bytes) -> None:
        for v in self._voters:
            if v != self.id:
                pr = self._progress[v]
                self._send(
                    Message(
                        M.HEARTBEAT,
                        self.id,
                        v,
                        self.term,
                        commit=min(pr.match, self.commit),
                        context=ctx,
                    )
                )

    # -- ReadIndex ----------------------------------------------------------------------------

    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read point. A :class:`ReadState` with this ``context`` comes
        out of a later Ready once a majority confirmed this node (or its leader) still leads;
        the read is served when ``applied >= state.index``. Lost requests are not retried: the
        caller times out and asks again. Raises NotLeader when no leader is known.
        """
        if self.role == Role.LEADER:
            self._read_index(context, NONE)
        elif self.lead == NONE:
            raise NotLeader(f"{self.id}: no leader known in term {self.term}")
        else:
            self._send(Message(M.READ_INDEX, self.id, self.lead, self.term, context=context))

    def _read_index(self, ctx: bytes, requester: str) -> None:
        if self.term_at(self.commit) != self.term:
            # Our commit index may lag what a previous leader committed until an entry of our
            # term commits (thesis 6.4 step 1); answering now could miss a committed write.
            self._waiting_reads.append((ctx, requester))
            return
        self._read_seq += 1
        read = _PendingRead(ctx, b"%d" % self._read_seq, self.commit, requester, {self.id})
        self._reads.append(read)
        if len(read.acks & set(self._voters)) >= self._quorum():
            self._release_reads(len(self._reads))
        else:
            self._broadcast_heartbeat(read.key)

    def _ack_read(self, key: bytes, voter: str) -> None:
        for i, r in enumerate(self._reads):
            if r.key == key:
                r.acks.add(voter)
                if len(r.acks & set(self._voters)) >= self._quorum():
                    # A quorum confirmed leadership after every earlier read was asked too.
                    self._release_reads(i + 1)
                return

    def _release_reads(self, n: int) -> None:
        done, self._reads = self._reads[:n], self._reads[n:]
        for r in done:
            if r.requester == NONE:
                self._read_states.append(ReadState(r.index, r.context))
            else:
                self._send(
                    Message(
                        M.READ_INDEX_RESP,
                        self.id,
                        r.requester,
                        self.term,
                        index=r.index,
                        context=r.context,
                    )
                )

    # -- proposals ----------------------------------------------------------------------------

    def propose(self, data: bytes) -> int:
        """Append ``data`` as a new entry; returns its index (committed later, or lost if this
        node stops leading first -- the caller watches the committed entries for it)."""
        return self._propose(EntryKind.NORMAL, data)

    def propose_conf_change(self, cc: ConfChange) -> int:
        """Add or remove one voter. Refused while another change is uncommitted, before this
        leader has committed an entry of its term, or when it changes nothing."""
        if self.role == Role.LEADER:
            if self._conf_index > self.commit:
                raise ProposalRefused(
                    f"configuration change at index {self._conf_index} is not committed yet"
                )
            if self.term_at(self.commit) != self.term:
                raise ProposalRefused(f"leader {self.id} has not committed an entry of its term")
            if (cc.op == "add") == (cc.node in self._voters):
                raise ProposalRefused(
                    f"cannot {cc.op} {cc.node}: voters are {', '.join(self._voters)}"
                )
            if cc.op == "remove" and len(self._voters) == 1:
                raise ProposalRefused(f"cannot remove {cc.node}: it is the last voter")
        full = ConfChange(cc.op, cc.node, cc.apply(self._voters))
        return self._propose(EntryKind.CONF, full.encode())

    def _propose(self, kind: EntryKind, data: bytes) -> int:
        assert not self._in_ready, "propose between ready() and advance()"
        if self.role != Role.LEADER:
            raise NotLeader(f"{self.id} is not the leader (term {self.term})", leader=self.lead)
        e = Entry(self.term, self.last_index() + 1, kind, data)
        self._append([e])
        self._broadcast_append()
        return e.index

    # -- snapshots ----------------------------------------------------------------------------

    def compact(self, index: int, data: bytes) -> Snapshot:
        """The state machine, applied up to ``index``, is ``data``: keep it as the snapshot and
        drop the log up to ``index``. The caller persists the returned snapshot
        (:meth:`DurableLog.save_snapshot`) -- it is never sent before that matters, since a
        follower that needs it is served from memory and we can always re-send it.
        REQUIRES: snapshot index < index <= applied.
        """
        if not self._snap.index < index <= self.applied:
            raise ValueError(
                f"compact({index}): must be in ({self._snap.index}, applied={self.applied}]"
            )
        term = self.term_at(index)
        assert term is not None
        voters = self._snap.voters
        for e in self._slice(self.first_index(), index + 1):
            if e.kind == EntryKind.CONF:
                voters = ConfChange.decode(e.data).voters
        self._entries = self._slice(index + 1, self.last_index() + 1)
        self._snap = Snapshot(index, term, voters, data)
        return self._snap

    # -- messages out -------------------------------------------------------------------------

    def _send(self, m: Message) -> None:
        self._msgs.append(m)

    def _hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.commit)

    def has_ready(self) -> bool:
        return bool(
            self._msgs
            or self._read_states
            or self._stable < self.last_index()
            or self._pending_snapshot
            or self.applied < self.commit
            or self._hard_state() != self._persisted_hs
        )

    def ready(self) -> Ready:
        """Everything to do now (see :class:`Ready`); then call :meth:`advance` with it before
        any other method."""
        hs = self._hard_state()
        committed = (
            self._slice(self.applied + 1, self.commit + 1) if self.commit > self.applied else []
        )
        rd = Ready(
            hard_state=hs if hs != self._persisted_hs else None,
            entries=tuple(self._slice(self._stable + 1, self.last_index() + 1)),
            snapshot=self._pending_snapshot,
            messages=tuple(self._msgs),
            committed=tuple(committed),
            read_states=tuple(self._read_states),
            voters=self._voters,
        )
        self._in_ready = True
        return rd

    def advance(self, rd: Ready) -> None:
        """The caller did what ``rd`` asked: its entries and hard state are durable."""
        self._in_ready = False
        self._msgs = self._msgs[len(rd.messages) :]
        self._read_states = self._read_states[len(rd.read_states) :]
        if rd.snapshot is not None and self._pending_snapshot is rd.snapshot:
            self._pending_snapshot = None
        if rd.hard_state is not None:
            self._persisted_hs = rd.hard_state
        if rd.entries:
            self._stable = max(self._stable, rd.entries[-1].index)
        if rd.committed:
            self.applied = max(self.applied, rd.committed[-1].index)
        if self.role == Role.LEADER and self.id in self._progress:
            me = self._progress[self.id]
            if self._stable > me.match:
                me.match = self._stable
                me.next = self._stable + 1
                if self._maybe_commit():
                    self._broadcast_append()

    # -- inspection ---------------------------------------------------------------------------

    def log(self) -> list[Entry]:
        """The entries after the snapshot (a copy)."""
        return list(self._entries)

    @property
    def snapshot(self) -> Snapshot:
        return self._snap

    def status(self) -> dict[str, object]:
        return {
            "id": self.id,
            "role": self.role.value,
            "term": self.term,
            "leader": self.lead,
            "commit": self.commit,
            "applied": self.applied,
            "last_index": self.last_index(),
            "snapshot_index": self._snap.index,
            "voters": list(self._voters),
        }

    def check_invariants(self) -> None:
        assert self._snap.index <= self.applied <= self.commit <= self.last_index(), self.status()
        prev = self._snap.term
        for i, e in enumerate(self._entries):
            assert e.index == self._snap.index + 1 + i, (self.id, e)
            assert prev <= e.term <= self.term, (self.id, e, prev, self.term)
            prev = e.term
        assert (self.role == Role.LEADER) == (self.lead == self.id), self.status()
        if self.role == Role.LEADER:
            for pr in self._progress.values():
                assert 0 <= pr.match < pr.next, pr


def quorum_index(node: RaftNode) -> int:
    """The highest index stored by a majority of ``node``'s voters (its leader progress).
    A module function so a test can replace the commit rule with a broken one and watch the
    property checker catch it."""
    matches = sorted(
        (node._progress[v].match if v in node._progress else 0 for v in node._voters),
        reverse=True,
    )
    if not matches:
        return 0
    return matches[node._quorum() - 1]


__all__ = ["Config", "Progress", "ProgressState", "RaftNode", "Role", "quorum_index"]
