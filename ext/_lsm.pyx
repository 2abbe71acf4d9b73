# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""shmkv.lsm._accel: the spill tier's hot loops in C. Pure functions over the stored formats
of shmkv/lsm/format.py (same bytes in, same bytes out as the Python they replace), plus the
shared change counter.

- WAL framing: encode_put / encode_batch / decode_batch, with CRC-32 in C (zlib's polynomial).
- Bloom filters: build and probe, same probe sequence as bloom.py (mmh3.hash64 halves, double
  hashing); Probe tests a key against every table of a version in one call.
- Data blocks: binary search and decoding with every bound checked: a malformed block raises
  ValueError (the caller names the file), never reads outside the buffer.
- Merge: k-way merge of sorted sources, newest version per key, optionally live values only.
- SharedPage: a MAP_SHARED page of <dir>/SHARED holding a change counter (every append, seal
  and manifest change bumps it, so a process whose last look is still current skips its
  stat/fstat calls) and the WAL append lock (a robust process-shared mutex).
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcmp, memcpy, memset
from cpython.bytes cimport (PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE,
                            PyBytes_CheckExact)
from cpython.long cimport PyLong_AsUnsignedLongLongMask
from cpython.ref cimport PyObject, Py_DECREF
from cpython.exc cimport PyErr_Occurred
from cpython.tuple cimport PyTuple_GET_ITEM

import mmh3

from shmkv.errors import Corruption as _Corruption

cdef extern from "Python.h":
    PyObject *PyIter_Next(object o)
    void *PyMem_Malloc(size_t n)
    void PyMem_Free(void *p)
    char *PyByteArray_AS_STRING(object o)

cdef extern from "lsm/accel.h":
    void shmkv_crc32_init()
    uint32_t shmkv_crc32(uint32_t crc, const void *data, size_t n) nogil
    uint32_t shmkv_ld32(const void *p) nogil
    uint64_t shmkv_ld64(const void *p) nogil
    void shmkv_st32(void *p, uint32_t v) nogil
    void shmkv_st64(void *p, uint64_t v) nogil
    uint64_t shmkv_epoch_load(const uint64_t *p) nogil
    uint64_t shmkv_epoch_bump(uint64_t *p) nogil

cdef extern from "sys/mman.h" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void *MAP_FAILED

shmkv_crc32_init()

# DO NOT CHANGE: stored layout (mirrors format.py; tests/lsm/test_accel.py checks they agree)
cdef enum:
    REC_HEAD = 13      # length u32, type u8, head_crc u32, data_crc u32
    ENTRY_HEAD = 17    # kind u8, key_len u32, val_len u32, expire u64
    REC_BATCH = 1
    KIND_PUT = 1
    KIND_DELETE = 2
    PAGE_SIZE = 4096
    PAGE_COUNTER = 64  # offset of the change counter: its own cache line, after the stamp
    PAGE_MUTEX = 128   # offset of the WAL append lock (a pthread_mutex_t, <= 64 bytes)

cdef object _hash64 = mmh3.hash64
cdef object _io_error = None  # wal.io_error, set by set_io_error (wal imports this module)


def set_io_error(f):
    """Install wal.io_error, which maps an OSError to DiskFull/FileAccessError."""
    global _io_error
    _io_error = f


def crc32(data, uint32_t crc=0):
    """zlib.crc32, in this module's C (tests compare the two)."""
    cdef const uint8_t[::1] mv = data
    return shmkv_crc32(crc, &mv[0] if mv.shape[0] else NULL, mv.shape[0])


# -- WAL records ----------------------------------------------------------------------------

cdef inline void _frame(char *rec, uint32_t length) noexcept:
    """Fill the 13-byte record head in front of a payload of `length` bytes at rec + 13."""
    cdef uint8_t lt[5]
    shmkv_st32(lt, length)
    lt[4] = REC_BATCH
    memcpy(rec, lt, 5)
    shmkv_st32(rec + 5, shmkv_crc32(0, lt, 5))
    shmkv_st32(rec + 9, shmkv_crc32(0, rec + REC_HEAD, length))


cdef inline char *_entry(char *p, int kind, bytes key, bytes value, uint64_t expire) noexcept:
    cdef Py_ssize_t kn = PyBytes_GET_SIZE(key), vn = PyBytes_GET_SIZE(value)
    p[0] = <char>kind
    shmkv_st32(p + 1, <uint32_t>kn)
    shmkv_st32(p + 5, <uint32_t>vn)
    shmkv_st64(p + 9, expire)
    memcpy(p + ENTRY_HEAD, PyBytes_AS_STRING(key), kn)
    memcpy(p + ENTRY_HEAD + kn, PyBytes_AS_STRING(value), vn)
    return p + ENTRY_HEAD + kn + vn


def encode_put(int kind, bytes key not None, bytes value not None, uint64_t expire):
    """One WAL BATCH record holding one entry: the bytes wal.encode_batch([entry]) gives."""
    cdef Py_ssize_t plen = 4 + ENTRY_HEAD + PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(value)
    cdef bytes rec = PyBytes_FromStringAndSize(NULL, REC_HEAD + plen)
    cdef char *r = PyBytes_AS_STRING(rec)
    shmkv_st32(r + REC_HEAD, 1)
    _entry(r + REC_HEAD + 4, kind, key, value, expire)
    _frame(r, <uint32_t>plen)
    return rec


def encode_batch(list entries, Py_ssize_t chunk):
    """WAL BATCH records for (kind, key, value, expire) entries, a new record whenever one
    reaches `chunk` payload bytes (each record is atomic on replay; the batch is not)."""
    cdef Py_ssize_t i, j, n = len(entries), size, total = 0, start, count
    cdef tuple e
    # pass 1: the output size
    i = 0
    while i < n:
        size = 4
        while i < n:
            e = entries[i]
            if not (len(e) == 4 and PyBytes_CheckExact(e[1]) and PyBytes_CheckExact(e[2])):
                raise TypeError("entries must be (kind, key: bytes, value: bytes, expire)")
            size += ENTRY_HEAD + PyBytes_GET_SIZE(<bytes>e[1]) + PyBytes_GET_SIZE(<bytes>e[2])
            i += 1
            if size - 4 >= chunk:
                break
        total += REC_HEAD + size
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char *o = PyBytes_AS_STRING(out)
    cdef char *p
    # pass 2: the same split, written
    i = 0
    while i < n:
        p = o + REC_HEAD + 4
        count = 0
        size = 0
        while i < n:
            e = <tuple>entries[i]
            p = _entry(p, e[0], e[1], e[2], e[3])
            size += ENTRY_HEAD + PyBytes_GET_SIZE(<bytes>e[1]) + PyBytes_GET_SIZE(<bytes>e[2])
            count += 1
            i += 1
            if size >= chunk:
                break
        shmkv_st32(o + REC_HEAD, <uint32_t>count)
        _frame(o, <uint32_t>(size + 4))
        o = p
    return out


def decode_batch(payload):
    """[(kind, key, value, expire)] of a BATCH payload. REQUIRES: it passed its checksum.
    Raises ValueError if the structure is inconsistent (a writer bug, not a torn write)."""
    cdef const uint8_t[::1] mv = payload
    cdef Py_ssize_t n = mv.shape[0], pos = 4
    cdef uint32_t count, i, klen, vlen
    cdef const char *b
    if n < 4:
        raise ValueError("batch shorter than its count")
    b = <const char *>&mv[0]
    count = shmkv_ld32(b)
    out = []
    for i in range(count):
        if n - pos < ENTRY_HEAD:
            raise ValueError("batch entry overruns its record")
        klen = shmkv_ld32(b + pos + 1)
        vlen = shmkv_ld32(b + pos + 5)
        if <uint64_t>(n - pos - ENTRY_HEAD) < <uint64_t>klen + vlen or not (
                b[pos] == KIND_PUT or b[pos] == KIND_DELETE):
            raise ValueError("batch entry overruns its record or has an unknown kind")
        out.append((<int>b[pos], PyBytes_FromStringAndSize(b + pos + ENTRY_HEAD, klen),
                    PyBytes_FromStringAndSize(b + pos + ENTRY_HEAD + klen, vlen),
                    shmkv_ld64(b + pos + 9)))
        pos += ENTRY_HEAD + klen + vlen
    if pos != n:
        raise ValueError("batch has trailing bytes")
    return out


# -- bloom filters ----------------------------------------------------------------------------
#
# DO NOT CHANGE: stored layout. Probe i of key tests bit (h1 + i * h2) mod 2^64 mod nbits, where
# (h1, h2) = mmh3.hash64(key, 0, False) as unsigned 64-bit and h2 |= 1 (bloom.py).

cdef inline int _hashes(bytes key, uint64_t *h1, uint64_t *h2) except -1:
    h = _hash64(key, 0, False)
    h1[0] = PyLong_AsUnsignedLongLongMask(<object>PyTuple_GET_ITEM(h, 0))
    h2[0] = PyLong_AsUnsignedLongLongMask(<object>PyTuple_GET_ITEM(h, 1)) | 1
    return 0


cdef inline bint _probe(const uint8_t *bits, uint64_t nbits, int k, uint64_t h1,
                        uint64_t h2) noexcept nogil:
    cdef uint64_t b
    cdef int i
    for i in range(k):
        b = (h1 + <uint64_t>i * h2) % nbits
        if not (bits[b >> 3] & (1 << (b & 7))):
            return False
    return True


def bloom_build(keys, uint64_t nbits, int k):
    """The filter bits (bytearray of nbits / 8) holding every key of `keys`."""
    cdef bytearray bits = bytearray(nbits // 8)
    cdef uint8_t *p = <uint8_t *>PyByteArray_AS_STRING(bits)
    cdef uint64_t h1, h2, b
    cdef int i
    for key in keys:
        _hashes(key, &h1, &h2)
        for i in range(k):
            b = (h1 + <uint64_t>i * h2) % nbits
            p[b >> 3] |= 1 << (b & 7)
    return bits


def bloom_check(const uint8_t[::1] bits, uint64_t nbits, int k, object h1, object h2):
    """Whether the filter may hold a key with probe seeds (h1, h2) (bloom.key_hashes)."""
    if nbits == 0 or <uint64_t>bits.shape[0] * 8 < nbits:
        raise ValueError("filter bits shorter than nbits")
    return _probe(&bits[0], nbits, k, PyLong_AsUnsignedLongLongMask(h1),
                  PyLong_AsUnsignedLongLongMask(h2))


cdef inline int _cmp(bytes a, bytes b) noexcept:
    cdef Py_ssize_t na = PyBytes_GET_SIZE(a), nb = PyBytes_GET_SIZE(b)
    cdef int c = memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), na if na < nb else nb)
    if c:
        return c
    return (na > nb) - (na < nb)


