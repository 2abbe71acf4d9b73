# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The Python boundary of the shared-memory core (ext/core/*.c).

Argument conversion (keys: bytes or str as UTF-8; values: any contiguous buffer), error
mapping to shmkv.errors, and the mapping of the segment. Every hot path is one C call with
the GIL held: a short critical section costs less than releasing and re-taking the GIL, and
the C code releases it by itself around any wait for a contended lock.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_XDECREF
from libc.errno cimport errno
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, strerror
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_RawFree
from posix.types cimport off_t

from includes.core cimport *
from includes.posix cimport (
    EDEADLK, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap, posix_fallocate,
)

from functools import partial
from os import getpid as _getpid
from numbers import Real as _Real

from shmkv import errors as _errors


cdef extern from "Python.h":
    # NULL with an exception set (UnicodeEncodeError for a lone surrogate): _str_key_error
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size)
    bint PyUnicode_CheckExact(object o)
    void PyErr_Clear()

cdef extern from "Python.h":
    PyObject **PySequence_Fast_ITEMS(object o)
    dict _PyDict_NewPresized(Py_ssize_t n)

cdef extern from *:
    void __builtin_prefetch(const void *p)

ITEM_HEADER_BYTES = SHMKV_ITEM_HDR
TIER_PATH_MAX = SHMKV_TIER_PATH_MAX
LAYOUT_VERSION = SHMKV_LAYOUT_VERSION
MAGIC = SHMKV_MAGIC

_STAT_NAMES = (
    "gets", "hits", "misses", "puts", "deletes", "evictions", "expired", "reclaimed",
    "automoves", "repairs", "lock_waits", "store_full",
)
# LK_* in ext/core/layout.h, in order
_LOCK_KINDS = ("stripe", "class", "page", "registry")


cdef dict _crash_points():
    cdef int n
    cdef const char *name
    out = {}
    for n in range(1, CP__END):
        name = shmkv_crash_point_name(n)
        if name != NULL:
            out[name.decode()] = n
    return out


# Tests only: the crash points of ext/core (SHMKV_CRASH_POINTS in core.h, where each is
# named once), name -> number, for Core._set_crash_point.
CRASH_POINTS = _crash_points()


cdef object _MISSING = object()


def _nothing():
    return None


cdef int _str_key_error(object key) except -1:
    """The str key has no UTF-8 form (a lone surrogate, e.g. from os.fsdecode of bad bytes)."""
    PyErr_Clear()
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _errors.InvalidArgument(
            f"key {key!r} has no UTF-8 encoding ({e.reason} at index {e.start}): pass bytes, "
            "or text without lone surrogates") from None
    raise _errors.InvalidArgument(f"key {key!r} has no UTF-8 encoding")


cdef int _not_bytes_like(object value, str what, bint pickle_hint) except -1:
    """Raises the one "must be bytes-like" error (worded in shmkv.errors.not_bytes_like)."""
    raise _errors.not_bytes_like(value, what, pickle_hint) from None


cdef inline bytes _as_bytes(object value, str what, bint pickle_hint=False):
    if PyBytes_CheckExact(value):
        return <bytes>value
    if not isinstance(value, str):
        try:
            return bytes(memoryview(value))
        except TypeError:
            pass
    _not_bytes_like(value, what, pickle_hint)


cdef int _counter_error(int rc) except -1:
    """Raises the error of a counter rule code (shmkv_counter_add); 0 for SHMKV_OK."""
    if rc == SHMKV_ENOTNUM:
        raise _errors.NotACounter("incr: the stored value is not a decimal integer")
    if rc == SHMKV_EOVERFLOW:
        raise _errors.NotACounter("incr: the result does not fit a signed 64-bit integer")
    return 0


def next_counter(bytes raw, int64_t delta):
    """The counter after `raw` (the stored bytes, None: absent, counts as 0) plus `delta`, as
    stored (ASCII decimal): incr's rule, shmkv_counter_add in ext/core/table.c. The disk tier's
    incr (shmkv/tiered.py) uses it, so both tiers count alike.

    :raises NotACounter: `raw` is not a decimal integer, or the result does not fit int64."""
    cdef int64_t out = 0
    cdef const char *p = NULL
    cdef Py_ssize_t n = 0
    if raw is not None:
        p = PyBytes_AS_STRING(raw)
        n = PyBytes_GET_SIZE(raw)
    _counter_error(shmkv_counter_add(p, n, delta, &out))
    return str(out).encode()


cdef inline int _key(object key, const char **p, Py_ssize_t *n) except -1:
    if PyBytes_CheckExact(key):
        p[0] = PyBytes_AS_STRING(key)
        n[0] = PyBytes_GET_SIZE(key)
        return 0
    if PyUnicode_CheckExact(key) or isinstance(key, str):
        p[0] = PyUnicode_AsUTF8AndSize(key, n)
        if p[0] == NULL:
            _str_key_error(key)
        return 0
    if isinstance(key, bytes):
        p[0] = PyBytes_AS_STRING(key)
        n[0] = PyBytes_GET_SIZE(key)
        return 0
    raise _errors.InvalidType(f"key must be bytes or str, not {type(key).__name__}")


# The longest TTL: 100 years. Both tiers store an absolute uint64 of ms; an unbounded double
# (1e17 s, inf) overflowed that conversion and the item expired at once. Rejected rather than
# clamped: a TTL of centuries is a unit mistake (ms for s) more often than a wish, and None
# already means "never expires".
MAX_TTL = 100 * 365 * 86400
cdef double _MAX_TTL = MAX_TTL


cdef inline uint64_t _expiry(object ttl) except? 0:
    cdef double t
    if ttl is None:
        return 0
    if type(ttl) is float:  # the common cases first, without an ABC check
        t = ttl
    elif type(ttl) is int:
        t = ttl if ttl <= MAX_TTL else 2 * _MAX_TTL  # (an int past 1e308 has no double)
    # bool is an int and str converts with float(): both are mistakes, not durations
    elif isinstance(ttl, (bool, str, bytes)) or not isinstance(ttl, _Real):
        raise _errors.InvalidType(f"ttl must be a number of seconds or None, not {type(ttl).__name__}")
    else:
        try:
            t = float(ttl)
        except OverflowError:
            t = 2 * _MAX_TTL
    if not t > 0:  # NaN too
        raise _errors.InvalidArgument(f"ttl must be > 0 seconds (or None for no expiry), got {ttl!r}")
    if t > _MAX_TTL:  # inf too
        raise _errors.InvalidArgument(
            f"ttl must be at most {MAX_TTL} seconds (100 years), got {ttl!r}: use None for no expiry")
    return shmkv_now_ms() + <uint64_t>(t * 1000.0 + 0.999)


