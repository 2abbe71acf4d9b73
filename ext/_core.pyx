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
from cpython.ref cimport Py_DECREF
from libc.errno cimport errno
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport strerror
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.types cimport off_t

from includes.core cimport *

from functools import partial

from shmkv import errors as _errors
from shmkv.lsm.format import MAX_VALUE as _LSM_MAX_VALUE  # keys: max_key <= 65535 < its MAX_KEY


cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL
    bint PyUnicode_CheckExact(object o)

cdef extern from "Python.h":
    PyObject **PySequence_Fast_ITEMS(object o)
    dict _PyDict_NewPresized(Py_ssize_t n)

cdef extern from *:
    void __builtin_prefetch(const void *p)

cdef extern from "errno.h":
    enum: EDEADLK

cdef extern from "fcntl.h" nogil:
    int posix_fallocate(int fd, off_t offset, off_t length)

ITEM_HEADER_BYTES = SHMKV_ITEM_HDR
LAYOUT_VERSION = SHMKV_LAYOUT_VERSION
MAGIC = SHMKV_MAGIC

_STAT_NAMES = (
    "gets", "hits", "misses", "puts", "deletes", "evictions", "expired", "reclaimed",
    "automoves", "repairs", "lock_waits", "store_full",
)


cdef object _MISSING = object()


def _nothing():
    return None


def _tier_add(tier, bytes k, bytes v, unsigned long long expire, list outcome):
    entry = tier.get_entry(k)
    if entry is not None:
        return entry
    tier.put(k, v, expire)
    outcome.append(True)
    return (v, expire)


def _tier_incr(tier, bytes k, long long delta):
    entry = tier.get_entry(k)
    cur, expire = 0, 0
    if entry is not None:
        raw, expire = entry
        # the memory tier's rule (parse_i64 in table.c): optional sign, then 1-64 ASCII digits
        digits = raw[1:] if raw[:1] in (b"+", b"-") else raw
        if not (0 < len(raw) <= 64 and digits and all(48 <= c <= 57 for c in digits)):
            raise _errors.NotACounter("incr: the stored value is not a decimal integer")
        cur = int(raw)
    new = cur + delta
    if not -(1 << 63) <= new < (1 << 63):
        raise _errors.NotACounter("incr: the result does not fit a signed 64-bit integer")
    v = str(new).encode()
    tier.put(k, v, expire)
    return (v, expire)


cdef inline int _key(object key, const char **p, Py_ssize_t *n) except -1:
    if PyBytes_CheckExact(key):
        p[0] = PyBytes_AS_STRING(key)
        n[0] = PyBytes_GET_SIZE(key)
        return 0
    if PyUnicode_CheckExact(key) or isinstance(key, str):
        p[0] = PyUnicode_AsUTF8AndSize(key, n)
        return 0
    if isinstance(key, bytes):
        p[0] = PyBytes_AS_STRING(key)
        n[0] = PyBytes_GET_SIZE(key)
        return 0
    raise _errors.InvalidType(f"key must be bytes or str, not {type(key).__name__}")


cdef inline uint64_t _expiry(object ttl) except? 0:
    if ttl is None:
        return 0
    try:
        t = float(ttl)
    except (TypeError, ValueError):
        raise _errors.InvalidType(f"ttl must be a number of seconds or None, not {type(ttl).__name__}") from None
    if not t > 0:
        raise _errors.InvalidArgument(f"ttl must be > 0 seconds (or None for no expiry), got {ttl!r}")
    return shmkv_now_ms() + <uint64_t>(t * 1000.0 + 0.999)


def create_segment(int fd, uint64_t size, uint32_t max_key, uint32_t max_item,
                   double growth, uint32_t nstripes, uint32_t codec, uint32_t codec_arg):
    """Reserve `size` bytes of the shared-memory object behind `fd` and lay out an empty
    store in it. Reserving up front (posix_fallocate) turns a too-small /dev/shm into an
    error here, instead of a SIGBUS in some worker when it first touches a page."""
    cdef create_params_t p
    cdef char err[512]
    cdef int rc
    p.size = size
    p.max_key = max_key
    p.max_item = max_item
    p.growth_x1000 = <uint32_t>(growth * 1000 + 0.5)
    p.nstripes = nstripes
    p.codec = codec
    p.codec_arg = codec_arg
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
        }
    finally:
        munmap(base, 4096)