cdef class Probe:
    """Which tables of one version may hold a key, in precedence order (L0 newest first, then
    one table per deeper level), with every range and bloom check done here in C.

    Built from rows (smallest, largest, reader): ``l0`` newest first, ``levels`` each sorted
    and non-overlapping. A reader's ``bloom`` (nbits, k, bits) is read once, at build.
    ``negatives`` counts tables a bloom filter ruled out (stats()).
    """

    cdef list _l0        # [(smallest, largest, reader, bits, nbits, k)]
    cdef list _largest   # per deeper level: [largest key of each table]
    cdef list _rows      # per deeper level: [(smallest, largest, reader, bits, nbits, k)]
    cdef public long long negatives

    def __init__(self, l0, levels):
        self._l0 = [_row(r) for r in l0]
        self._largest = []
        self._rows = []
        for lv in levels:
            if lv:
                self._largest.append([r[1] for r in lv])
                self._rows.append([_row(r) for r in lv])
        self.negatives = 0

    cdef inline bint _admits(self, tuple row, bytes key, uint64_t *h, bint *hashed) except -1:
        if not hashed[0]:
            _hashes(key, &h[0], &h[1])
            hashed[0] = True
        cdef bytes bits = <bytes>row[3]
        if _probe(<const uint8_t *>PyBytes_AS_STRING(bits), <uint64_t>row[4], <int>row[5],
                  h[0], h[1]):
            return True
        self.negatives += 1
        return False

    def candidates(self, bytes key not None):
        """Readers that may hold `key`, most recent first. [] for most absent keys."""
        cdef uint64_t h[2]
        cdef bint hashed = False
        cdef tuple row
        cdef list largest
        cdef Py_ssize_t lo, hi, mid, lvl
        out = []
        for row in self._l0:
            if _cmp(<bytes>row[0], key) <= 0 and _cmp(key, <bytes>row[1]) <= 0:
                if self._admits(row, key, h, &hashed):
                    out.append(row[2])
        for lvl in range(len(self._rows)):
            largest = <list>self._largest[lvl]
            lo, hi = 0, len(largest)
            while lo < hi:
                mid = (lo + hi) >> 1
                if _cmp(<bytes>largest[mid], key) < 0:
                    lo = mid + 1
                else:
                    hi = mid
            if lo == len(largest):
                continue
            row = <tuple>(<list>self._rows[lvl])[lo]
            if _cmp(<bytes>row[0], key) <= 0 and self._admits(row, key, h, &hashed):
                out.append(row[2])
        return out


    def lookup(self, bytes key not None, list gens, decompress):
        """The newest entry (kind, value, expire) for ``key`` -- memtables of ``gens`` (objects
        with a ``mem``, oldest first) newest first, then the tables -- or None. A table whose
        bloom filter let the key through but does not hold it counts a false positive on its
        reader. Errors of a table read are raised as Corruption naming the file."""
        cdef Py_ssize_t i
        for i in range(len(gens) - 1, -1, -1):
            slot = (<Memtable>gens[i].mem)._data.get(key)
            if slot is not None:
                return slot
        for r in self.candidates(key):
            try:
                slot = table_find(r, key, decompress)
            except ValueError as e:
                raise _Corruption(f"{r.path}: {e}") from e
            except OSError as e:
                raise _io_error(e, r.path, "read table") from e
            if slot is not None:
                return slot
            r.bloom_false_positives += 1
        return None


