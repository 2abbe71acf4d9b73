"""Moving copies to their new owners after a ring change: old owners push, rate-limited, and
report when they are done; a restarted pusher resumes where it was.

A ring change committed by the configuration group starts a *move* (cluster_config.Move): the
old ring, and the old owners still in the ring it waits for. Each of them pushes every key it
holds whose preference list *gained* members -- members in the new list that were not in the
old -- to those members (REPLICA_PUT_MANY for version sets, REPLICA_COUNTER for counters), at
the node's current epoch, then commits ``{"op": "streamed", "name": me, "move": E}``; the last
report ends the move and coordinators go back to the new ring alone (coordinator.py,
``Node.moving``). Until then reads of a moving key ask R of its old owners too, so new owners
that have not caught up are never the only source of a read. A node removed by the change
pushes too, best effort: it is not waited for (cluster_config.py says why).

Order and resumption. Keys are pushed in sorted order, in batches of at most ``batch`` copies;
after every batch is acknowledged the node writes its cursor -- the move's epoch, the last key
done, the keys and bytes sent -- to its Store's metadata key ``m`` + ``rebalance``. A pusher
killed mid-move (its shared-memory or disk Store survives it) learns the move again when it
restarts (the move is in the committed configuration: it waits for this node) and resumes after
the cursor; merges are idempotent (versions.py, crdt.py), so a batch sent twice (acknowledged,
then killed before the cursor was written) costs bandwidth only.

Rate: at most ``rate`` bytes per second (the encoded copies: ``shmkv serve --stream-rate``).
A batch that fails (a new owner down, or at another epoch and refusing with WrongEpoch) is sent
again after ``retry`` seconds, up to ``attempts`` times in a row; then the push is reported
``failed`` (log and ``cluster status``) and starts over from the cursor at the next
configuration change or restart -- never dropped silently, and the move stays on (reads keep
going to the old owners) until it is done or an operator ends it (``shmkv cluster
finish-move``).

Invariant: ``streamed`` is reported only after every gained copy this node held when it adopted
the move's ring was acknowledged by its new owner. Writes this node accepts after adopting it
are written to W new owners by their coordinator already (Node.write_moving), and a replica at
the old epoch refuses the new epoch's requests, so nothing the scan misses needs it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgpack

from ..errors import Error
from . import wire
from .cluster_config import Move
from .errors import ConcurrentChange, ConfigError
from .replica import COUNTER, META, VERSIONS
from .ring import Ring
from .wire import Message

if TYPE_CHECKING:
    from .coordinator import Node

log = logging.getLogger("shmkv.cluster.rebalance")

PROGRESS_KEY = META + b"rebalance"
#: bytes per second of copies pushed (``--stream-rate``'s default: 20 MB/s)
DEFAULT_RATE = 20_000_000.0

Report = Callable[[dict[str, Any]], Awaitable[Any]]


def parse_rate(text: str) -> float:
    """``--stream-rate``: bytes per second, an int or a float with an optional K/M/G suffix
    (powers of 1000: "20M" is 20,000,000 B/s). :raises ConfigError: anything else, or <= 0."""
    s = str(text).strip()
    mult = {"k": 1e3, "m": 1e6, "g": 1e9}.get(s[-1:].lower(), 1.0)
    num = s[:-1] if mult != 1.0 else s
    try:
        value = float(num) * mult
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"--stream-rate must be bytes per second > 0 (e.g. 20M, 500K, 1000000), got {text!r}")
    return value


def moving_ranges(old: Ring, new: Ring, n: int) -> int:
    """How many of the new ring's ranges (vnodes) have a preference list the old ring did not
    give their first key: the ranges a move streams (for ``cluster status``)."""
    new_lists, old_lists = new.vnode_preference_lists(n), old.vnode_preference_lists(n)
    old_tokens = old._tokens  # noqa: SLF001 -- the rings' own token order
    out = 0
    for tok, prefs in zip(new._tokens, new_lists, strict=True):  # noqa: SLF001
        i = bisect.bisect_left(old_tokens, tok) % len(old_tokens)  # the old vnode of the range's end
        if set(old_lists[i]) != set(prefs):
            out += 1
    return out


def _counter_msg(key: bytes, counter: Any, epoch: int) -> Message:
    """A gained member's REPLICA_COUNTER for ``key``, at the epoch of the send (_send)."""
    return Message(wire.REPLICA_COUNTER, 0, {"key": key, "counter": counter, "epoch": epoch})


def _put_many_msg(items: list[Any], epoch: int) -> Message:
    """A gained member's REPLICA_PUT_MANY of ``items``, at the epoch of the send (_send)."""
    return Message(wire.REPLICA_PUT_MANY, 0, {"items": items, "epoch": epoch})


