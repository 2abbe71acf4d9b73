"""The values Raft's core and its durable log exchange: entries, messages, hard state, snapshots.

Plain frozen dataclasses with no behaviour beyond encoding a configuration change, so core.py
(the state machine), log.py (the disk) and a transport can share them without importing each
other. Node ids are strings (the daemon's node names); the empty string means "nobody".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..errors import ClusterError

NONE = ""  # "no node": no vote cast, no leader known


class NotLeader(ClusterError):
    """A proposal or read went to a node that is not the leader; ``leader`` is the one this node
    knows of (``""`` when it knows none) so the caller can forward."""

    def __init__(self, message: str, *, leader: str = NONE) -> None:
        super().__init__(message)
        self.leader = leader


class ProposalRefused(ClusterError):
    """A proposal the leader will not append: a second configuration change while one is
    uncommitted, a change that makes no sense (adding a voter twice), or before the leader has
    committed an entry of its own term."""


class EntryKind(int, Enum):
    # DO NOT CHANGE: stored layout (log.py writes the value).
    NORMAL = 0
    CONF = 1  # data is an encoded ConfChange


@dataclass(frozen=True, slots=True)
class Entry:
    term: int
    index: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ConfChange:
    """One voter added or removed: one-at-a-time membership change (thesis 4.1).

    The stored entry carries the whole resulting voter set (``voters``), not only the delta:
    a node that joins learns the configuration from the first configuration entry it receives,
    without the initial voters (which only the founding nodes' empty snapshot holds). (It was a
    delta: a joiner applied "add n5" to its empty configuration, believed itself the only
    voter, and elected itself -- the property checker found it on seed 1.)
    """

    op: str  # "add" | "remove"
    node: str
    voters: tuple[str, ...] = ()  # the configuration after the change; filled by the leader

    def encode(self) -> bytes:
        if self.op not in ("add", "remove") or not self.node or " " in self.node:
            raise ValueError(f"bad configuration change {self.op!r} {self.node!r}")
        return f"{self.op} {self.node} {','.join(self.voters)}".encode()

    @staticmethod
    def decode(data: bytes) -> ConfChange:
        op, node, voters = data.decode().split(" ")
        return ConfChange(op, node, tuple(v for v in voters.split(",") if v))

    def apply(self, voters: tuple[str, ...]) -> tuple[str, ...]:
        if self.op == "add":
            return tuple(sorted({*voters, self.node}))
        return tuple(v for v in voters if v != self.node)


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be on disk before any message that depends on it is sent.

    Invariant (on every node, across crashes): term never decreases; vote is cast at most once
    per term; commit never decreases below what was persisted.
    """

    term: int = 0
    vote: str = NONE
    commit: int = 0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state machine up to and including ``index`` (whose entry had ``term``), with the
    configuration in force at that index. ``index == 0`` is the empty initial snapshot, which
    carries a fresh cluster's initial voters."""

    index: int = 0
    term: int = 0
    voters: tuple[str, ...] = ()
    data: bytes = b""


class MsgType(str, Enum):
    PRE_VOTE = "PreVote"
    PRE_VOTE_RESP = "PreVoteResp"
    VOTE = "Vote"
    VOTE_RESP = "VoteResp"
    APP = "App"
    APP_RESP = "AppResp"
    HEARTBEAT = "Heartbeat"
    HEARTBEAT_RESP = "HeartbeatResp"
    SNAP = "Snap"
    READ_INDEX = "ReadIndex"  # follower -> leader: "confirm you lead and tell me your commit"
    READ_INDEX_RESP = "ReadIndexResp"


@dataclass(frozen=True, slots=True)
class Message:
    """One Raft message. Field meaning per type:

    - (PRE_)VOTE: ``index``/``log_term`` are the candidate's last entry; ``term`` is the term
      the candidate runs for (for a pre-vote, its term + 1 without having moved to it).
    - (PRE_)VOTE_RESP: ``reject``; ``term`` is the request's term when granted.
    - APP: ``index``/``log_term`` the entry preceding ``entries``; ``commit`` the leader's.
    - APP_RESP: accepted: ``index`` is the last index known to match. Rejected: ``index`` is the
      probe that failed, ``hint``/``log_term`` the follower's guess of where the logs agree
      (the largest index <= hint whose term <= the probe's term): the fast backtracking.
    - HEARTBEAT: ``commit`` is min(leader commit, follower's match); ``context`` a ReadIndex id.
    - SNAP: ``snapshot``. READ_INDEX(_RESP): ``context``; the response's ``index`` is the read's.
    """

    type: MsgType
    src: str
    dst: str
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    hint: int = 0
    snapshot: Snapshot | None = None
    context: bytes = b""


@dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read is safe once the local state machine has applied ``index``."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """What the caller must do, in this order (etcd/raft's Ready loop):

    1. persist, durably (fsync) and atomically enough that a crash leaves a prefix of these
       steps: ``snapshot`` (if any: it replaces the log up to its index), ``entries`` (first
       dropping every stored entry at or after ``entries[0].index`` -- a conflicting suffix),
       ``hard_state`` (if not None). :meth:`shmkv.cluster.raft.log.DurableLog.persist` does it.
    2. only then send ``messages``: many of them acknowledge what step 1 stored (a vote, an
       appended entry); sending first would let a crash un-say an acknowledgement.
    3. restore the state machine from ``snapshot`` if any, then apply ``committed`` in order;
       hand ``read_states`` to waiting readers (each is served once applied >= its index).
    4. call ``node.advance(ready)``.
    """

    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    messages: tuple[Message, ...] = ()
    committed: tuple[Entry, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    # The configuration after this Ready's entries (for a caller that routes by it).
    voters: tuple[str, ...] = field(default=())

    def empty(self) -> bool:
        return not (
            self.hard_state
            or self.entries
            or self.snapshot
            or self.messages
            or self.committed
            or self.read_states
        )