cdef tuple _row(r):
    smallest, largest, reader = r
    bloom = reader.bloom
    bits = bytes(bloom.bits)
    if bloom.nbits == 0 or len(bits) * 8 < bloom.nbits:
        raise ValueError("filter bits shorter than nbits")
    return (bytes(smallest), bytes(largest), reader, bits, int(bloom.nbits), int(bloom.k))


# -- data blocks ------------------------------------------------------------------------------
#
# Layout (format.py): entries, then u32 offset of each entry, then u32 count. REQUIRES: the block
# passed its checksum; every bound is still checked, so a writer bug cannot read out of bounds.

cdef inline Py_ssize_t _offsets(const char *b, Py_ssize_t n, uint32_t *count) except -1:
    if n < 4:
        raise ValueError("block shorter than its count")
    count[0] = shmkv_ld32(b + n - 4)
    if <uint64_t>count[0] * 4 + 4 > <uint64_t>n:
        raise ValueError("offset array larger than the block")
    return n - 4 - 4 * <Py_ssize_t>count[0]


def block_search(bytes block not None, bytes key not None):
    """(kind, value, expire) of `key` in the block, or None (binary search by offsets)."""
    cdef const char *b = PyBytes_AS_STRING(block)
    cdef uint32_t count, off, klen, vlen
    cdef Py_ssize_t base = _offsets(b, PyBytes_GET_SIZE(block), &count)
    cdef const char *k = PyBytes_AS_STRING(key)
    cdef Py_ssize_t kn = PyBytes_GET_SIZE(key), lo = 0, hi = count, mid
    cdef int c
    while lo < hi:
        mid = (lo + hi) >> 1
        off = shmkv_ld32(b + base + 4 * mid)
        if <uint64_t>off + ENTRY_HEAD > <uint64_t>base:
            raise ValueError("entry offset outside the block")
        klen = shmkv_ld32(b + off + 1)
        if <uint64_t>off + ENTRY_HEAD + klen > <uint64_t>base:
            raise ValueError("entry overruns the block")
        c = memcmp(b + off + ENTRY_HEAD, k, klen if klen < kn else kn)
        if c == 0:
            c = (klen > kn) - (klen < kn)
        if c < 0:
            lo = mid + 1
        elif c > 0:
            hi = mid
        else:
            vlen = shmkv_ld32(b + off + 5)
            if <uint64_t>off + ENTRY_HEAD + klen + vlen > <uint64_t>base:
                raise ValueError("entry overruns the block")
            return (<int>b[off], PyBytes_FromStringAndSize(b + off + ENTRY_HEAD + klen, vlen),
                    shmkv_ld64(b + off + 9))
    return None