class Rebalancer:
    def __init__(self, node: Node, *, rate: float = DEFAULT_RATE, batch: int = 256, retry: float = 1.0,
                 attempts: int = 30, timeout: float = 2.0) -> None:
        self.node = node
        self.rate, self.batch, self.retry, self.attempts, self.timeout = rate, batch, retry, attempts, timeout
        #: commits a ``streamed`` command (the configuration service's ``change``); None: the
        #: push is done but not reported (a test without a group)
        self.report: Report | None = None
        self._move: int | None = None  # the epoch of the move being pushed (or done)
        self._done: int | None = None  # the last move this node finished (and reported)
        self._task: asyncio.Task[None] | None = None
        self._legacy: Ring | None = None  # the oldest ring of a push without moves under way
        self.progress: dict[str, Any] = {"state": "idle", "keys_sent": 0, "bytes_sent": 0, "failed_passes": 0,
                                         "scanned": 0, "sent": 0}

    # -- driven by the configuration ---------------------------------------------------------

    def on_change(self, old: Ring | None, new: Ring) -> None:
        """Called with every ring the node adopts (after ``node.moving`` is set)."""
        mv = self.node.moving
        me = self.node.config.name
        if mv is None and old is not None and dict(old.members) != dict(new.members):
            # a change without moves (etcd's): push, report nothing; a change during such a push
            # rescans from the oldest ring not streamed yet, so both changes' copies are covered
            running = self._task is not None and not self._task.done() and self._legacy is not None
            mv = Move(new.epoch, self._legacy if running and self._legacy is not None else old, frozenset())
            self._legacy = mv.ring
        elif mv is not None:
            self._legacy = None
        if mv is None or me not in mv.ring.members:
            if self._task is not None and not self._task.done() and mv is None:
                # the move is over: by this node's own report (it was the last), or ended by the
                # operator (cluster finish-move) -- either way nothing is left to push
                self._task.cancel()
                if self.progress["state"] == "reporting":
                    self.progress["report"] = "committed"
                    self._done = self._move
                else:
                    self.progress["report"] = "move ended before this node finished"
                self.progress["state"] = "idle"
            return
        if mv.epoch == self._done or (mv.epoch == self._move and self._task is not None and not self._task.done()):
            return  # the same move at a new epoch (another owner's report): go on
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._move = mv.epoch
        self._task = asyncio.get_running_loop().create_task(self._run(mv))

    async def _run(self, mv: Move) -> None:
        me = self.node.config.name
        must_report = me in mv.waiting
        self.progress.update(state="streaming", move=mv.epoch, scanned=0, sent=0,
                             ranges_moving=self._ranges(mv), report="waiting" if must_report else "not needed")
        try:
            ok = await self._pass(mv)
        except Error as e:  # the store went away (shutdown): stop
            log.warning("%s: streaming stopped: %s", me, e)
            return
        if not ok:
            log.error("%s: gave up streaming the move of epoch %d after %d failed tries of a batch",
                      me, mv.epoch, self.attempts)
            self.progress["state"] = "failed"
            self._move = None
            return
        log.info("%s: streamed %d copies to their new owners (move of epoch %d)", me, self.progress["sent"], mv.epoch)
        self.progress.update(state="reporting" if must_report else "idle")
        if must_report:
            await self._report(mv)
        self._done = mv.epoch
        self.progress["state"] = "idle"

    def _ranges(self, mv: Move) -> int:
        ring = self.node.ring
        try:
            return moving_ranges(mv.ring, ring, self.node.config.n) if ring is not None else 0
        except (Error, AttributeError):
            return 0

    async def _report(self, mv: Move) -> None:
        """Commit ``streamed`` (retried while the group is busy or leaderless); over once it
        commits or the group says the move no longer waits for this node."""
        if self.report is None:
            return
        cmd = {"op": "streamed", "name": self.node.config.name, "move": mv.epoch}
        for _ in range(600):  # bounded: 10 minutes at the default retry of 1 s
            try:
                await self.report(cmd)
                self.progress["report"] = "committed"
                return
            except ConfigError as e:
                # ConcurrentChange: etcd's compare-and-swap lost to another commit: try again
                if "in progress" not in str(e) and not isinstance(e, ConcurrentChange):
                    # over, or not waited for: nothing to report
                    self.progress["report"] = f"not needed: {e}"
                    return
            except (Error, OSError) as e:
                log.info("%s: reporting the move of epoch %d failed (will retry): %s",
                         self.node.config.name, mv.epoch, e)
            cur = self.node.moving
            if cur is None or cur.epoch != mv.epoch or self.node.config.name not in cur.waiting:
                self.progress["report"] = "committed"
                return
            await asyncio.sleep(self.retry)
        self.progress["report"] = "gave up"

    # -- the push ----------------------------------------------------------------------------

    def _cursor(self, move: int) -> bytes:
        """Where a push of ``move`` stopped before (b"": from the start)."""
        raw = self.node.replica.store.get(PROGRESS_KEY)
        if not isinstance(raw, bytes):
            return b""
        try:
            st = msgpack.unpackb(raw, raw=False)
        except (ValueError, msgpack.UnpackException):
            return b""
        if not isinstance(st, dict) or st.get("move") != move or not isinstance(st.get("cursor"), bytes):
            return b""
        self.progress["resumed_after"] = int(st.get("keys") or 0)
        self.progress["keys_sent"] = max(self.progress["keys_sent"], int(st.get("keys") or 0))
        self.progress["bytes_sent"] = max(self.progress["bytes_sent"], int(st.get("bytes") or 0))
        return bytes(st["cursor"])

    def _save(self, move: int, cursor: bytes) -> None:
        st = {"move": move, "cursor": cursor, "keys": self.progress["keys_sent"], "bytes": self.progress["bytes_sent"]}
        with contextlib.suppress(Error, OSError):
            self.node.replica.store.put(PROGRESS_KEY, msgpack.packb(st, use_bin_type=True))

    async def _pass(self, mv: Move) -> bool:
        n = self.node.config.n
        me = self.node.config.name
        store = self.node.replica.store
        cursor = self._cursor(mv.epoch)
        skeys = sorted(k for k in store.keys() if k[:1] in (VERSIONS, COUNTER) and len(k) > 1 and k > cursor)
        self.progress["to_scan"] = len(skeys)
        pending: dict[str, list[Any]] = {}
        size = 0
        count = 0
        for skey in skeys:
            kind, key = skey[:1], skey[1:]
            self.progress["scanned"] += 1
            ring = self.node.ring
            assert ring is not None
            before = mv.ring.preference_list(key, n)
            gained = [m for m in ring.preference_list(key, n) if m != me and m not in before]
            if gained:
                if kind == COUNTER:
                    c = self.node.replica.counter(key).to_wire()
                    for m in gained:
                        ok = await self._send(m, functools.partial(_counter_msg, key, c))
                        if not ok:
                            return False
                    self._sent(1, 16 + len(key))
                else:
                    item = [key, self.node.replica.get(key).to_wire()]
                    nbytes = len(key) + _size(item[1])
                    for m in gained:
                        pending.setdefault(m, []).append(item)
                        size += nbytes
                        count += 1
            if count >= self.batch:
                if not await self._flush(pending, size):
                    return False
                self._save(mv.epoch, skey)  # before the pause: a kill in it keeps this batch done
                await asyncio.sleep(size / self.rate)  # the rate limit: this batch at --stream-rate
                pending, size, count = {}, 0, 0
        if pending and not await self._flush(pending, size):
            return False
        if skeys:
            self._save(mv.epoch, skeys[-1])
        return True

    async def _flush(self, pending: dict[str, list[Any]], size: int) -> bool:
        for m, items in pending.items():
            ok = await self._send(m, functools.partial(_put_many_msg, items))
            if not ok:
                return False
            self._sent(len(items), 0)
        self.progress["bytes_sent"] += size
        return True

    def _sent(self, keys: int, nbytes: int) -> None:
        self.progress["sent"] += keys
        self.progress["keys_sent"] += keys
        self.progress["bytes_sent"] += nbytes

    async def _send(self, member: str, make: Callable[[int], Message]) -> bool:
        """One batch to ``member``, at the node's epoch of the moment; retried (module docstring)."""
        for attempt in range(self.attempts):
            ring = self.node.ring
            assert ring is not None
            m = ring.members.get(member)
            if m is None:
                return True  # no longer a member: nothing to send it
            try:
                await self.node.transport.request(m.addr, make(ring.epoch), self.timeout)
                return True
            except (Error, OSError) as e:
                log.info("%s: moving copies to %s failed (try %d, will retry): %s",
                         self.node.config.name, member, attempt + 1, e)
                self.progress["failed_passes"] += 1
                self.progress["state"] = "retrying"
            await asyncio.sleep(self.retry)
            self.progress["state"] = "streaming"
        return False

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _size(wire_form: Any) -> int:
    """Bytes of a version set's wire form (its values and contexts, roughly)."""
    return len(msgpack.packb(wire_form, use_bin_type=True))


__all__ = ["Rebalancer", "parse_rate", "moving_ranges", "DEFAULT_RATE", "PROGRESS_KEY"]