def create_segment(int fd, uint64_t size, uint32_t max_key, uint32_t max_item,
                   double growth, uint32_t nstripes, uint32_t codec, uint32_t codec_arg,
                   uint32_t tier=0, uint32_t tier_interval_ms=0, bytes tier_path=b"",
                   uint32_t engine=0):
    """Reserve `size` bytes of the shared-memory object behind `fd` and lay out an empty
    store in it. Reserving up front (posix_fallocate) turns a too-small /dev/shm into an
    error here, instead of a SIGBUS in some worker when it first touches a page.
    `tier` (TIER_*, 0 = memory only) and `tier_path` (absolute) record the disk tier;
    `engine` is ENGINE_HASH (0) or ENGINE_BTREE (1), fixed here."""
    cdef create_params_t p
    cdef char err[512]
    cdef int rc
    if len(tier_path) > SHMKV_TIER_PATH_MAX:
        raise _errors.InvalidArgument(
            f"disk tier path of {len(tier_path)} bytes: at most {SHMKV_TIER_PATH_MAX}")
    p.tier = tier
    p.tier_interval_ms = tier_interval_ms
    p.tier_path_len = <uint32_t>len(tier_path)
    p.tier_path = tier_path
    p.size = size
    p.max_key = max_key
    p.max_item = max_item
    p.growth_x1000 = <uint32_t>(growth * 1000 + 0.5)
    p.nstripes = nstripes
    p.codec = codec
    p.codec_arg = codec_arg
    p.engine = engine
    with nogil:
        rc = posix_fallocate(fd, 0, <off_t>size)
    if rc != 0:
        raise _errors.StoreFull(
            f"cannot reserve {size} bytes of shared memory: {strerror(rc).decode()} "
            "(is /dev/shm large enough? Docker's default is 64 MiB: --shm-size)")
    cdef void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if base == MAP_FAILED:
        raise OSError(errno, f"mmap of {size} bytes failed: {strerror(errno).decode()}")
    try:
        if shmkv_init_segment(<char *>base, &p, err, sizeof(err)) != 0:
            raise _errors.InvalidArgument(err.decode())
    finally:
        munmap(base, size)


def read_header(int fd):
    """The creation parameters recorded in a segment's header (mapping its first page)."""
    cdef void *base = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0)
    if base == MAP_FAILED:
        raise OSError(errno, f"mmap failed: {strerror(errno).decode()}")
    cdef header_t *h = <header_t *>base
    try:
        return {
            "magic": h.magic,
            "init_done": h.init_done == SHMKV_MAGIC,
            "layout_version": h.layout_version,
            "size": h.total_size,
            "max_key": h.max_key,
            "max_item": h.max_item,
            "growth": h.growth_x1000 / 1000.0,
            "codec": h.codec,
            "codec_arg": h.codec_arg,
            "tier": h.tier,
            "tier_interval_ms": h.tier_interval_ms,
            "engine": h.engine,
            "tier_path": (h.tier_path[:min(h.tier_path_len, <uint32_t>SHMKV_TIER_PATH_MAX)]
                          if h.tier_path_len else None),
        }
    finally:
        munmap(base, 4096)


cdef class _TreeScan