def block_entries(bytes block not None, bytes start=None, bytes stop=None):
    """[(key, kind, value, expire)] with start <= key < stop, in block order (key order).

    The whole block's framing is checked when no bound cuts the walk short."""
    cdef const char *b = PyBytes_AS_STRING(block)
    cdef uint32_t count, i, klen, vlen
    cdef Py_ssize_t end = _offsets(b, PyBytes_GET_SIZE(block), &count), pos = 0
    cdef const char *sp = NULL
    cdef const char *tp = NULL
    cdef Py_ssize_t sn = 0, tn = 0
    cdef int c
    if start is not None:
        sp, sn = PyBytes_AS_STRING(start), PyBytes_GET_SIZE(start)
    if stop is not None:
        tp, tn = PyBytes_AS_STRING(stop), PyBytes_GET_SIZE(stop)
    out = []
    for i in range(count):
        if end - pos < ENTRY_HEAD:
            raise ValueError("entry overruns the block")
        klen = shmkv_ld32(b + pos + 1)
        vlen = shmkv_ld32(b + pos + 5)
        if <uint64_t>(end - pos - ENTRY_HEAD) < <uint64_t>klen + vlen:
            raise ValueError("entry overruns the block")
        if sp != NULL:
            c = memcmp(b + pos + ENTRY_HEAD, sp, klen if klen < sn else sn)
            if c < 0 or (c == 0 and klen < sn):
                pos += ENTRY_HEAD + klen + vlen
                continue
            sp = NULL  # sorted: every later key is >= start too
        if tp != NULL:
            c = memcmp(b + pos + ENTRY_HEAD, tp, klen if klen < tn else tn)
            if c > 0 or (c == 0 and klen >= tn):
                return out
        out.append((PyBytes_FromStringAndSize(b + pos + ENTRY_HEAD, klen), <int>b[pos],
                    PyBytes_FromStringAndSize(b + pos + ENTRY_HEAD + klen, vlen),
                    shmkv_ld64(b + pos + 9)))
        pos += ENTRY_HEAD + klen + vlen
    if pos != end:
        raise ValueError("block has bytes between its entries and its offsets")
    return out


# -- reading tables ---------------------------------------------------------------------------

cdef extern from "unistd.h" nogil:
    ssize_t pread(int fd, void *buf, size_t n, long off)

import zlib as _zlib
from collections import OrderedDict as _OrderedDict

cdef object _crc32 = _zlib.crc32  # zlib's is faster than the table code above on big blocks


cdef class BlockCache:
    """LRU of decompressed, verified data blocks, keyed by (table number, offset). Atomic
    under the GIL (no Python code runs inside a method), so threads need no lock.

    Blocks larger than ``max_block`` (big values) are never cached: one would evict everything.
    """

    cdef object _d
    cdef public long long capacity, max_block, hits, misses
    cdef long long _bytes

    def __init__(self, long long capacity=8 << 20, long long max_block=256 << 10):
        self._d = _OrderedDict()
        self.capacity = capacity
        self.max_block = max_block
        self._bytes = 0
        self.hits = self.misses = 0

    cpdef get(self, k):
        b = self._d.get(k)
        if b is None:
            self.misses += 1
            return None
        self._d.move_to_end(k)
        self.hits += 1
        return b

    cpdef put(self, k, bytes b):
        if PyBytes_GET_SIZE(b) > self.max_block or self.capacity <= 0 or k in self._d:
            return
        self._d[k] = b
        self._bytes += PyBytes_GET_SIZE(b)
        while self._bytes > self.capacity:
            _, old = self._d.popitem(last=False)
            self._bytes -= PyBytes_GET_SIZE(<bytes>old)


