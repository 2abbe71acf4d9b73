# The shared page: change counter, WAL append lock, group commit.
# Included into ext/_lsm.pyx (one module, shmkv.lsm._accel); its cimports and the
# constants of the stored layout are there.

# -- the shared page: change counter and WAL append lock ---------------------------------------

cdef extern from "lsm/accel.h":
    ctypedef struct pthread_mutex_t:
        pass
    int shmkv_page_mutex_init(pthread_mutex_t *m) nogil
    int shmkv_page_trylock(pthread_mutex_t *m) nogil
    int shmkv_page_lock_blocking(pthread_mutex_t *m) nogil
    int pthread_mutex_unlock(pthread_mutex_t *m) nogil
    int EBUSY

cdef extern from *:
    """
    static inline void shmkv_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __asm__ __volatile__("pause");
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    """
    void shmkv_relax() nogil

cdef extern from "lsm/group_commit.h":
    ctypedef struct gc_words_t:
        uint64_t appended
        uint64_t syncing
        uint64_t synced
        uint32_t seq
        uint64_t sync_ns
    int gc_stop_countdown
    void gc_publish_appended(gc_words_t *w, uint64_t gen, uint64_t end) nogil
    void gc_forget(gc_words_t *w) nogil
    int gc_sync_to(gc_words_t *w, int fd, uint64_t gen, uint64_t end, int *synced_here) nogil
    uint64_t gc_load(const uint64_t *w) nogil
    uint64_t gc_gen(uint64_t pos) nogil
    uint64_t gc_off(uint64_t pos) nogil

PAGE_MAGIC = b"SHMKVPAG"
PAGE_VERSION = 1  # the group-commit words were added in zeroed space: old pages are valid


def stop_in_sync(int nth):
    """Test hook: the ``nth`` later group-commit leader of this process stops itself
    (SIGSTOP) after claiming its sync, before its fdatasync (0: off)."""
    global gc_stop_countdown
    gc_stop_countdown = nth


# Test hook (tests/lsm/workers.py): SIGKILL this process inside the n-th append() of more than
# 40 bytes: mode 1 after the first bump, before writing; 2 halfway through the bytes; 3 after
# the write, still holding the lock. 0 = off (the only cost is this branch).
cdef int _crash_countdown = 0
cdef int _crash_mode = 0


def crash_in_append(int nth, str mode):
    """Test hook: die (SIGKILL) inside the ``nth`` later append of more than 40 bytes, at
    ``mode`` "pre" (before writing), "torn" (half written) or "post" (written, lock held)."""
    global _crash_countdown, _crash_mode
    _crash_mode = {"pre": 1, "torn": 2, "post": 3}[mode]
    _crash_countdown = nth