cdef class Core:
    """One process's handle on a store: maps the segment and holds a process slot.

    Fields are per process, never shared. (They are declared here rather than in a .pxd:
    the module is shmkv._core while its source lives in ext/, and nothing cimports it.)
    """
    cdef store_t st
    cdef char *_base
    cdef uint64_t _mapsize
    cdef int _busy        # operations under way in this process (a wait releases the GIL)
    # A scan buffer no _TreeScan is using (NULL: none): the next scan takes it, so a scan
    # neither mallocs nor page-faults a fresh buffer (the GIL guards the hand-over).
    cdef char *_scan_spare
    cdef size_t _scan_spare_cap
    cdef readonly object name
    cdef readonly int max_key
    cdef readonly int max_item
    cdef readonly int codec_id
    # Why this handle is unusable though never closed (a forked child found no free slot),
    # or None: _check raises it instead of "closed".
    cdef object _dead_reason
    # The disk tier (a shmkv.lsm.LSM) under this memory tier, or None: memory only. Every
    # write goes through to it under the key's stripe lock; a memory miss reads through it.
    cdef public object _tier
    # What add, incr and cas do on the disk tier (the module shmkv.tiered), wired in by the
    # façade with _tier (shmkv/store.py): this boundary imports nothing of the disk tier.
    cdef public object _tiering

    def _attach(self, name, int fd, uint64_t size, int lockfd):
        cdef void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if base == MAP_FAILED:
            raise OSError(errno, f"mmap of {size} bytes failed: {strerror(errno).decode()}")
        self._base = <char *>base
        self._mapsize = size
        self.name = name
        shmkv_open(&self.st, self._base, size, lockfd)
        self.max_key = self.st.hdr.max_key
        self.max_item = self.st.hdr.max_item
        self.codec_id = self.st.hdr.codec
        rc = shmkv_register(&self.st)
        if rc != 0:
            munmap(base, size)
            self._base = NULL
            if rc == SHMKV_EFULL:
                raise _errors.StoreFull(f"store {name!r}: all {SHMKV_MAX_SLOTS} process slots are taken")
            raise OSError(self.st.last_errno, f"store {name!r}: registering this process failed")

    def _after_fork(self):
        """In a forked child: the parent's slot is the parent's; take one of our own."""
        if self._base == NULL:
            return
        self.st.slot = SHMKV_MAX_SLOTS
        self._busy = 0
        rc = shmkv_register(&self.st)
        if rc != 0:
            munmap(self._base, self._mapsize)
            self._base = NULL
            if rc == SHMKV_EFULL:
                self._dead_reason = (
                    f"store {self.name!r}: this forked child (pid {_getpid()}) got no process "
                    f"slot: all {SHMKV_MAX_SLOTS} are taken by live processes; close handles "
                    "or attach from fewer processes")
            else:
                self._dead_reason = (
                    f"store {self.name!r}: this forked child (pid {_getpid()}) could not "
                    f"register (code {rc}, errno {self.st.last_errno})")

    cdef int _check(self) except -1:
        if self._base == NULL:
            if self._dead_reason is not None:
                raise _errors.StoreFull(self._dead_reason)
            raise _errors.StoreClosed(f"store {self.name!r} is closed")
        return 0

    def __reduce__(self):
        # A handle is a mapping and a process slot of this process: it cannot travel.
        raise _errors.InvalidType(
            f"a shmkv store handle cannot be pickled (store {self.name!r}): pass the store "
            "name and call shmkv.attach() in the other process (forked children inherit "
            "handles and re-register by themselves)")

    cdef int _fail(self, int rc, Py_ssize_t klen, Py_ssize_t vlen) except -1:
        if rc == SHMKV_EKEYLEN:
            raise _errors.KeyTooLarge(
                f"key of {klen} bytes: keys must be 1 to {self.max_key} bytes (store {self.name!r})")
        if rc == SHMKV_EVALLEN:
            raise _errors.ValueTooLarge(
                f"value of {vlen} bytes with a {klen}-byte key does not fit the in-memory item "
                f"limit of {self.max_item} bytes ({SHMKV_ITEM_HDR}-byte header + key + value) "
                f"of store {self.name!r}")
        if rc == SHMKV_EFULL:
            raise _errors.StoreFull(
                f"store {self.name!r}: no memory for a {klen + vlen}-byte item (every candidate "
                "for eviction is busy, or the store is too small for this item size)")
        if rc == SHMKV_EIDXFULL:
            raise _errors.StoreFull(
                f"store {self.name!r}: the btree engine's node region is full ({self.st.hdr.nnodes - 1} "
                f"nodes reserved at creation + {self.st.hdr.tree_pages} slab pages taken since) and "
                "no slab page could be turned into nodes (none unassigned, and the emptiest page "
                "of the coldest class had a busy item): a new key needs a node; retry, delete "
                "keys or create a larger store (README \"Engines\")")
        if rc == SHMKV_ENOTNUM or rc == SHMKV_EOVERFLOW:
            return _counter_error(rc)
        if rc == SHMKV_EPYTHON:
            return -1
        if rc == SHMKV_ELOCK and self.st.last_errno == EDEADLK:
            raise _errors.Error(
                f"store {self.name!r}: re-entrant use from a thread that already holds this "
                "key's lock (a finalizer or disk-tier callback using the store)")
        raise OSError(self.st.last_errno, f"store {self.name!r}: lock operation failed (code {rc})")

    # -- the disk tier -------------------------------------------------------------------

    cdef object _through(self, const char *k, Py_ssize_t kn, int write, object fn):
        """shmkv_through (ext/core/table.c): fn runs under the key's stripe lock."""
        cdef int err = 0
        self._busy += 1
        cdef PyObject *r = shmkv_through(&self.st, k, kn, write, fn, &err)
        self._busy -= 1
        if r == NULL:
            self._fail(err, kn, 0)  # fn's exception (EPYTHON) propagates from here
        res = <object>r
        Py_DECREF(res)
        return res

    cdef int _commit_tier(self, object ticket) except -1:
        """Wait until a write through the disk tier is durable. REQUIRES: no stripe lock held.

        Invariants of a write through (the stripe lock covers the first three steps):
        the key leaves memory; the record is appended to the WAL (now in the OS page cache:
        it survives the death of any process) and applied to the memtable; memory gets the new
        value; the lock is released; then the fsync (group commit: LSM.commit). So the order
        of writes to a key is the WAL's order (both under the stripe lock), a put returns only
        once durable, and no lock other writers need is held across the fsync. A write is
        visible from its append on, before it is acknowledged; only a host crash can lose it
        then, and that loses memory too, so memory never holds what disk contradicts.
        Rejected: the fsync under the stripe lock (as before): one paused or slow writer
        stopped every process that reached its stripe, for as long as it was paused."""
        if ticket is not None:
            self._tier.commit(ticket)
        return 0

    cdef object _read_through(self, const char *k, Py_ssize_t kn):
        """The value from disk (promoted into memory when it fits), or _MISSING."""
        res = self._through(k, kn, 0, partial(self._tier.get_entry, k[:kn]))
        if res is None:
            return _MISSING
        if type(res) is tuple:
            return res[0]
        return res

    # -- reads ---------------------------------------------------------------------------

    cdef inline object _lookup(self, object key):
        """The value of `key` (memory, then the disk tier), or _MISSING."""
        cdef const char *k
        cdef Py_ssize_t kn
        cdef int err = 0
        if self._base == NULL:
            self._check()
        _key(key, &k, &kn)
        self._busy += 1
        cdef PyObject *r = shmkv_get(&self.st, k, kn, &err)
        self._busy -= 1
        if r == NULL:
            if err != SHMKV_ENOTFOUND:
                self._fail(err, kn, 0)
            if kn == 0 or kn > self.max_key:
                self._fail(SHMKV_EKEYLEN, kn, 0)
            if self._tier is not None:
                return self._read_through(k, kn)
            return _MISSING
        res = <object>r
        Py_DECREF(res)
        return res

    def get(self, key, default=None):
        """Return the value stored under `key` (bytes), or `default` when absent/expired."""
        res = self._lookup(key)
        return default if res is _MISSING else res

    def __getitem__(self, key):
        res = self._lookup(key)
        if res is _MISSING:
            raise KeyError(key)
        return res

    def __contains__(self, key):
        cdef const char *k
        cdef Py_ssize_t kn
        self._check()
        _key(key, &k, &kn)
        self._busy += 1
        rc = shmkv_contains(&self.st, k, kn)
        self._busy -= 1
        if rc < 0:
            self._fail(rc, kn, 0)
        if rc == 0 and (kn == 0 or kn > self.max_key):
            self._fail(SHMKV_EKEYLEN, kn, 0)
        if rc == 0 and self._tier is not None:
            return self._read_through(k, kn) is not _MISSING
        return rc == 1

    def get_many(self, keys):
        """Return {key: value} for the keys that are present. The batch is looked up in C
        with its memory accesses overlapped (shmkv_prefetch_* in table.c)."""
        cdef const char *k
        cdef Py_ssize_t kn, i, n
        cdef int err
        cdef PyObject *r
        cdef uint64_t hashes[64]
        cdef const char *ptrs[64]
        cdef Py_ssize_t lens[64]
        cdef PyObject **items
        cdef dict out
        self._check()
        seq = keys if type(keys) is list or type(keys) is tuple else list(keys)
        n = len(seq)
        items = PySequence_Fast_ITEMS(seq)
        out = _PyDict_NewPresized(n)
        self._busy += 1
        try:
            for i in range(n):
                key = <object>items[i]
                if i % 64 == 0:
                    self._prefetch(seq, i, hashes, ptrs, lens)
                k = ptrs[i % 64]
                kn = lens[i % 64]
                err = 0
                r = shmkv_get_hashed(&self.st, k, kn, hashes[i % 64], &err)
                if r == NULL:
                    if err != SHMKV_ENOTFOUND:
                        self._fail(err, kn, 0)
                    if kn == 0 or kn > self.max_key:
                        self._fail(SHMKV_EKEYLEN, kn, 0)
                    if self._tier is not None:
                        v = self._read_through(k, kn)
                        if v is not _MISSING:
                            out[key] = v
                    continue
                v = <object>r
                Py_DECREF(v)
                out[key] = v
        finally:
            self._busy -= 1
        return out

    cdef int _prefetch(self, object seq, Py_ssize_t start, uint64_t *hashes,
                       const char **ptrs, Py_ssize_t *lens) except -1:
        """Keys seq[start:start+64] (a list or tuple): their bytes into ptrs/lens, their
        hashes into `hashes`, prefetching the key objects, buckets, then chunks."""
        cdef Py_ssize_t j, m = min(64, len(seq) - start)
        cdef PyObject **items = PySequence_Fast_ITEMS(seq)
        for j in range(m):  # the key objects themselves are scattered in the heap
            __builtin_prefetch(items[start + j])
        for j in range(m):
            _key(<object>items[start + j], &ptrs[j], &lens[j])
            hashes[j] = shmkv_prefetch_bucket(&self.st, ptrs[j], lens[j])
        for j in range(m):
            shmkv_prefetch_item(&self.st, hashes[j])
        return 0

    # -- writes --------------------------------------------------------------------------

    cdef inline int _put(self, object key, object value, uint64_t expire, int only_if_absent) except -2:
        cdef const char *k
        cdef Py_ssize_t kn
        cdef Py_buffer buf
        cdef int rc
        if self._base == NULL:
            self._check()
        _key(key, &k, &kn)
        if self._tier is not None:
            return self._put_through(k, kn, value, expire, only_if_absent)
        if PyBytes_CheckExact(value):
            self._busy += 1
            rc = shmkv_put(&self.st, k, kn, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value),
                           expire, only_if_absent)
            self._busy -= 1
            if rc < 0 and rc != SHMKV_EEXISTS:
                self._fail(rc, kn, PyBytes_GET_SIZE(value))
            return rc
        try:
            PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE)  # str has no buffer: TypeError
        except TypeError:
            _not_bytes_like(value, "value", True)
        try:
            self._busy += 1
            rc = shmkv_put(&self.st, k, kn, <const char *>buf.buf, buf.len, expire, only_if_absent)
            self._busy -= 1
            if rc < 0 and rc != SHMKV_EEXISTS:
                self._fail(rc, kn, buf.len)
        finally:
            PyBuffer_Release(&buf)
        return rc

    cdef int _put_through(self, const char *k, Py_ssize_t kn, object value, uint64_t expire,
                          int only_if_absent) except -2:
        value = _as_bytes(value, "value", True)
        kb = k[:kn]
        if only_if_absent:
            outcome = []
            self._through(k, kn, 0, partial(self._tiering.add, self._tier, kb, value, expire, outcome))
            if not outcome:
                return SHMKV_EEXISTS
            self._commit_tier(outcome[0])
            return 0
        self._tiering.check_value(value)
        res = self._through(k, kn, 1, partial(self._tier.fast_put, kb, value, expire))
        self._commit_tier(res[2])
        return 0

    cdef int _put_many_through(self, list keys, list values, uint64_t expire) except -1:
        """A batch to the disk tier: one WAL append and one fsync instead of one per key.
        Each key leaves memory before the batch is written and again after it (under its
        stripe lock), so a reader that promoted the old value meanwhile cannot leave it in
        memory; reads then fetch the new value from disk. (A process killed between the write
        and the second pass while another promoted the old value is the one window where
        memory can lag disk, until that item is evicted or rewritten.)"""
        cdef const char *k
        cdef Py_ssize_t kn, i
        bkeys = []
        for i in range(len(keys)):
            _key(keys[i], &k, &kn)
            bkeys.append(k[:kn])
            self._through(k, kn, 1, _nothing)
        self._tier.put_many([(bkeys[i], values[i], expire) for i in range(len(keys))])
        for i in range(len(keys)):
            _key(keys[i], &k, &kn)
            self._through(k, kn, 1, _nothing)
        return 0

    def put(self, key, value, ttl=None):
        """Store `value` (bytes-like) under `key`, replacing any previous value; `ttl` in
        seconds (None: until evicted or deleted)."""
        self._put(key, value, _expiry(ttl), 0)

    def __setitem__(self, key, value):
        self._put(key, value, 0, 0)

    def add(self, key, value, ttl=None):
        """Store only if `key` is absent (atomically across processes); True if stored."""
        return self._put(key, value, _expiry(ttl), 1) == 0

    def put_many(self, mapping, ttl=None):
        """Store every (key, value) of a mapping or an iterable of pairs. All keys and
        values are checked before the first is stored, so bad input stores nothing; then
        the batch is stored in C with its memory accesses overlapped."""
        cdef uint64_t expire = _expiry(ttl)
        cdef const char *k
        cdef Py_ssize_t kn, vn, i, n
        cdef uint64_t hashes[64]
        cdef const char *ptrs[64]
        cdef Py_ssize_t lens[64]
        cdef int rc
        self._check()
        try:
            pairs = list(mapping.items()) if hasattr(mapping, "items") else list(mapping)
        except TypeError:
            raise _errors.InvalidType(
                f"put_many takes a mapping or an iterable of (key, value) pairs, not "
                f"{type(mapping).__name__}") from None
        keys = []
        values = []
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise _errors.InvalidType(
                    f"put_many: each item must be a (key, value) pair, got {pair!r:.80}")
            key, value = pair
            _key(key, &k, &kn)
            if kn == 0 or kn > self.max_key:
                self._fail(SHMKV_EKEYLEN, kn, 0)
            if type(value) is not bytes:
                value = _as_bytes(value, f"value for key {key!r}", True)
            vn = PyBytes_GET_SIZE(value)
            if self._tier is None and vn + kn + SHMKV_ITEM_HDR > self.max_item:
                self._fail(SHMKV_EVALLEN, kn, vn)
            keys.append(key)
            values.append(value)
        n = len(keys)
        if self._tier is not None:
            self._put_many_through(keys, values, expire)
            return
        self._busy += 1
        try:
            for i in range(n):
                if i % 64 == 0:
                    self._prefetch(keys, i, hashes, ptrs, lens)
                k = ptrs[i % 64]
                kn = lens[i % 64]
                value = values[i]
                rc = shmkv_put_hashed(&self.st, k, kn, PyBytes_AS_STRING(value),
                                      PyBytes_GET_SIZE(value), expire, 0, hashes[i % 64])
                if rc < 0:
                    self._fail(rc, kn, PyBytes_GET_SIZE(value))
        finally:
            self._busy -= 1

    def incr(self, key, delta=1):
        """Add `delta` to the decimal counter under `key` (absent counts as 0), atomically
        across processes; returns the new value."""
        cdef const char *k
        cdef Py_ssize_t kn
        cdef int64_t out = 0
        self._check()
        if not isinstance(delta, int) or isinstance(delta, bool):
            raise _errors.InvalidType(f"delta must be an int, not {type(delta).__name__}")
        if not (-(1 << 63) <= delta < (1 << 63)):
            raise _errors.InvalidArgument("delta does not fit a signed 64-bit integer")
        _key(key, &k, &kn)
        if self._tier is not None:
            if kn == 0 or kn > self.max_key:
                self._fail(SHMKV_EKEYLEN, kn, 0)
            res = self._through(k, kn, 1, partial(self._tiering.incr, self._tier, k[:kn], delta))
            self._commit_tier(res[2])
            return int(res[0])
        self._busy += 1
        rc = shmkv_incr(&self.st, k, kn, delta, &out)
        self._busy -= 1
        if rc < 0:
            self._fail(rc, kn, 20)
        return out

    def cas(self, key, expected, new, ttl=None):
        """Store `new` under `key` only if its value is exactly `expected` (None: only if the
        key is absent), atomically across processes: compare and store happen under the key's
        stripe lock. True if stored; False on a mismatch (nothing changed). With a disk tier
        the comparison is against the tier (which holds every value, also those too big for
        memory) and the write to it happens in the same locked step, as put's does. A value
        is compared byte for byte, so retrying read -> change -> cas until True is a safe
        read-modify-write.

        :raises KeyTooLarge, ValueTooLarge, InvalidType: as put (nothing changed)."""
        cdef const char *k
        cdef Py_ssize_t kn
        cdef int rc
        self._check()
        _key(key, &k, &kn)
        nb = _as_bytes(new, "new")
        eb = None if expected is None else _as_bytes(expected, "expected")
        cdef uint64_t expire = _expiry(ttl)
        if self._tier is not None:
            if kn == 0 or kn > self.max_key:
                self._fail(SHMKV_EKEYLEN, kn, 0)
            self._tiering.check_value(nb)
            outcome = []
            self._through(k, kn, 1, partial(self._tiering.cas, self._tier, k[:kn], eb, nb, expire, outcome))
            return bool(outcome)
        self._busy += 1
        rc = shmkv_cas(&self.st, k, kn, PyBytes_AS_STRING(eb) if eb is not None else NULL,
                       PyBytes_GET_SIZE(eb) if eb is not None else 0, eb is None,
                       PyBytes_AS_STRING(nb), PyBytes_GET_SIZE(nb), expire)
        self._busy -= 1
        if rc < 0:
            self._fail(rc, kn, PyBytes_GET_SIZE(nb))
        return rc == 1

    def delete(self, key):
        """Remove `key`; True if it was present."""
        cdef const char *k
        cdef Py_ssize_t kn
        if self._base == NULL:
            self._check()
        _key(key, &k, &kn)
        if self._tier is not None:
            if kn == 0 or kn > self.max_key:
                self._fail(SHMKV_EKEYLEN, kn, 0)
            kb = k[:kn]
            existed = self._tier.get_entry(kb) is not None or shmkv_contains(&self.st, k, kn) == 1
            res = self._through(k, kn, 1, partial(self._tier.delete_uncommitted, kb))
            self._commit_tier(res[2])
            return existed
        self._busy += 1
        rc = shmkv_delete(&self.st, k, kn)
        self._busy -= 1
        if rc < 0:
            self._fail(rc, kn, 0)
        if rc == 0 and (kn == 0 or kn > self.max_key):
            self._fail(SHMKV_EKEYLEN, kn, 0)
        return rc == 1

    def __delitem__(self, key):
        if not self.delete(key):
            raise KeyError(key)

    def delete_many(self, keys):
        """Remove every key given; returns how many were present. Every key is checked
        before the first is deleted (as put_many does), so a bad key deletes nothing. With a
        disk tier the tombstones go to disk as one batch: one WAL append and one fsync."""
        cdef const char *k
        cdef Py_ssize_t kn
        self._check()
        if isinstance(keys, (bytes, str)):
            raise _errors.InvalidType("delete_many takes an iterable of keys, not a single key")
        try:
            seq = list(keys)
        except TypeError:
            raise _errors.InvalidType(
                f"delete_many takes an iterable of keys, not {type(keys).__name__}") from None
        if self._tier is not None:
            return self._delete_many_through(seq)
        for key in seq:
            _key(key, &k, &kn)
            if kn == 0 or kn > self.max_key:
                self._fail(SHMKV_EKEYLEN, kn, 0)
        n = 0
        for key in seq:
            n += self.delete(key)
        return n

    cdef Py_ssize_t _delete_many_through(self, list keys) except -1:
        """Tombstones for ``keys`` in one disk batch. The same two passes as
        _put_many_through, for the same reason: each key leaves memory (under its stripe
        lock) before the batch is written and again after, so a reader that promoted the old
        value in between cannot leave it in memory. Rejected: one _through per key around its
        own tombstone (the old code) -- it is ordered per key but costs an fsync per key."""
        cdef const char *k
        cdef Py_ssize_t kn, n = 0
        bkeys = []
        seen = set()
        for key in keys:
            _key(key, &k, &kn)
            if kn == 0 or kn > self.max_key:
                self._fail(SHMKV_EKEYLEN, kn, 0)
            kb = k[:kn]
            if kb not in seen:  # a key given twice is present once, as with one delete each
                seen.add(kb)
                bkeys.append(kb)
        if not bkeys:
            return 0
        for kb in bkeys:
            k = PyBytes_AS_STRING(kb)
            kn = PyBytes_GET_SIZE(kb)
            if self._tier.get_entry(kb) is not None or shmkv_contains(&self.st, k, kn) == 1:
                n += 1
            self._through(k, kn, 1, _nothing)
        self._tier.delete_many(bkeys)
        for kb in bkeys:
            self._through(PyBytes_AS_STRING(kb), PyBytes_GET_SIZE(kb), 1, _nothing)
        return n

    def clear(self):
        """Remove every item (stripe by stripe; concurrent writers may add new ones)."""
        self._check()
        self._busy += 1
        rc = shmkv_clear(&self.st)
        self._busy -= 1
        if rc < 0:
            self._fail(rc, 0, 0)

    # -- scans and introspection ---------------------------------------------------------

    def _scan(self, int with_values):
        cdef uint32_t s
        self._check()
        for s in range(self.st.hdr.nstripes):
            self._check()
            self._busy += 1
            try:
                chunk = shmkv_scan_stripe(&self.st, s, with_values)
            finally:
                self._busy -= 1
            yield from chunk

    def __len__(self):
        self._check()
        return shmkv_count(&self.st)

    @property
    def engine_id(self):
        """ENGINE_HASH (0) or ENGINE_BTREE (1): the segment's engine, fixed at creation."""
        self._check()
        return self.st.hdr.engine

    def _tree_scan(self, lo, bint lo_incl, hi, bint hi_incl, bint reverse, limit):
        """Engine "btree" only: an iterator of the live (key, stored value) pairs, in key
        order (reverse: descending), with lo <(=) key <(=) hi (bytes, or None: unbounded), at
        most `limit` (None: all) -- read in batches without a lock (btree.c, _TreeScan)."""
        self._check()
        if self.st.hdr.engine != ENGINE_BTREE:
            raise _errors.InvalidArgument(f"store {self.name!r} has engine 'hash': no ordered index")
        if (lo is not None and not PyBytes_CheckExact(lo)) or (hi is not None and not PyBytes_CheckExact(hi)):
            raise _errors.InvalidType("scan bounds must be bytes or None")
        cdef _TreeScan it = _TreeScan.__new__(_TreeScan)
        it.core = self
        it.lo = lo
        it.hi = hi
        it.lo_incl = lo_incl
        it.hi_incl = hi_incl
        it.reverse = reverse
        if limit is None or limit >= (1 << 62):  # (no store holds that many keys)
            it.limit = -1
            it.batch = SCAN_FIRST_BATCH
        else:
            it.limit = limit
            it.batch = <uint32_t>min(limit, SCAN_MAX_BATCH)
        return it

    def verify(self):
        """Check every structure, holding one lock at a time (a paused checker stalls only
        what needs that lock); returns problems found (and repaired), [] when clean.
        Leftovers of killed writers are reclaimed, not reported."""
        self._check()
        problems = []
        self._busy += 1
        rc = shmkv_verify(&self.st, problems)
        self._busy -= 1
        if rc < 0:
            self._fail(rc, 0, 0)
        return problems

    def _raw_stats(self):
        cdef header_t *h
        cdef int i, k
        cdef uint32_t c
        self._check()
        h = self.st.hdr
        totals = [h.retired[k] for k in range(len(_STAT_NAMES))]
        waits = [h.retired[ST_WAITS + k] for k in range(LK__COUNT)]
        longest = [h.retired[ST_WAIT_MAX_US + k] for k in range(LK__COUNT)]
        procs = []
        for i in range(SHMKV_MAX_SLOTS):
            if self.st.slots[i].pid:
                for k in range(len(_STAT_NAMES)):
                    totals[k] += self.st.slots[i].stats[k]
                for k in range(LK__COUNT):
                    waits[k] += self.st.slots[i].stats[ST_WAITS + k]
                    longest[k] = max(longest[k], self.st.slots[i].stats[ST_WAIT_MAX_US + k])
                if shmkv_slot_alive(&self.st, i):
                    procs.append(self.st.slots[i].pid)
        out = dict(zip(_STAT_NAMES, totals))
        # Acquisitions that had to block (the spin failed) and the longest block, per kind
        # of lock: a holder that is paused (SIGSTOP, a debugger, a descheduled vCPU) shows here.
        out["lock_wait"] = {
            kind: {"waits": waits[k], "longest_ms": longest[k] / 1000.0}
            for k, kind in enumerate(_LOCK_KINDS)
        }
        classes = []
        pages_used = 0
        for c in range(h.nclasses):
            cl = &self.st.classes[c]
            pages_used += cl.pages
            if cl.pages:
                classes.append({
                    "chunk_size": cl.size, "pages": cl.pages, "used": cl.used,
                    "free": cl.free_count, "evictions": cl.evictions,
                })
        if h.engine == ENGINE_BTREE:
            retries = h.retired[ST_SCAN_RETRIES]
            locked = h.retired[ST_SCAN_LOCKED]
            latched = h.retired[ST_TREE_LATCHED]
            wlocked = h.retired[ST_TREE_LOCKED]
            for i in range(SHMKV_MAX_SLOTS):
                if self.st.slots[i].pid:
                    retries += self.st.slots[i].stats[ST_SCAN_RETRIES]
                    locked += self.st.slots[i].stats[ST_SCAN_LOCKED]
                    latched += self.st.slots[i].stats[ST_TREE_LATCHED]
                    wlocked += self.st.slots[i].stats[ST_TREE_LOCKED]
            out["btree"] = {
                # scan batches that saw a writer and retried / that were read under the lock
                "scan_retries": retries, "scan_locked": locked,
                # index writes under a leaf latch alone / under the tree lock
                "writes_latched": latched, "writes_locked": wlocked,
                "keys": h.tree_keys, "height": h.tree_height,
                # the region's nodes + those of slab pages turned into nodes (node_pages)
                "nodes": h.nnodes - 1 + h.tree_pages * (h.page_size // 1024),
                "node_pages": h.tree_pages, "nodes_free": h.tree_nfree, "node_bytes": 1024,
                "rebuilds": h.tree_rebuilds,
            }
        out.update({
            "items": shmkv_count(&self.st),
            "segment_bytes": h.total_size,
            "page_size": h.page_size,
            "pages_total": h.npages,
            "pages_used": pages_used,
            "buckets": h.nbuckets,
            "lock_stripes": h.nstripes,
            "max_key": h.max_key,
            "max_item": h.max_item,
            "growth_factor": h.growth_x1000 / 1000.0,
            "layout_version": h.layout_version,
            "created_ms": h.created_ms,
            "engine": "btree" if h.engine == ENGINE_BTREE else "hash",
            "processes": procs,
            "classes": classes,
        })
        return out

    def close(self):
        """Unmap the segment and give up this process's slot. Idempotent."""
        if self._base == NULL:
            return
        if self._busy:
            raise _errors.Error(f"store {self.name!r}: close() while another thread is using it")
        shmkv_free_kept(&self.st)
        shmkv_unregister(&self.st)
        munmap(self._base, self._mapsize)
        self._base = NULL

    def _set_crash_point(self, point, int sig=9):
        """Tests only: SIGKILL this process when it reaches crash point `point`, a name of
        CRASH_POINTS ("PUT_PUBLISHED": SHMKV_CRASH_POINTS in ext/core/core.h); None turns it
        off. With sig=signal.SIGSTOP it stops there once instead."""
        if point is None:
            self.st.crash_at = 0
            return
        if point not in CRASH_POINTS:
            raise _errors.InvalidArgument(
                f"no crash point {point!r}: one of {', '.join(sorted(CRASH_POINTS))}")
        self.st.crash_at = CRASH_POINTS[point]
        self.st.crash_sig = sig

    def _locks_held_by(self, int tid):
        """Tests only: how many of the segment's locks thread `tid` (a process's pid, for its
        main thread) holds at this instant, read from the mutex words without locking."""
        self._check()
        return shmkv_locks_held_by(&self.st, tid)

    def _stripe_of(self, key):
        """Tests only: the lock stripe that guards `key`."""
        cdef const char *k
        cdef Py_ssize_t kl
        self._check()
        _key(key, &k, &kl)
        return shmkv_stripe_of(&self.st, shmkv_hash(k, kl, self.st.hdr.seed))

    @property
    def closed(self):
        return self._base == NULL

    def __dealloc__(self):
        PyMem_RawFree(self._scan_spare)
        self._scan_spare = NULL
        if self._base != NULL:
            shmkv_free_kept(&self.st)
            shmkv_unregister(&self.st)
            munmap(self._base, self._mapsize)
            self._base = NULL


# -- ordered scans (engine "btree") ------------------------------------------------------

cdef extern from *:
    """
    /* The (key, value) tuple a scan returns, refilled in place when nobody else holds it.
     * `slot` is one of the iterator's cached results: when its tuple's only reference is
     * the cache's (the consumer dropped it), the tuple is reused, and so is each of its
     * bytes objects that the tuple alone holds and that has the right length: the pair's
     * bytes are copied into it and its cached hash reset. Otherwise new objects, and the
     * slot caches the new tuple. Nobody can observe an object whose only reference is
     * ours, so this is invisible to Python code; CPython's dict.items() iterator and zip()
     * reuse their result tuple the same way (bytes are never resized, only rewritten at the
     * same size). A bytes object of size 0 or 1 is one of CPython's shared singletons and is
     * never rewritten. Rejected: reusing the last result only -- `for x in scan` still holds
     * it when the next one is made (the loop variable), so two are cached, and the one made
     * two steps back is free. Free-threaded builds: reference counts are not exact there,
     * so always new objects. */
    static inline int shmkv_bytes_refill(PyObject **item, const char *p, Py_ssize_t n) {
        PyObject *o = *item;
    #ifndef Py_GIL_DISABLED
        if (n > 1 && Py_REFCNT(o) == 1 && PyBytes_GET_SIZE(o) == n) {
            memcpy(PyBytes_AS_STRING(o), p, (size_t)n);
    #if defined(__GNUC__)
    #pragma GCC diagnostic push
    #pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    #endif
            ((PyBytesObject *)o)->ob_shash = -1;
    #if defined(__GNUC__)
    #pragma GCC diagnostic pop
    #endif
            return 0;
        }
    #endif
        PyObject *b = PyBytes_FromStringAndSize(p, n);
        if (!b) return -1;
        *item = b;
        Py_DECREF(o);
        return 0;
    }
    static PyObject *shmkv_scan_pair(PyObject **slot, const char *k, Py_ssize_t kl,
                                     const char *v, Py_ssize_t vl) {
        PyObject *t = *slot;
    #ifndef Py_GIL_DISABLED
        if (t && Py_REFCNT(t) == 1) {
            PyTupleObject *tt = (PyTupleObject *)t;
            if (shmkv_bytes_refill(&tt->ob_item[0], k, kl) < 0 ||
                shmkv_bytes_refill(&tt->ob_item[1], v, vl) < 0)
                return NULL;
            Py_INCREF(t);
            return t;
        }
    #endif
        PyObject *ko = PyBytes_FromStringAndSize(k, kl);
        if (!ko) return NULL;
        PyObject *vo = PyBytes_FromStringAndSize(v, vl);
        if (!vo) {
            Py_DECREF(ko);
            return NULL;
        }
        PyObject *n = PyTuple_New(2);
        if (!n) {
            Py_DECREF(ko);
            Py_DECREF(vo);
            return NULL;
        }
        PyTuple_SET_ITEM(n, 0, ko);
        PyTuple_SET_ITEM(n, 1, vo);
        /* Two bytes objects cannot be part of a reference cycle, so the collector need not
         * see the tuple: CPython untracks such tuples itself at their first collection
         * (_PyTuple_MaybeUntrack), after traversing them. A scan whose pairs are kept (a
         * list of 10,000) spent ~15 % of its time there. */
        PyObject_GC_UnTrack(n);
        Py_XDECREF(t);
        Py_INCREF(n);
        *slot = n;
        return n;
    }
    """
    object shmkv_scan_pair(PyObject **slot, const char *k, Py_ssize_t kl, const char *v, Py_ssize_t vl)

cdef uint32_t SCAN_FIRST_BATCH = 64   # pairs: a scan without a limit may be short ...
cdef uint32_t SCAN_MAX_BATCH = 1024   # ... a long one amortises each descent over this many
cdef size_t SCAN_SPARE_MAX = 1 << 20  # a bigger buffer (huge values) is freed, not kept


cdef class _TreeScan:
    """One ordered scan: a batch of pairs is copied out of the shared index in C, under one
    seqlock read (shmkv_tree_fill, btree.c), into this iterator's private buffer; __next__
    then makes the (key, value) objects one at a time from it, refilling in place the pair
    returned two steps back when the consumer has dropped it (shmkv_scan_pair), so a loop
    that keeps nothing allocates no object per pair, and no Python frame runs per pair. Each
    batch resumes
    strictly after the last key returned: a key live during the whole scan is returned
    exactly once, in order, whatever other processes write meanwhile."""
    cdef Core core
    cdef shmkv_scanbuf_t buf
    cdef size_t pos          # byte offset of the next pair in buf
    cdef uint32_t left       # pairs of buf not returned yet
    cdef object lo, hi       # bytes or None; moved past each batch's last key
    cdef bint lo_incl, hi_incl, reverse
    cdef int64_t limit       # pairs still allowed; -1: no limit
    cdef uint32_t batch      # pairs to ask for next
    cdef bint finished       # no batch follows
    cdef bint filling        # a refill is under way (a lock wait inside releases the GIL)
    cdef PyObject *made[2]   # the last two pairs returned (owned; NULL: none), refilled in
    cdef uint32_t turn       # place once the consumer dropped them (shmkv_scan_pair)

    def __iter__(self):
        return self

    def __next__(self):
        cdef uint32_t kl, vl
        cdef const char *p
        if self.left == 0 and not self._refill():
            raise StopIteration
        p = self.buf.buf + self.pos
        memcpy(&kl, p, 4)
        memcpy(&vl, p + 4, 4)
        self.pos += 8 + <size_t>kl + vl
        self.left -= 1
        self.turn ^= 1
        return shmkv_scan_pair(&self.made[self.turn], p + 8, kl, p + 8 + kl, vl)

    cdef bint _refill(self) except -1:
        cdef const char *l = NULL
        cdef const char *h = NULL
        cdef Py_ssize_t ln = 0, hn = 0
        cdef uint32_t n, kl
        cdef int rc
        if self.filling:  # as a generator says "already executing"
            raise _errors.Error("a scan iterator was advanced from two threads at once")
        if self.finished:
            self._release()
            return False
        if self.buf.count:  # resume strictly after the last key returned
            memcpy(&kl, self.buf.buf + self.buf.last, 4)
            last = PyBytes_FromStringAndSize(self.buf.buf + self.buf.last + 8, kl)
            if self.reverse:
                self.hi, self.hi_incl = last, False
            else:
                self.lo, self.lo_incl = last, False
        core = self.core
        core._check()
        if self.buf.buf == NULL and core._scan_spare != NULL:
            self.buf.buf, self.buf.cap = core._scan_spare, core._scan_spare_cap
            core._scan_spare, core._scan_spare_cap = NULL, 0
        if self.lo is not None:
            l = PyBytes_AS_STRING(self.lo)
            ln = PyBytes_GET_SIZE(self.lo)
        if self.hi is not None:
            h = PyBytes_AS_STRING(self.hi)
            hn = PyBytes_GET_SIZE(self.hi)
        n = self.batch
        if self.limit >= 0 and self.limit < n:
            n = <uint32_t>self.limit
        core._busy += 1
        self.filling = True
        rc = shmkv_tree_fill(&core.st, l, ln, self.lo_incl, h, hn, self.hi_incl, self.reverse, n, &self.buf)
        self.filling = False
        core._busy -= 1
        if rc != 0:  # a part batch is dropped: a retry resumes after the last key returned
            self.buf.count = 0
        if rc == SHMKV_ENOMEM:
            raise MemoryError("scan buffer")
        if rc == SHMKV_ELOCK:
            raise OSError(core.st.last_errno, f"store {core.name!r}: the tree lock failed")
        if rc == SHMKV_ECORRUPT:  # unreachable: the rebuild keeps a reserve of nodes (btree.c)
            raise _errors.Corruption(
                f"store {core.name!r}: the ordered index could not be rebuilt from the hash chains")
        self.pos = 0
        self.left = self.buf.count
        if self.limit >= 0:
            self.limit -= self.buf.count
        if self.buf.done or self.limit == 0 or self.buf.count == 0:
            self.finished = True
        elif self.buf.count < n:  # writers disturbed it (btree.c retries smaller), or the
            self.batch = min(2 * self.buf.count, SCAN_MAX_BATCH)  # byte budget: grow back slowly
        else:
            self.batch = min(4 * n, SCAN_MAX_BATCH)
        if self.buf.count == 0:
            self._release()
            return False
        return True

    cdef void _release(self):
        """Hands the buffer back to the handle (or frees it), and drops the cached pairs."""
        Py_XDECREF(self.made[0])
        Py_XDECREF(self.made[1])
        self.made[0] = self.made[1] = NULL
        if self.buf.buf == NULL:
            return
        if self.core is not None and self.core._scan_spare == NULL and self.buf.cap <= SCAN_SPARE_MAX:
            self.core._scan_spare, self.core._scan_spare_cap = self.buf.buf, self.buf.cap
        else:
            PyMem_RawFree(self.buf.buf)
        self.buf.buf = NULL
        self.buf.cap = 0
        self.buf.used = 0
        self.buf.count = 0

    def __dealloc__(self):
        self._release()