def read_block(int fd, uint64_t off, Py_ssize_t size, decompress):
    """Read, check and decompress the stored block at (off, size) of ``fd``: ValueError (to be
    prefixed with the file's name) on a short read, a checksum mismatch or a bad codec; OSError
    from pread. ``decompress(codec, body)`` undoes the block's compression (sstable.py)."""
    if size < 5:
        raise ValueError(f"block at offset {off} is too short")
    cdef bytes buf = PyBytes_FromStringAndSize(NULL, size)
    cdef char *p = PyBytes_AS_STRING(buf)
    cdef Py_ssize_t got = 0
    cdef ssize_t n = 0
    cdef int err = 0
    with nogil:
        while got < size:
            n = pread(fd, p + got, size - got, off + got)
            if n < 0:
                if errno == EINTR:
                    continue
                err = errno
                break
            if n == 0:
                break
            got += n
    if err:
        raise OSError(err, "cannot read table")
    if got != size:
        raise ValueError(f"short read at offset {off} (file truncated?)")
    cdef int codec = <uint8_t>p[size - 5]
    # the crc covers the contents and the codec byte, which are contiguous: one pass
    if _crc32(memoryview(buf)[:size - 4]) != shmkv_ld32(p + size - 4):
        raise ValueError(f"block at offset {off}: checksum mismatch")
    if codec == 0:
        return PyBytes_FromStringAndSize(p, size - 5)
    try:
        return decompress(codec, memoryview(buf)[:size - 5])
    except Exception as e:
        raise ValueError(f"block at offset {off}: cannot decompress ({e})") from e


cpdef bytes table_block(reader, Py_ssize_t i, decompress):
    """Data block ``i`` of a TableReader (from its cache, else read and cached). Raises as
    read_block."""
    cdef tuple h = <tuple>reader.handles[i]
    cache = reader.cache
    ck = (reader.number, h[0])
    if cache is not None:
        b = (<BlockCache>cache).get(ck)
        if b is not None:
            return <bytes>b
    b = read_block(reader.fd, h[0], h[1], decompress)
    if PyBytes_GET_SIZE(<bytes>b) < 4:
        raise ValueError(f"data block at offset {h[0]} is malformed")
    if cache is not None:
        (<BlockCache>cache).put(ck, <bytes>b)
    return <bytes>b


def table_find(reader, bytes key not None, decompress):
    """(kind, value, expire) of ``key`` in a TableReader, or None: the index by binary search,
    then the one data block that may hold it. Raises as read_block."""
    cdef list last = <list>reader.last_keys
    cdef Py_ssize_t lo = 0, hi = len(last), mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if _cmp(<bytes>last[mid], key) < 0:
            lo = mid + 1
        else:
            hi = mid
    if lo == len(last):
        return None
    block = table_block(reader, lo, decompress)
    try:
        return block_search(block, key)
    except ValueError as e:
        raise ValueError(f"data block at offset {reader.handles[lo][0]} is malformed: {e}") from e


cdef class TableIter:
    """Entries (key, kind, value, expire) of a TableReader with start <= key < stop, in key
    order, tombstones included: block by block (cached or read, checked), decoded in C.
    Read errors are raised as Corruption / FileAccessError naming the file."""

    cdef object _reader, _decompress
    cdef list _last_keys, _cur
    cdef Py_ssize_t _bi, _first, _n, _pos
    cdef bytes _start, _stop
    cdef bint _done

    def __init__(self, reader, bytes start=None, bytes stop=None, decompress=None):
        cdef list last = <list>reader.last_keys
        cdef Py_ssize_t lo = 0, hi = len(last), mid
        if start is not None:
            while lo < hi:
                mid = (lo + hi) >> 1
                if _cmp(<bytes>last[mid], start) < 0:
                    lo = mid + 1
                else:
                    hi = mid
        self._reader, self._decompress = reader, decompress
        self._last_keys = last
        self._first = self._bi = lo
        self._n = len(last)
        self._start, self._stop = start, stop
        self._cur = []
        self._pos = 0
        self._done = False

    def __iter__(self):
        return self

    def __next__(self):
        while self._pos >= len(self._cur):
            if self._done or self._bi >= self._n:
                raise StopIteration
            try:
                block = table_block(self._reader, self._bi, self._decompress)
                self._cur = block_entries(
                    block, self._start if self._bi == self._first else None, self._stop)
            except ValueError as e:
                msg = str(e)
                if not msg.startswith(("block", "data block", "short read")):
                    msg = f"data block at offset {self._reader.handles[self._bi][0]} is malformed: {msg}"
                raise _Corruption(f"{self._reader.path}: {msg}") from e
            except OSError as e:
                raise _io_error(e, self._reader.path, "read table") from e
            if self._stop is not None and _cmp(<bytes>self._last_keys[self._bi], self._stop) >= 0:
                self._done = True
            self._bi += 1
            self._pos = 0
        e = self._cur[self._pos]
        self._pos += 1
        return e


