"""`shmkv serve --workers K`: a supervisor process and K worker processes for one node.

The seeds' "acceptor -> queue -> worker threads", with processes instead of threads, so the GIL
never caps a node at one core:

    supervisor (this module)  attaches the node's Store (creating it), forks K workers, restarts
       |                      any that dies, says "ready" once all are, stops them on SIGTERM,
       |                      then marks the segment retired and removes it
       +-- worker 0..K-1      daemon._main: its own event loop, TcpTransport bound with
                              SO_REUSEPORT on the one --listen port (the kernel spreads incoming
                              connections over the K listening sockets), the shared Store
                              inherited across fork

Every worker is a full coordinator and replica of the node: the Store is the node's one copy of
its keys (shared memory, plus the LSM with --path), and its read-merge-writes are cas loops, so
two workers merging one key never lose a version (replica.py). What stays per worker: the
coordinator's local failure detector (each worker suspects peers from its own requests and
probes them itself) and its background read repairs and counters (STATUS answers for the worker
that took the connection: its ``worker`` index and ``pid`` say which).

A dead worker (SIGKILL, a crash) is restarted by the supervisor at once -- with a back-off when
it keeps dying young -- and the other workers serve meanwhile: a connection that the dead one had
accepted breaks (the client retries a read elsewhere, and reports a write as MaybeApplied), new
connections go to the live ones. A robust mutex the dead worker held is repaired by the next
process that takes it (ext/core). A worker that fails before it is ready because of the
configuration (exit status 2: a taken port, a refused join) stops the node: the same cause
would stop every restart. Workers die with the supervisor (PR_SET_PDEATHSIG: SIGTERM), so a
SIGKILLed supervisor leaves no worker behind; it does leave its segment, which the next start
attaches (memory-only: its copies and actor are kept; --path: the LSM holds them anyway).

Rejected: threads (the GIL); ``multiprocessing`` (a spawned child re-imports and re-parses
everything, and its pickled arguments would have to carry the Store); one acceptor passing
sockets to workers (an extra hop per connection and a single point of failure the kernel's
SO_REUSEPORT does not have).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from ..errors import Error
from ..store import Store
from .daemon import (
    DRAIN_GRACE,
    Options,
    check_options,
    main_node,
    node_name,
    open_store,
    retire,
    run_worker,
    store_name,
)

log = logging.getLogger("shmkv.cluster")

#: a worker that dies within this many seconds of its start counts as "dying young"
YOUNG = 2.0
MAX_BACKOFF = 5.0
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
_PR_SET_PDEATHSIG = 1


@dataclass
class Worker:
    """What one worker process knows of its place in the node."""

    index: int
    count: int
    store: Store
    ready_fd: int

    def ready(self) -> None:
        """Tell the supervisor this worker serves (one byte on its pipe)."""
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, bytes([self.index % 256]))
            os.close(self.ready_fd)


@dataclass
class _Slot:
    pid: int = 0
    started: float = 0.0
    ready: bool = False
    young_deaths: int = 0
    restart_at: float | None = None
    pipe: int = -1  # the supervisor's read end of this worker's ready pipe
    history: list[int] = field(default_factory=list)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def _fork(o: Options, index: int, count: int, kv: Store, slot: _Slot) -> None:
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the worker
        rc = 1
        try:
            os.close(r)
            _die_with_parent()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            if os.getppid() != parent:  # the supervisor died between fork and prctl
                os._exit(0)
            rc = run_worker(o, Worker(index, count, kv, w))
        except BaseException:  # noqa: BLE001 -- a worker never returns into the supervisor's code
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(rc)
    os.close(w)
    os.set_blocking(r, False)
    slot.pid, slot.started, slot.ready, slot.pipe, slot.restart_at = pid, time.monotonic(), False, r, None
    slot.history.append(pid)


def _poll_ready(slot: _Slot) -> None:
    if slot.ready or slot.pipe < 0:
        return
    try:
        data = os.read(slot.pipe, 16)
    except BlockingIOError:
        return
    if data:
        slot.ready = True
    os.close(slot.pipe)
    slot.pipe = -1


def serve(o: Options) -> int:
    """Run one node until SIGTERM/SIGINT; returns the exit status (2: a config error). With more
    than one worker this process is the node's supervisor (:func:`supervise`); with one, the
    node runs in this process (daemon.main_node). Here, not in daemon.py, so the daemon never
    imports its supervisor back."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_options(o)
    k = o.workers if o.workers is not None else (os.cpu_count() or 1)
    if k == 1:
        return main_node(o)
    return supervise(o, k)