cdef inline void _maybe_crash(int where, int fd, const char *p, Py_ssize_t n) noexcept nogil:
    global _crash_countdown
    if _crash_countdown == 0 or n <= 40 or _crash_mode != where:
        return
    _crash_countdown -= 1
    if _crash_countdown:
        return
    if where == 2:
        c_write(fd, p, n // 2)
    kill(getpid(), SIGKILL)


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read(36).ljust(36, b"?")
    except OSError:  # no procfs: never reinitialise for a reboot (a fresh file still inits)
        return b"?" * 36


cdef class SharedPage:
    """One page of ``path`` that every process of a store maps shared (layout in format.py):

    - a change counter. A writer bumps it before and after each WAL append or seal and after
      each manifest replacement. A reader loads it *before* looking at the files and remembers
      the value; while a later load gives the same value nothing has changed, so it skips its
      stat/fstat. The bump before an append means a writer killed mid-write has bumped: the
      torn tail it leaves is looked at by the next operation of every process. Only equality
      of values is used, so the counter is never fsynced and any value is valid after a reboot.
    - the WAL append lock: a robust process-shared mutex (a dead owner's lock passes to the
      next locker, counted in ``owner_deaths``, who bumps the counter: see _lock). Rejected: flock on the WAL, which costs two
      system calls per append (the uncontended mutex costs none).

    The page is (re)initialised, under flock of the file, when it is new or its stamp (boot id
    and inode) is not this boot's and this file's: after a reboot or a copy nobody can hold its
    lock, and a mutex state from another boot would otherwise block forever.
    """

    cdef char *_page
    cdef uint64_t *_word
    cdef pthread_mutex_t *_mutex
    cdef gc_words_t *_gc
    cdef readonly object path
    cdef public long long owner_deaths
    cdef int _held  # lock()s without their unlock() through this object

    def __init__(self, path):
        import fcntl, os, struct
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # only while opening: one initialiser at a time
            st = os.fstat(fd)
            if st.st_size < PAGE_SIZE:
                os.ftruncate(fd, PAGE_SIZE)
            p = mmap(NULL, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            if p == MAP_FAILED:
                raise OSError(errno, "mmap of the shared page failed", path)
            self._page = <char *>p
            self._word = <uint64_t *>(self._page + PAGE_COUNTER)
            self._mutex = <pthread_mutex_t *>(self._page + PAGE_MUTEX)
            self._gc = <gc_words_t *>(self._page + PAGE_GROUP)
            stamp = struct.pack("<I", PAGE_VERSION) + _boot_id() + struct.pack("<Q", st.st_ino)
            magic = PyBytes_FromStringAndSize(self._page, 8)
            if magic == PAGE_MAGIC:
                if PyBytes_FromStringAndSize(self._page + 8, 4) != stamp[:4]:
                    raise ValueError(f"{path}: shared page of another format version")
            elif magic != b"\0" * 8:
                raise ValueError(f"{path}: not a shmkv shared page")
            if magic != PAGE_MAGIC or PyBytes_FromStringAndSize(self._page + 8, 48) != stamp:
                memset(self._page, 0, PAGE_SIZE)
                rc = shmkv_page_mutex_init(self._mutex)
                if rc:
                    raise OSError(rc, "cannot initialise the WAL lock", path)
                memcpy(self._page + 8, PyBytes_AS_STRING(stamp), 48)
                memcpy(self._page, PyBytes_AS_STRING(PAGE_MAGIC), 8)  # last: page is ready
        except BaseException:
            self.close()
            raise
        finally:
            # Unlock explicitly: the mapping keeps the open file description (and so a flock
            # on it) alive after close.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self.owner_deaths = 0

    cpdef uint64_t load(self) except? 0:
        if self._word == NULL:
            raise ValueError("shared page closed")
        return shmkv_epoch_load(self._word)

    cpdef uint64_t bump(self) except? 0:
        if self._word == NULL:
            raise ValueError("shared page closed")
        return shmkv_epoch_bump(self._word)

    cdef int _lock(self) except -1:
        """Spin briefly on trylock, then block with the GIL released."""
        cdef int rc, i
        if self._mutex == NULL:
            raise ValueError("shared page closed")
        rc = shmkv_page_trylock(self._mutex)
        i = 0
        while rc == EBUSY and i < 200:
            shmkv_relax()
            rc = shmkv_page_trylock(self._mutex)
            i += 1
        if rc == EBUSY:
            with nogil:
                rc = shmkv_page_lock_blocking(self._mutex)
        if rc == 1:
            # The owner died inside its critical section, maybe half-way through a write whose
            # pre-bump a reader had already seen (its look found no new bytes yet). Bump now,
            # holding the lock: every process's view is stale from here, so nobody appends
            # on the fast path until someone has replayed (and cut the torn tail) under the lock.
            shmkv_epoch_bump(self._word)
            self.owner_deaths += 1
            rc = 0
        if rc:
            raise OSError(rc, "cannot take the WAL lock", self.path)
        self._held += 1
        return 0

    def lock(self):
        """Take the WAL append lock (see the class doc). A thread holding it gets OSError
        (EDEADLK) instead of deadlocking if it locks again."""
        self._lock()

    def unlock(self):
        if self._mutex == NULL:
            raise ValueError("shared page closed")
        cdef int rc = pthread_mutex_unlock(self._mutex)
        if rc:
            raise OSError(rc, "cannot release the WAL lock", self.path)
        self._held -= 1

    def append(self, int fd, bytes data not None, long long start, uint64_t seen, uint64_t gen=0):
        """The whole locked append, when nothing changed since ``seen``: lock; if the counter
        still equals ``seen``, append_locked() and unlock, returning the counter after. Returns
        0 (nothing written, lock released) when the counter moved: the caller must catch up."""
        return self._append_if(fd, data, start, seen, gen)

    cdef uint64_t _append_if(self, int fd, bytes data, long long start, uint64_t seen,
                             uint64_t gen) except? 0:
        self._lock()
        if shmkv_epoch_load(self._word) != seen:
            pthread_mutex_unlock(self._mutex)
            self._held -= 1
            return 0
        try:
            return self._append_locked(fd, data, start, gen)
        finally:
            pthread_mutex_unlock(self._mutex)
            self._held -= 1

    def append_locked(self, int fd, bytes data not None, long long start, uint64_t gen=0):
        """REQUIRES: the lock, and ``start`` is the end of ``fd``'s last whole record. Bump the
        counter, write ``data`` at the end of ``fd``, bump again; return the counter after.
        A failed write is cut back to ``start`` and raised as OSError (counter bumped).
        ``gen``: the WAL generation of ``fd``; its new end is published for group commit
        (``sync_to``). 0: not published."""
        if self._word == NULL:
            raise ValueError("shared page closed")
        return self._append_locked(fd, data, start, gen)

    def sync_to(self, int fd, uint64_t gen, uint64_t end):
        """Return once the record of WAL generation ``gen`` (open as ``fd``) ending at ``end``
        is durable: at once if another process's fdatasync already covered it, after waiting
        for one in flight (at most about twice an fdatasync), else by an fdatasync of our own,
        which then covers every process's records appended before it (group commit, see
        ext/lsm/group_commit.h). Holds no lock; the GIL is released. True if this call ran
        fdatasync. Raises OSError if the fdatasync failed."""
        cdef int rc, here = 0
        if self._gc == NULL:
            raise ValueError("shared page closed")
        with nogil:
            rc = gc_sync_to(self._gc, fd, gen, end, &here)
        if rc:
            raise OSError(rc, "cannot fsync the WAL")
        return here == 1

    def forget_durable(self):
        """REQUIRES: the WAL lock. A WAL was cut back below records it had published (a
        damaged log rewritten): forget every durable position (group_commit.h gc_forget)."""
        if self._gc == NULL:
            raise ValueError("shared page closed")
        gc_forget(self._gc)

    def group_state(self):
        """(appended, syncing, synced) as ((gen mod 2^20, offset), ...) and the recent
        fdatasync time in ns: for tests and debugging."""
        if self._gc == NULL:
            raise ValueError("shared page closed")
        out = []
        for v in (gc_load(&self._gc.appended), gc_load(&self._gc.syncing), gc_load(&self._gc.synced)):
            out.append((v >> 44, v & ((1 << 44) - 1)))
        return tuple(out), self._gc.sync_ns

    cdef uint64_t _append_locked(self, int fd, bytes data, long long start, uint64_t gen) except? 0:
        cdef const char *p = PyBytes_AS_STRING(data)
        cdef Py_ssize_t left = PyBytes_GET_SIZE(data), total = left
        cdef ssize_t n = 0
        cdef int err = 0
        cdef uint64_t after
        shmkv_epoch_bump(self._word)  # before the write: a writer killed in it has bumped
        with nogil:
            _maybe_crash(1, fd, p, left)
            _maybe_crash(2, fd, p, left)
            while left > 0:
                n = c_write(fd, p, left)
                if n < 0:
                    if errno == EINTR:
                        continue
                    err = errno
                    break
                if n == 0:
                    err = 28  # ENOSPC: write(2) made no progress
                    break
                p += n
                left -= n
            if err:
                ftruncate(fd, start)  # best effort; else the next locker cuts the torn tail
            else:
                if gen:
                    gc_publish_appended(self._gc, gen, start + total)
                _maybe_crash(3, fd, NULL, total)
        after = shmkv_epoch_bump(self._word)
        if err:
            raise OSError(err, "cannot append to the WAL")
        return after

    def close(self):
        """Unmap the page. A lock still held through this object is released first: glibc
        links every held robust mutex into the thread's list, and unmapping a held one would
        leave that list pointing at nothing (a later lock or thread exit would crash)."""
        while self._held > 0 and self._mutex != NULL:
            pthread_mutex_unlock(self._mutex)
            self._held -= 1
        if self._page != NULL:
            munmap(self._page, PAGE_SIZE)
            self._page = NULL
            self._word = NULL
            self._mutex = NULL
            self._gc = NULL

    def __dealloc__(self):
        self.close()