# -- building tables ----------------------------------------------------------------------------

cdef class BlockBuilder:
    """The data block being built for a TableWriter, plus what the writer needs of every entry
    (all keys, for the bloom filter; the last key, for order and the index). ``take()`` hands
    over the finished block: entries, then u32 offsets, then u32 count (format.py)."""

    cdef bytearray _buf
    cdef bytearray _offs
    cdef Py_ssize_t _used, _oused
    cdef readonly uint32_t count        # entries in the current block
    cdef readonly list keys             # every key added, in order
    cdef readonly bytes last            # last key added (None before the first)
    cdef readonly Py_ssize_t block_size

    def __init__(self, Py_ssize_t block_size):
        self.block_size = block_size
        self._buf = bytearray(block_size * 2)
        self._offs = bytearray(1024)
        self._used = self._oused = 0
        self.count = 0
        self.keys = []
        self.last = None

    @property
    def block_bytes(self):
        return self._used

    cdef int _reserve(self, bytearray b, Py_ssize_t used, Py_ssize_t more) except -1:
        cdef Py_ssize_t n = len(b)
        if used + more > n:
            b.extend(bytes(max(n, used + more - n)))
        return 0

    cdef int add(self, bytes key, int kind, bytes value, uint64_t expire) except -1:
        """REQUIRES: key > last (checked by fill_table)."""
        cdef Py_ssize_t kn = PyBytes_GET_SIZE(key), vn = PyBytes_GET_SIZE(value)
        self._reserve(self._buf, self._used, ENTRY_HEAD + kn + vn)
        self._reserve(self._offs, self._oused, 4)
        shmkv_st32(PyByteArray_AS_STRING(self._offs) + self._oused, <uint32_t>self._used)
        self._oused += 4
        _entry(PyByteArray_AS_STRING(self._buf) + self._used, kind, key, value, expire)
        self._used += ENTRY_HEAD + kn + vn
        self.count += 1
        self.keys.append(key)
        self.last = key
        return 0

    def take(self):
        """(raw block bytes, its last key), or None if the block is empty; starts a new block."""
        if self.count == 0:
            return None
        cdef bytes raw = PyBytes_FromStringAndSize(NULL, self._used + self._oused + 4)
        cdef char *r = PyBytes_AS_STRING(raw)
        memcpy(r, PyByteArray_AS_STRING(self._buf), self._used)
        memcpy(r + self._used, PyByteArray_AS_STRING(self._offs), self._oused)
        shmkv_st32(r + self._used + self._oused, self.count)
        self._used = self._oused = 0
        self.count = 0
        if len(self._buf) > 4 * self.block_size:
            self._buf = bytearray(self.block_size * 2)  # a big value passed: give it back
        return raw, self.last


def fill_table(writer, BlockBuilder b, entries, long long max_bytes):
    """Add (key, kind, value, expire) ``entries`` to ``writer`` (a TableWriter whose builder is
    ``b``) in key order, calling ``writer._finish_block()`` whenever a block is due; stop early
    once the table reaches ``max_bytes`` (0: no limit). True when ``entries`` ran out.

    Block rule (as before in Python): a block is closed once it holds >= block_size bytes, and
    an entry that is a block by itself closes the current one first (big values alone)."""
    cdef tuple e
    cdef bytes key, value
    cdef Py_ssize_t elen
    cdef long long offset = writer._offset
    for o in entries:
        if type(o) is not tuple or len(<tuple>o) != 4:
            raise TypeError("table entries must be (key, kind, value, expire) tuples")
        e = <tuple>o
        key = e[0]
        value = e[2]
        if key is None or value is None:
            raise TypeError("table entries need bytes keys and values")
        if b.last is not None and _cmp(key, b.last) <= 0:
            raise ValueError("TableWriter.add: keys must be strictly increasing")
        elen = ENTRY_HEAD + PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(value)
        if b.count and elen >= b.block_size:
            writer._finish_block()
            offset = writer._offset
        b.add(key, e[1], value, e[3])
        if b._used >= b.block_size:
            writer._finish_block()
            offset = writer._offset
        if max_bytes and offset + b._used >= max_bytes:
            return False
    return True


