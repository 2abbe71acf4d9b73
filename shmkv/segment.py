"""Life cycle of a store's shared-memory segment: create-or-attach, unlink, listing.

Names: store "sessions" is the POSIX shared-memory object "/shmkv.sessions" (the file
/dev/shm/shmkv.sessions on Linux), with a lock file "/dev/shm/.shmkv.sessions.lock" beside it.

The lock file does two jobs, on one descriptor per process and store (see `_LockFiles`):
  * an exclusive flock on it serialises create-or-attach, so 8 workers starting at once
    create the segment exactly once; a creator killed half-way releases the flock with its
    death, and the next one finds init_done unset and creates the segment anew;
  * byte i carries a POSIX record lock held by the live process in slot i (segment.c).
    POSIX record locks are dropped when the process closes ANY descriptor of the file, so
    the descriptor is opened once per process and closed only with the last handle.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

import posix_ipc

from . import _core
from .errors import InvalidArgument, SegmentMismatch, StoreFull, StoreNotFound
from .sizes import format_size

SHM_DIR = "/dev/shm"
_PREFIX = "shmkv."
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")

# DO NOT CHANGE: stored in the header (codec field).
CODEC_RAW = 0
CODEC_PICKLE = 1


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidArgument(
            f"store name {name!r}: use 1-200 characters from A-Z a-z 0-9 _ . -"
        )
    return name


def shm_name(name: str) -> str:
    return "/" + _PREFIX + name


def lock_path(name: str) -> str:
    return os.path.join(SHM_DIR, "." + _PREFIX + name + ".lock")


class _LockFiles:
    """One descriptor per (process, store) for the lock file, reference counted."""

    def __init__(self) -> None:
        self._fds: dict[str, list[int]] = {}
        self._mutex = threading.Lock()

    def acquire(self, name: str) -> int:
        with self._mutex:
            entry = self._fds.get(name)
            if entry is None:
                fd = os.open(lock_path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                entry = self._fds[name] = [fd, 0]
            entry[1] += 1
            return entry[0]

    def release(self, name: str) -> None:
        with self._mutex:
            entry = self._fds.get(name)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._fds[name]
                os.close(entry[0])

    def after_fork(self) -> None:
        # The child inherited the descriptors; its record locks are its own (none yet).
        self._mutex = threading.Lock()


lock_files = _LockFiles()


@dataclass(frozen=True)
class CreateParams:
    size: int
    max_key: int
    max_item: int
    growth: float
    lock_stripes: int
    codec: int
    codec_arg: int


def _free_shm_bytes() -> int | None:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _open_existing(name: str) -> posix_ipc.SharedMemory | None:
    try:
        return posix_ipc.SharedMemory(shm_name(name))
    except posix_ipc.ExistentialError:
        return None


def _finished_header(shm: posix_ipc.SharedMemory) -> dict[str, Any] | None:
    if shm.size < 4096:
        return None
    hdr = _core.read_header(shm.fd)
    return hdr if hdr["init_done"] else None


def _check_compatible(name: str, hdr: dict[str, Any], want: CreateParams | None, size: int | None,
                      codec: int | None) -> None:
    if hdr["magic"] != _core.MAGIC or hdr["layout_version"] != _core.LAYOUT_VERSION:
        raise SegmentMismatch(
            f"store {name!r} has layout version {hdr['layout_version']} (magic {hdr['magic']:#x}); "
            f"this shmkv reads layout version {_core.LAYOUT_VERSION}: remove it with "
            f"`shmkv rm {name}` or use the shmkv version that created it"
        )
    if size is not None and hdr["size"] != size:
        raise SegmentMismatch(
            f"store {name!r} exists with size {hdr['size']} bytes ({format_size(hdr['size'])}); "
            f"attach asked for {size} bytes ({format_size(size)}): pass the same size, or "
            f"size=None to attach whatever exists"
        )
    if codec is not None and hdr["codec"] != codec:
        names = {CODEC_RAW: "raw", CODEC_PICKLE: "pickle"}
        raise SegmentMismatch(
            f"store {name!r} was created with codec {names.get(hdr['codec'], hdr['codec'])!r}; "
            f"attach asked for {names.get(codec, codec)!r}"
        )
    if want is not None:
        for field in ("max_key", "max_item"):
            if getattr(want, field) is not None and hdr[field] != getattr(want, field):
                raise SegmentMismatch(
                    f"store {name!r} exists with {field}={hdr[field]}; attach asked for "
                    f"{field}={getattr(want, field)}"
                )


def open_segment(core: _core.Core, name: str, size: int | None, create: bool,
                 params: CreateParams, explicit: set[str], codec: int | None) -> None:
    """Create-or-attach `name` and attach `core` to it (race-free across processes)."""
    check_name(name)
    lockfd = lock_files.acquire(name)
    attached = False
    try:
        fcntl.flock(lockfd, fcntl.LOCK_EX)
        try:
            shm = _open_existing(name)
            if shm is not None and _finished_header(shm) is None:
                # A creator died before finishing (we hold the flock it would hold).
                shm.close_fd()
                shm.unlink()
                shm = None
            if shm is not None:
                hdr = _finished_header(shm)
                assert hdr is not None
                want = CreateParams(**{**params.__dict__,
                                       **{f: None for f in ("max_key", "max_item") if f not in explicit}})
                try:
                    _check_compatible(name, hdr, want, size, codec)
                except BaseException:
                    shm.close_fd()
                    raise
                seg_size = hdr["size"]
            else:
                if not create:
                    raise StoreNotFound(f"no store named {name!r} (looked for {SHM_DIR}/{_PREFIX}{name})")
                seg_size = params.size
                free = _free_shm_bytes()
                if free is not None and seg_size > free:
                    raise StoreFull(
                        f"cannot create store {name!r} of {format_size(seg_size)}: {SHM_DIR} has "
                        f"{format_size(free)} free (Docker: raise --shm-size)"
                    )
                shm = posix_ipc.SharedMemory(shm_name(name), posix_ipc.O_CREX, mode=0o600, size=seg_size)
                try:
                    _core.create_segment(shm.fd, seg_size, params.max_key, params.max_item,
                                         params.growth, params.lock_stripes, params.codec,
                                         params.codec_arg)
                except BaseException:
                    shm.close_fd()
                    shm.unlink()
                    raise
            try:
                core._attach(name, shm.fd, seg_size, lockfd)
                attached = True
            finally:
                shm.close_fd()  # the mapping keeps the object alive
        finally:
            fcntl.flock(lockfd, fcntl.LOCK_UN)
    finally:
        if not attached:
            lock_files.release(name)


def unlink(name: str) -> None:
    """Remove store `name`. Processes still attached keep their mapping until they close."""
    check_name(name)
    try:
        posix_ipc.unlink_shared_memory(shm_name(name))
    except posix_ipc.ExistentialError:
        raise StoreNotFound(f"no store named {name!r}") from None
    try:
        os.unlink(lock_path(name))
    except FileNotFoundError:
        pass


def list_stores() -> list[str]:
    """Names of the stores on this host, sorted."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(e[len(_PREFIX):] for e in entries if e.startswith(_PREFIX) and _NAME.match(e[len(_PREFIX):]))


def segment_info(name: str) -> dict[str, Any]:
    """Header fields of an existing store, without attaching to it."""
    check_name(name)
    shm = _open_existing(name)
    if shm is None:
        raise StoreNotFound(f"no store named {name!r}")
    try:
        hdr = _finished_header(shm)
        if hdr is None:
            return {"name": name, "size": shm.size, "initialized": False}
        return {"name": name, "initialized": True, **hdr}
    finally:
        shm.close_fd()