def supervise(o: Options, k: int) -> int:
    """Run node ``o`` as K worker processes until SIGTERM/SIGINT; returns the exit status."""
    name = node_name(o)
    sname = o.store or store_name(name, o.listen)
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # before any fork: no signal is lost
    kv = open_store(o, sname)
    slots = [_Slot() for _ in range(k)]
    rc = 0
    announced = False
    stopping = False
    try:
        for i, slot in enumerate(slots):
            _fork(o, i, k, kv, slot)
        log.info("%s: supervisor %d started %d workers: %s", name, os.getpid(), k, [s.pid for s in slots])
        while not stopping:
            info = signal.sigtimedwait(_SIGNALS, 0.05)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                stopping = True
                break
            now = time.monotonic()
            for slot in slots:
                _poll_ready(slot)
            for i, slot in enumerate(slots):
                if slot.pid:
                    pid, status = os.waitpid(slot.pid, os.WNOHANG)
                    if pid == 0:
                        continue
                    code = os.waitstatus_to_exitcode(status)
                    slot.pid = 0
                    if slot.pipe >= 0:
                        os.close(slot.pipe)
                        slot.pipe = -1
                    if code == 2 and not slot.ready:
                        log.error("%s: worker %d could not start (exit 2): stopping the node", name, i)
                        rc, stopping = 2, True
                        break
                    young = now - slot.started < YOUNG
                    slot.young_deaths = slot.young_deaths + 1 if young else 0
                    delay = min(MAX_BACKOFF, 0.1 * (2 ** slot.young_deaths)) if young else 0.0
                    slot.restart_at = now + delay
                    log.warning("%s: worker %d (pid %d) died (%s); restarting it in %.1f s", name, i,
                                pid, f"signal {-code}" if code < 0 else f"exit {code}", delay)
                if not slot.pid and slot.restart_at is not None and now >= slot.restart_at and not stopping:
                    _fork(o, i, k, kv, slot)
                    log.info("%s: worker %d restarted as pid %d", name, i, slot.pid)
            if not announced and all(s.ready for s in slots):
                announced = True
                print(f"ready {name} {o.listen} workers {k}", flush=True)
    except Error as e:
        log.error("%s: %s", name, e)
        rc = 2
    finally:
        _stop_all(name, slots)
        retire(kv)
        kv.close()
        with contextlib.suppress(Error, OSError):
            from .. import store as store_mod

            store_mod.unlink(sname)
        with contextlib.suppress(Error, OSError):
            from .gossip import board_name

            store_mod.unlink(board_name(sname))  # the workers' gossip board (gossip.py)
    return rc


def _stop_all(name: str, slots: list[_Slot]) -> None:
    """SIGTERM every worker, wait for them to drain (DRAIN_GRACE + a margin), SIGKILL the rest."""
    live = [s for s in slots if s.pid]
    for s in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(s.pid, signal.SIGTERM)
    deadline = time.monotonic() + DRAIN_GRACE + 3
    while live:
        for s in list(live):
            pid, _ = os.waitpid(s.pid, os.WNOHANG)
            if pid:
                s.pid = 0
                live.remove(s)
        if live and time.monotonic() > deadline:
            log.warning("%s: workers %s did not stop in time: SIGKILL", name, [s.pid for s in live])
            for s in live:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.pid, signal.SIGKILL)
                os.waitpid(s.pid, 0)
                s.pid = 0
            live = []
        if live:
            time.sleep(0.02)
    for s in slots:
        if s.pipe >= 0:
            os.close(s.pipe)
            s.pipe = -1


__all__ = ["Worker", "serve", "supervise"]