cdef class DropDead:
    """Filter of a merged stream for a compaction or flush into some level: a tombstone or
    an entry expired at ``now_ms`` is dropped when no table deeper than the output overlaps
    its key (nothing older can resurface), else kept as a bare tombstone (compaction.py)."""

    cdef object _it
    cdef list _ranges   # [(smallest, largest)] of the deeper tables
    cdef uint64_t _now

    def __init__(self, entries, ranges, uint64_t now_ms):
        self._it = iter(entries)
        self._ranges = [(bytes(lo), bytes(hi)) for lo, hi in ranges]
        self._now = now_ms

    def __iter__(self):
        return self

    def __next__(self):
        cdef tuple e, r
        cdef uint64_t exp
        while True:
            e = <tuple>next(self._it)
            exp = e[3]
            if e[1] == KIND_PUT and (exp == 0 or exp > self._now):
                return e
            for r in self._ranges:
                if _cmp(<bytes>r[0], <bytes>e[0]) <= 0 and _cmp(<bytes>e[0], <bytes>r[1]) <= 0:
                    return (e[0], KIND_DELETE, b"", 0)


# -- merging ----------------------------------------------------------------------------------

cdef class Merge:
    """Iterator over sorted sources of (key, kind, value, expire), given newest first: yields
    each key once, from the newest source holding it (older versions are shadowed).

    With ``live_until`` (ms since the epoch) it yields only (key, value) of live puts: no
    tombstones, nothing expired at that time. A binary heap of source indices; ties on the key
    go to the lower index, which is what makes "newest wins" hold.
    """

    cdef list _its
    cdef list _heads     # current entry (tuple) of each source
    cdef int *_heap
    cdef int _n
    cdef bint _live
    cdef uint64_t _now

    def __init__(self, sources, live_until=None):
        self._its = [iter(s) for s in sources]
        self._heads = [None] * len(self._its)
        self._heap = <int *>PyMem_Malloc(sizeof(int) * (len(self._its) + 1))
        if self._heap == NULL:
            raise MemoryError()
        self._n = 0
        self._live = live_until is not None
        self._now = live_until if live_until is not None else 0
        cdef int i
        for i in range(len(self._its)):
            if self._fill(i):
                self._heap[self._n] = i
                self._n += 1
                self._up(self._n - 1)

    cdef int _fill(self, int i) except -1:
        """Load the next entry of source i into _heads[i]; 0 when it is exhausted."""
        cdef PyObject *p = PyIter_Next(self._its[i])
        if p == NULL:
            self._heads[i] = None
            if PyErr_Occurred():
                return -1  # the source's exception propagates
            return 0
        e = <object>p
        Py_DECREF(e)  # <object> took its own reference
        if type(e) is not tuple or len(<tuple>e) != 4 or not PyBytes_CheckExact((<tuple>e)[0]):
            raise TypeError("merge sources must yield (key: bytes, kind, value, expire)")
        self._heads[i] = e
        return True

    cdef inline bint _less(self, int a, int b) noexcept:
        cdef int c = _cmp(<bytes>(<tuple>self._heads[a])[0], <bytes>(<tuple>self._heads[b])[0])
        return c < 0 or (c == 0 and a < b)

    cdef void _up(self, int j) noexcept:
        cdef int p, t
        while j > 0:
            p = (j - 1) >> 1
            if not self._less(self._heap[j], self._heap[p]):
                break
            t = self._heap[j]; self._heap[j] = self._heap[p]; self._heap[p] = t
            j = p

    cdef void _down(self, int j) noexcept:
        cdef int c, t
        while True:
            c = 2 * j + 1
            if c >= self._n:
                return
            if c + 1 < self._n and self._less(self._heap[c + 1], self._heap[c]):
                c += 1
            if not self._less(self._heap[c], self._heap[j]):
                return
            t = self._heap[j]; self._heap[j] = self._heap[c]; self._heap[c] = t
            j = c

    cdef int _advance_top(self) except -1:
        if self._fill(self._heap[0]):
            self._down(0)
        else:
            self._n -= 1
            if self._n:
                self._heap[0] = self._heap[self._n]
                self._down(0)
        return 0

    def __dealloc__(self):
        PyMem_Free(self._heap)

    def __iter__(self):
        return self

    def __next__(self):
        cdef tuple ent
        cdef bytes key
        cdef uint64_t exp
        while self._n:
            ent = <tuple>self._heads[self._heap[0]]
            key = <bytes>ent[0]
            self._advance_top()
            while self._n and _cmp(<bytes>(<tuple>self._heads[self._heap[0]])[0], key) == 0:
                self._advance_top()  # an older version of the same key: shadowed
            if not self._live:
                return ent
            if ent[1] != KIND_PUT:
                continue
            exp = ent[3]
            if exp != 0 and exp <= self._now:
                continue
            return (key, ent[2])
        raise StopIteration


# -- memtables -------------------------------------------------------------------------------

MEMTABLE_OVERHEAD = 96  # per-entry bookkeeping estimate (dict slot, tuple, bytes headers)


