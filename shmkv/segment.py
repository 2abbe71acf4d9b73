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

A persistent store's segment records its disk tier (absolute directory and durability) in the
header, written before init_done: every attach checks what it asks for against it
(`_check_tier`), so no process can attach a persistent store as memory-only, or over another
directory, or with another durability.

A lock file exists only beside its segment: an attach that fails before a segment exists
removes the file it created, and `unlink` removes both. A lock file is removed only while its
flock is held, so a process that opened the file before the removal (and then waited for the
flock) wakes holding the lock of an orphan; `_flock_current` notices and locks the file now at
the path instead (else two creators could each believe they hold "the" lock). A lock file
left without a segment by an older shmkv is listed by `stale_lock_names` and removed by
`remove_stale_lock` (`shmkv ls` / `shmkv rm`).
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import posix_ipc

from ._ext import _core
from .errors import (
    EngineMismatch,
    Error,
    InvalidArgument,
    SegmentMismatch,
    StoreFull,
    StoreNotFound,
)
from .lsm.errors import FileAccessError
from .sizes import format_size

SHM_DIR = "/dev/shm"
_PREFIX = "shmkv."
_LOCK_SUFFIX = ".lock"
# Used with fullmatch only: with match(), "$" also matches before a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")

# DO NOT CHANGE: stored in the header (codec field).
CODEC_RAW = 0
CODEC_PICKLE = 1
CODEC_NAMES = {CODEC_RAW: "raw", CODEC_PICKLE: "pickle"}

# DO NOT CHANGE: stored in the header (engine field; ENGINE_* in ext/core/layout.h).
ENGINE_HASH = 0
ENGINE_BTREE = 1
ENGINE_CODES = {"hash": ENGINE_HASH, "btree": ENGINE_BTREE}
ENGINE_NAMES = {v: k for k, v in ENGINE_CODES.items()}
DEFAULT_INTERVAL_MS = 50

# DO NOT CHANGE: stored in the header (tier field; TIER_* in ext/core/layout.h).
TIER_NONE = 0
DURABILITY_CODES = {"none": 1, "interval": 2, "fsync": 3}
DURABILITY_NAMES = {v: k for k, v in DURABILITY_CODES.items()}


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"store name {name!r}: use 1-200 characters from A-Z a-z 0-9 _ . -"
        )
    return name


def shm_name(name: str) -> str:
    return "/" + _PREFIX + name


