# The write fast path of an LSM handle: Gen and Tail.
# Included into ext/_lsm.pyx (one module, shmkv.lsm._accel); its cimports and the
# constants of the stored layout are there.

# -- the write fast path of an LSM handle ------------------------------------------------------

cdef enum:
    WAL_HEADER_SIZE = 24  # format.WAL_HEADER.size (tests/lsm/test_accel.py checks they agree)


cdef class Gen:
    """One live WAL generation as a process sees it (version.py's ``_Gen``; C so that :class:`Tail`
    reads it without attribute lookups).

    Invariant: ``mem`` holds exactly the records of ``wal`` before ``offset``; ``sealed_to`` is
    set once the SEAL record has been applied, after which the generation never changes.
    """

    cdef public object wal
    cdef public Memtable mem
    cdef public long long offset
    cdef public object sealed_to
    cdef readonly int fd          # wal.fd: fixed while the generation is live
    cdef readonly uint64_t gen

    def __init__(self, wal, Memtable mem not None, long long offset=WAL_HEADER_SIZE, sealed_to=None):
        self.wal = wal
        self.mem = mem
        self.offset = offset
        self.sealed_to = sealed_to
        self.fd = wal.fd
        self.gen = wal.gen


cdef class Tail:
    """The state of an LSM handle that every put touches, and its fast path (db.py): while the
    handle's view is current (the change counter still equals ``seen``), there is one live
    the newest generation is not sealed and the backlog stays under ``limit``, :meth:`put_uncommitted`
    encodes the record, appends it under the WAL lock, applies it to the memtable and returns
    the commit ticket -- in one C call, under the handle's lock. Anything else (a view to catch
    up, a seal, maintenance to ask for, an error) goes to ``slow``: db.py's Python path, which does the
    same with every case handled. Same invariants as that path (``LSM._append``).
    """

    cdef object _acquire, _release
    cdef public SharedPage page
    cdef object _slow
    cdef public list gens          # LSM._gens: the live generations, oldest first
    cdef public long long seen     # LSM._seen: the counter at our last full look (-1: never)
    cdef public long long limit    # the fast path keeps the backlog (WAL bytes) below this
    cdef public bint fsync         # durability "fsync": return a ticket, pin the WAL
    cdef public bint dirty         # written since the last fsync ("interval")
    cdef public bint open
    cdef public long long puts     # puts this fast path took

    def __init__(self, lock, slow):
        self._acquire = lock.acquire
        self._release = lock.release
        self.page = None  # set once opened; the fast path needs it
        self._slow = slow
        self.gens = []
        self.seen = -1
        self.limit = 0
        self.fsync = False
        self.dirty = False
        self.open = True
        self.puts = 0

    def put_uncommitted(self, bytes key not None, bytes value not None, uint64_t expire):
        """LSM.put_uncommitted: ``(value, expire, ticket)``. REQUIRES: as LSM.put_checked."""
        cdef object r = None
        if self.open and PyList_GET_SIZE(self.gens) > 0:
            self._acquire()
            try:
                r = self._fast(key, value, expire)
            finally:
                self._release()
        if r is None:
            return self._slow(key, value, expire)
        return r

    cdef object _fast(self, bytes key, bytes value, uint64_t expire):
        cdef Gen g
        cdef bytes data
        cdef uint64_t after
        cdef Py_ssize_t i, n = PyList_GET_SIZE(self.gens)
        cdef long long backlog = 0
        if not self.open or n == 0:
            return None
        for i in range(n):  # sealed, unflushed generations count: their flush is pending
            backlog += (<Gen>self.gens[i]).offset - WAL_HEADER_SIZE
        g = <Gen>self.gens[n - 1]
        if g.sealed_to is not None or self.page is None or self.page._word == NULL:
            return None
        if <long long>shmkv_epoch_load(self.page._word) != self.seen:
            return None
        data = _encode_put(KIND_PUT, key, value, expire)
        if backlog + PyBytes_GET_SIZE(data) >= self.limit:
            return None  # maintenance may be due: the Python path decides
        try:
            after = self.page._append_if(g.fd, data, g.offset, <uint64_t>self.seen, g.gen)
        except OSError:
            return None  # nothing left behind (cut back); the Python path retries and reports
        if after == 0:
            return None  # the counter moved: catch up first
        g.mem.apply(KIND_PUT, key, value, expire)
        g.offset += PyBytes_GET_SIZE(data)
        if <long long>after == self.seen + 2:
            self.seen = after  # the only change since our last look was this append
        self.puts += 1
        if self.fsync:
            wal = g.wal
            wal.pins += 1  # closing it must wait for the commit (a reused fd: wrong file)
            return (value, expire, (wal, g.offset))
        self.dirty = True
        return (value, expire, None)


cdef class OpenLock:
    """``with handle._open:`` holds the handle lock of an open handle (diskcache's
    ``_transact``): open is checked before taking the lock -- after a fork the lock may be held
    by a thread that is gone -- and again holding it, as close() may have run while we waited.
    ``check_open`` raises the error (db.py ``LSM._check_open``); ``tail.open`` is the flag
    (False once the handle is closed or forked). In C because the get path takes it: a Python
    ``__enter__``/``__exit__`` pair cost gets of absent keys 7%."""

    cdef object _acquire, _release, _check
    cdef Tail _tail

    def __init__(self, lock, Tail tail not None, check_open):
        self._acquire = lock.acquire
        self._release = lock.release
        self._tail = tail
        self._check = check_open

    def __enter__(self):
        if not self._tail.open:
            self._check()
        self._acquire()
        if not self._tail.open:
            self._release()
            self._check()

    def __exit__(self, exc_type, exc, tb):
        self._release()  # returns None: exceptions propagate