cdef class Memtable:
    """The in-memory image of one WAL generation (contract in memtable.py): a dict key ->
    (kind, value, expire_at_ms) holding the *last* entry the WAL has for each key, tombstones
    included, and a sorted key list built lazily for scans and flushes (appends in key order
    keep it valid without a sort)."""

    cdef readonly object gen
    cdef dict _data
    cdef list _sorted        # None when it must be rebuilt
    cdef public long long approx_bytes   # memory this table holds (estimate)
    cdef public long long user_bytes     # key+value bytes ever applied: WA's denominator
    cdef public long long records

    def __init__(self, gen):
        self.gen = gen
        self._data = {}
        self._sorted = []
        self.approx_bytes = 0
        self.user_bytes = 0
        self.records = 0

    def __len__(self):
        return len(self._data)

    cpdef apply(self, int kind, bytes key, bytes value, uint64_t expire_at_ms):
        cdef object old = self._data.get(key)
        cdef Py_ssize_t n
        if old is None:
            if self._sorted is not None:
                n = len(self._sorted)
                if n == 0 or _cmp(key, <bytes>self._sorted[n - 1]) > 0:
                    self._sorted.append(key)
                else:
                    self._sorted = None
            self.approx_bytes += PyBytes_GET_SIZE(key) + MEMTABLE_OVERHEAD
        else:
            self.approx_bytes -= PyBytes_GET_SIZE(<bytes>(<tuple>old)[1])
        self._data[key] = (kind, value, expire_at_ms)
        self.approx_bytes += PyBytes_GET_SIZE(value)
        self.user_bytes += PyBytes_GET_SIZE(key) + PyBytes_GET_SIZE(value)
        self.records += 1

    def apply_all(self, entries):
        """apply() each (kind, key, value, expire) of ``entries`` in order."""
        for e in entries:
            self.apply(e[0], e[1], e[2], e[3])

    cpdef get(self, bytes key):
        """The newest entry (kind, value, expire) for key -- a tombstone is an entry -- or None."""
        return self._data.get(key)

    cdef list _keys(self):
        if self._sorted is None:
            self._sorted = sorted(self._data)
        return self._sorted

    def items(self, bytes start=None, bytes stop=None):
        """A snapshot list of (key, kind, value, expire) with start <= key < stop, in key order,
        tombstones included. A list: the caller may go on while new records are applied."""
        import bisect
        keys = self._keys()
        lo = 0 if start is None else bisect.bisect_left(keys, start)
        hi = len(keys) if stop is None else bisect.bisect_left(keys, stop)
        data = self._data
        out = []
        for k in keys[lo:hi]:
            s = <tuple>data[k]
            out.append((k, s[0], s[1], s[2]))
        return out

    def iter_entries(self):
        """(key, kind, value, expire) of every entry in key order, for a flush."""
        return iter(self.items())


# -- the shared page: change counter and WAL append lock ---------------------------------------

cdef extern from "lsm/accel.h":
    ctypedef struct pthread_mutex_t:
        pass
    int shmkv_page_mutex_init(pthread_mutex_t *m) nogil
    int shmkv_page_trylock(pthread_mutex_t *m) nogil
    int shmkv_page_lock_blocking(pthread_mutex_t *m) nogil
    int pthread_mutex_unlock(pthread_mutex_t *m) nogil
    int EBUSY

cdef extern from "unistd.h" nogil:
    ssize_t c_write "write"(int fd, const void *buf, size_t n)
    int ftruncate(int fd, long length)

cdef extern from "errno.h":
    int errno
    int EINTR

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

PAGE_MAGIC = b"SHMKVPAG"
PAGE_VERSION = 1


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


cdef extern from "signal.h" nogil:
    int kill(int pid, int sig)
    int SIGKILL
cdef extern from "unistd.h" nogil:
    int getpid()


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
      next locker, counted in ``owner_deaths``). Rejected: flock on the WAL, which costs two
      system calls per append (the uncontended mutex costs none).

    The page is (re)initialised, under flock of the file, when it is new or its stamp (boot id
    and inode) is not this boot's and this file's: after a reboot or a copy nobody can hold its
    lock, and a mutex state from another boot would otherwise block forever.
    """

    cdef char *_page
    cdef uint64_t *_word
    cdef pthread_mutex_t *_mutex
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

    def append(self, int fd, bytes data not None, long long start, uint64_t seen):
        """The whole locked append, when nothing changed since ``seen``: lock; if the counter
        still equals ``seen``, append_locked() and unlock, returning the counter after. Returns
        0 (nothing written, lock released) when the counter moved: the caller must catch up."""
        self._lock()
        if shmkv_epoch_load(self._word) != seen:
            pthread_mutex_unlock(self._mutex)
            self._held -= 1
            return 0
        try:
            return self._append_locked(fd, data, start)
        finally:
            pthread_mutex_unlock(self._mutex)
            self._held -= 1

    def append_locked(self, int fd, bytes data not None, long long start):
        """REQUIRES: the lock, and ``start`` is the end of ``fd``'s last whole record. Bump the
        counter, write ``data`` at the end of ``fd``, bump again; return the counter after.
        A failed write is cut back to ``start`` and raised as OSError (counter bumped)."""
        if self._word == NULL:
            raise ValueError("shared page closed")
        return self._append_locked(fd, data, start)

    cdef uint64_t _append_locked(self, int fd, bytes data, long long start) except? 0:
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

    def __dealloc__(self):
        self.close()