cdef class Core:
    """One process's handle on a store: maps the segment and holds a process slot.

    Fields are per process, never shared. (They are declared here rather than in a .pxd:
    the module is shmkv._core while its source lives in ext/, and nothing cimports it.)
    """
    cdef store_t st
    cdef char *_base
    cdef uint64_t _mapsize
    cdef int _busy        # operations under way in this process (a wait releases the GIL)
    cdef readonly object name
    cdef readonly int max_key
    cdef readonly int max_item
    cdef readonly int codec_id
    # The disk tier (a shmkv.lsm.LSM) under this memory tier, or None: memory only. Every
    # write goes through to it under the key's stripe lock; a memory miss reads through it.
    cdef public object _tier

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
        self.st.pending = 0
        self._busy = 0
        rc = shmkv_register(&self.st)
        if rc != 0:
            munmap(self._base, self._mapsize)
            self._base = NULL

    cdef int _check(self) except -1:
        if self._base == NULL:
            raise _errors.StoreClosed(f"store {self.name!r} is closed")
        return 0

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
        if rc == SHMKV_ENOTNUM:
            raise _errors.NotACounter("incr: the stored value is not a decimal integer")
        if rc == SHMKV_EOVERFLOW:
            raise _errors.NotACounter("incr: the result does not fit a signed 64-bit integer")
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
        if isinstance(value, str):
            raise _errors.InvalidType(
                "value must be bytes-like, not str: encode it (value.encode()) or attach "
                "with codec='pickle'")
        try:
            PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE)
        except TypeError:
            raise _errors.InvalidType(
                f"value must be bytes-like (bytes, bytearray, memoryview), not "
                f"{type(value).__name__}; attach with codec='pickle' to store objects") from None
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
        if not PyBytes_CheckExact(value):
            if isinstance(value, str):
                raise _errors.InvalidType(
                    "value must be bytes-like, not str: encode it (value.encode()) or attach "
                    "with codec='pickle'")
            try:
                value = bytes(memoryview(value))
            except TypeError:
                raise _errors.InvalidType(
                    f"value must be bytes-like (bytes, bytearray, memoryview), not "
                    f"{type(value).__name__}") from None
        kb = k[:kn]
        if only_if_absent:
            outcome = []
            self._through(k, kn, 0, partial(_tier_add, self._tier, kb, value, expire, outcome))
            return 0 if outcome else SHMKV_EEXISTS
        if len(value) > _LSM_MAX_VALUE:
            raise _errors.ValueTooLarge(
                f"value is {len(value)} bytes; the disk tier's limit is {_LSM_MAX_VALUE}")
        self._through(k, kn, 1, partial(self._tier.put_checked, kb, value, expire))
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
        pairs = list(mapping.items()) if hasattr(mapping, "items") else list(mapping)
        keys = []
        values = []
        for pair in pairs:
            key, value = pair
            _key(key, &k, &kn)
            if kn == 0 or kn > self.max_key:
                self._fail(SHMKV_EKEYLEN, kn, 0)
            if type(value) is not bytes:
                if isinstance(value, str):
                    raise _errors.InvalidType(
                        f"value for key {key!r} must be bytes-like, not str: encode it")
                try:
                    value = bytes(memoryview(value))
                except TypeError:
                    raise _errors.InvalidType(
                        f"value for key {key!r} must be bytes-like, not {type(value).__name__}") from None
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
            res = self._through(k, kn, 1, partial(_tier_incr, self._tier, k[:kn], delta))
            return int(res[0])
        self._busy += 1
        rc = shmkv_incr(&self.st, k, kn, delta, &out)
        self._busy -= 1
        if rc < 0:
            self._fail(rc, kn, 20)
        return out

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
            self._through(k, kn, 1, partial(self._tier.delete, kb))
            return existed
        self._busy += 1
        rc = shmkv_delete(&self.st, k, kn)
        self._busy -= 1
        if rc < 0:
            self._fail(rc, kn, 0)
        return rc == 1

    def __delitem__(self, key):
        if not self.delete(key):
            raise KeyError(key)

    def delete_many(self, keys):
        """Remove every key given; returns how many were present."""
        n = 0
        for key in keys:
            n += self.delete(key)
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

    def verify(self):
        """Check every structure (briefly stopping all writers); returns problems found,
        [] when clean. Leftovers of killed writers are reclaimed, not reported."""
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
        procs = []
        for i in range(SHMKV_MAX_SLOTS):
            if self.st.slots[i].pid:
                for k in range(len(_STAT_NAMES)):
                    totals[k] += self.st.slots[i].stats[k]
                if shmkv_slot_alive(&self.st, i):
                    procs.append(self.st.slots[i].pid)
        out = dict(zip(_STAT_NAMES, totals))
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
        shmkv_free_pending(&self.st)
        shmkv_unregister(&self.st)
        munmap(self._base, self._mapsize)
        self._base = NULL

    def _set_crash_point(self, int n):
        """Tests only: SIGKILL this process when it reaches crash point n (see CRASH_POINT
        in ext/core); 0 turns it off."""
        self.st.crash_at = n

    @property
    def closed(self):
        return self._base == NULL

    def __dealloc__(self):
        if self._base != NULL:
            shmkv_free_pending(&self.st)
            shmkv_unregister(&self.st)
            munmap(self._base, self._mapsize)
            self._base = NULL