def lock_path(name: str) -> str:
    return os.path.join(SHM_DIR, "." + _PREFIX + name + _LOCK_SUFFIX)


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

    def users(self, name: str) -> int:
        """Handles (and attaches under way) of this process on `name`'s descriptor."""
        with self._mutex:
            entry = self._fds.get(name)
            return entry[1] if entry else 0

    def reopen(self, name: str) -> int:
        """Replace our descriptor by one on the file now at the path.
        REQUIRES: one user (so none of our record locks lives on the old one)."""
        with self._mutex:
            entry = self._fds[name]
            assert entry[1] == 1
            os.close(entry[0])
            entry[0] = os.open(lock_path(name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
    engine: int = ENGINE_HASH


@dataclass(frozen=True)
class TierSpec:
    """What an attach asks of the disk tier. None: take what the segment records.

    `path` is absolute (resolved once, at attach: a relative path would name another
    directory after a chdir); `durability` a DURABILITY_CODES value."""

    path: str | None = None
    durability: int | None = None
    interval_ms: int | None = None


def same_dir(a: str, b: str) -> bool:
    """Whether two absolute directory paths name one directory (equal, or the same inode:
    a bind mount, or a symlink swapped since)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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
                      codec: int | None, tier: TierSpec | None = None, engine: int | None = None) -> None:
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
        names = CODEC_NAMES
        raise SegmentMismatch(
            f"store {name!r} was created with codec {names.get(hdr['codec'], hdr['codec'])!r}; "
            f"attach asked for {names.get(codec, codec)!r}"
        )
    if engine is not None and hdr["engine"] != engine:
        raise EngineMismatch(
            f"store {name!r} was created with engine {ENGINE_NAMES.get(hdr['engine'], hdr['engine'])!r}; "
            f"attach asked for engine {ENGINE_NAMES.get(engine, engine)!r} (the engine is fixed at "
            f"creation: attach with engine=None to take the store's, or remove it with `shmkv rm {name}`)"
        )
    if want is not None:
        for field in ("max_key", "max_item"):
            if getattr(want, field) is not None and hdr[field] != getattr(want, field):
                raise SegmentMismatch(
                    f"store {name!r} exists with {field}={hdr[field]}; attach asked for "
                    f"{field}={getattr(want, field)}"
                )
    if tier is not None:
        _check_tier(name, hdr, tier)


def _check_tier(name: str, hdr: dict[str, Any], tier: TierSpec) -> None:
    recorded = hdr["tier_path"]
    if hdr["tier"] == TIER_NONE:
        # Rejected: giving a live memory-only store a disk tier. Processes already attached
        # would keep editing memory only, so the disk would miss their writes.
        if tier.path is not None:
            raise SegmentMismatch(
                f"store {name!r} is memory-only; attach asked for a disk tier at {tier.path!r}: "
                f"a live store cannot gain one (processes attached without it would bypass the "
                f"disk). Close them, `shmkv rm {name}`, and attach with the path"
            )
        if tier.durability is not None:
            raise SegmentMismatch(
                f"store {name!r} is memory-only; attach asked for "
                f"durability={DURABILITY_NAMES[tier.durability]!r}, which needs a path"
            )
        return
    if tier.path is not None and not same_dir(tier.path, os.fsdecode(recorded)):
        raise SegmentMismatch(
            f"store {name!r} keeps its disk tier in {os.fsdecode(recorded)!r}; attach asked for "
            f"{tier.path!r}: pass the same path, or none to use the recorded one"
        )
    if tier.durability is not None and tier.durability != hdr["tier"]:
        raise SegmentMismatch(
            f"store {name!r} was created with durability={DURABILITY_NAMES.get(hdr['tier'])!r}; "
            f"attach asked for {DURABILITY_NAMES[tier.durability]!r}: durability is a setting of "
            f"the store, shared by every process (pass None to take the store's)"
        )
    if (tier.interval_ms is not None and hdr["tier"] == DURABILITY_CODES["interval"]
            and tier.interval_ms != hdr["tier_interval_ms"]):
        raise SegmentMismatch(
            f"store {name!r} was created with interval_ms={hdr['tier_interval_ms']}; attach asked "
            f"for {tier.interval_ms}"
        )


def _os_error(e: OSError | posix_ipc.Error, what: str) -> Error:
    """An OS failure (permissions, a read-only /dev/shm...) as a shmkv error naming `what`."""
    if isinstance(e, Error):
        return e
    no = getattr(e, "errno", None) or 0
    return FileAccessError(no, f"cannot {what}: {getattr(e, 'strerror', None) or e}", SHM_DIR)


def _flock_current(name: str) -> int:
    """Take the creation flock of `name`'s lock file -- the file now at the path -- and
    return its descriptor (counted in lock_files; the caller releases it)."""
    try:
        lockfd = lock_files.acquire(name)
    except OSError as e:
        raise _os_error(e, f"open the lock file {lock_path(name)}") from e
    try:
        # Each retry follows a removal by another process; bounded all the same.
        for _ in range(1000):
            fcntl.flock(lockfd, fcntl.LOCK_EX)
            try:
                st = os.stat(lock_path(name))
                current: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                current = None
            mine = os.fstat(lockfd)
            # With other handles of ours on the old file, their slot locks live there: keep it.
            if current == (mine.st_dev, mine.st_ino) or lock_files.users(name) > 1:
                return lockfd
            fcntl.flock(lockfd, fcntl.LOCK_UN)
            lockfd = lock_files.reopen(name)
        raise Error(f"store {name!r}: its lock file keeps being replaced ({lock_path(name)})")
    except BaseException as e:
        lock_files.release(name)
        if isinstance(e, OSError) and not isinstance(e, Error):
            raise _os_error(e, f"lock {lock_path(name)}") from e
        raise


def _segment_exists(name: str) -> bool:
    shm = _open_existing(name)
    if shm is None:
        return False
    shm.close_fd()
    return True


def _remove_orphan_lock_locked(name: str) -> bool:
    """REQUIRES: the flock of `name`. Remove its lock file if no segment exists and no other
    handle of this process uses it (another process's handles imply a segment)."""
    if lock_files.users(name) > 1 or _segment_exists(name):
        return False
    try:
        os.unlink(lock_path(name))
    except FileNotFoundError:
        return False
    return True


def open_segment(core: _core.Core, name: str, size: int | None, create: bool,
                 params: CreateParams, explicit: set[str], codec: int | None,
                 tier: TierSpec | None = None,
                 before_create: Callable[[CreateParams], None] | None = None,
                 engine: int | None = None) -> dict[str, Any]:
    """Create-or-attach `name` and attach `core` to it (race-free across processes); returns
    the segment's header fields (read_header), with "created": whether this call made it.
    On failure nothing is left behind that was not there before (no lock file without a
    segment).

    A new segment is persistent when `tier.path` is set: `before_create(params)` runs first,
    under the creation flock (it records the store on disk, so a finished persistent segment
    always has its record), then the tier is written into the header before init_done."""
    check_name(name)
    lockfd = _flock_current(name)
    attached = False
    created = False
    try:
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
                    _check_compatible(name, hdr, want, size, codec, tier, engine)
                except BaseException:
                    shm.close_fd()
                    raise
                seg_size = hdr["size"]
            else:
                if not create:
                    raise StoreNotFound(f"no store named {name!r} (looked for {SHM_DIR}/{_PREFIX}{name})")
                tier = tier or TierSpec()
                if tier.path is None and tier.durability is not None:
                    raise InvalidArgument(
                        f"durability={DURABILITY_NAMES[tier.durability]!r} needs a path: a "
                        f"memory-only store keeps nothing across a restart"
                    )
                tier_path = os.fsencode(tier.path) if tier.path is not None else b""
                if len(tier_path) > _core.TIER_PATH_MAX:
                    raise InvalidArgument(
                        f"path {tier.path!r} is {len(tier_path)} bytes: the segment records at "
                        f"most {_core.TIER_PATH_MAX}"
                    )
                tier_code = TIER_NONE
                if tier.path is not None:
                    tier_code = tier.durability or DURABILITY_CODES["fsync"]
                    if before_create is not None:
                        before_create(params)
                seg_size = params.size
                free = _free_shm_bytes()
                if free is not None and seg_size > free:
                    raise StoreFull(
                        f"cannot create store {name!r} of {format_size(seg_size)}: {SHM_DIR} has "
                        f"{format_size(free)} free (Docker: raise --shm-size)"
                    )
                try:
                    shm = posix_ipc.SharedMemory(shm_name(name), posix_ipc.O_CREX, mode=0o600, size=seg_size)
                except (OSError, posix_ipc.Error) as e:
                    raise _os_error(e, f"create the shared-memory segment {shm_name(name)} in {SHM_DIR}") from e
                created = True
                try:
                    _core.create_segment(shm.fd, seg_size, params.max_key, params.max_item,
                                         params.growth, params.lock_stripes, params.codec,
                                         params.codec_arg, tier_code,
                                         tier.interval_ms or DEFAULT_INTERVAL_MS, tier_path,
                                         params.engine)
                except BaseException:
                    shm.close_fd()
                    shm.unlink()
                    raise
                hdr = _core.read_header(shm.fd)
            try:
                core._attach(name, shm.fd, seg_size, lockfd)
                attached = True
            except BaseException:
                if created:  # nobody else can have attached: we still hold the flock
                    shm.unlink()
                raise
            finally:
                shm.close_fd()  # the mapping keeps the object alive
        finally:
            if not attached:
                _remove_orphan_lock_locked(name)
            fcntl.flock(lockfd, fcntl.LOCK_UN)
    finally:
        if not attached:
            lock_files.release(name)
    return {**hdr, "created": created}


def discard_new(core: _core.Core, name: str) -> None:
    """Close `core` and remove the segment it has just created (an attach failing after
    creation, e.g. at its disk tier), unless another process attached meanwhile."""
    lockfd = _flock_current(name)
    try:
        others = [p for p in core._raw_stats()["processes"] if p != os.getpid()]
        _core.Core.close(core)
        lock_files.release(name)  # core's share; the flock's share is released below
        if not others:
            try:
                posix_ipc.unlink_shared_memory(shm_name(name))
            except posix_ipc.ExistentialError:
                pass
            _remove_orphan_lock_locked(name)
        fcntl.flock(lockfd, fcntl.LOCK_UN)
    finally:
        lock_files.release(name)


def unlink(name: str) -> None:
    """Remove store `name`. Processes still attached keep their mapping until they close."""
    check_name(name)
    if not _segment_exists(name) and not os.path.exists(lock_path(name)):
        raise StoreNotFound(f"no store named {name!r}")
    lockfd = _flock_current(name)
    try:
        try:
            posix_ipc.unlink_shared_memory(shm_name(name))
        except posix_ipc.ExistentialError:
            # Only a lock file (left by a failed attach of an older shmkv): remove it too.
            _remove_orphan_lock_locked(name)
            raise StoreNotFound(f"no store named {name!r}") from None
        try:
            os.unlink(lock_path(name))
        except FileNotFoundError:
            pass
        fcntl.flock(lockfd, fcntl.LOCK_UN)
    finally:
        lock_files.release(name)


def stale_lock_names() -> list[str]:
    """Names whose lock file exists without a segment (left by a failed attach of an older
    shmkv), sorted."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    head = "." + _PREFIX
    names = (e[len(head):-len(_LOCK_SUFFIX)] for e in entries
             if e.startswith(head) and e.endswith(_LOCK_SUFFIX))
    return sorted(n for n in names if _NAME.fullmatch(n) and not _segment_exists(n))


def remove_stale_lock(name: str) -> bool:
    """Remove `name`'s lock file if it has no segment; True if removed."""
    check_name(name)
    if not os.path.exists(lock_path(name)):
        return False
    lockfd = _flock_current(name)
    try:
        removed = _remove_orphan_lock_locked(name)
        fcntl.flock(lockfd, fcntl.LOCK_UN)
        return removed
    finally:
        lock_files.release(name)


def list_stores() -> list[str]:
    """Names of the stores on this host, sorted."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(e[len(_PREFIX):] for e in entries if e.startswith(_PREFIX) and _NAME.fullmatch(e[len(_PREFIX):]))


def describe_tier(hdr: dict[str, Any]) -> dict[str, Any]:
    """Header fields for people and JSON: the disk tier as "path" (str, None = memory only)
    and "durability" (its name) instead of the raw codes and bytes."""
    out = {k: v for k, v in hdr.items() if k not in ("tier", "tier_path", "tier_interval_ms")}
    raw = hdr.get("tier_path")
    out["path"] = os.fsdecode(raw) if raw else None
    out["durability"] = DURABILITY_NAMES.get(hdr.get("tier", TIER_NONE))
    if hdr.get("tier") == DURABILITY_CODES["interval"]:
        out["interval_ms"] = hdr["tier_interval_ms"]
    return out


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
        return {"name": name, "initialized": True, **describe_tier(hdr)}
    finally:
        shm.close_fd()
