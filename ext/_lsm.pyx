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

Layout (uvloop's loop.pyx): one module, its code ``include``\ d by job from ext/lsm/*.pxi --
wal_records, bloom (with Probe, the lookup path), block, table_read, table_build, merge,
memtable, shared_page, tail (the write fast path). This file holds what they all share: the
cimports (POSIX ones from ext/includes/posix.pxd), the constants of the stored layout and key
order (``_cmp``, ``_lower_bound``).
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcmp, memcpy, memset
from cpython.bytes cimport (PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE,
                            PyBytes_CheckExact)
from cpython.long cimport PyLong_AsUnsignedLongLongMask
from cpython.ref cimport PyObject, Py_DECREF
from cpython.exc cimport PyErr_Occurred
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.list cimport PyList_GET_SIZE

from includes.posix cimport (EINTR, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, SIGKILL,
                             c_write, errno, ftruncate, getpid, kill, mmap, munmap, pread)

import mmh3

from shmkv.errors import Corruption as _Corruption
from shmkv.lsm.errors import io_error as _io_error  # OSError -> DiskFull / FileAccessError

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
    PAGE_GROUP = 192   # offset of the group-commit words (gc_words_t, ext/lsm/group_commit.h)

cdef object _hash64 = mmh3.hash64


# -- key order, shared by every part ------------------------------------------------------------

cdef inline int _cmp(bytes a, bytes b) noexcept:
    cdef Py_ssize_t na = PyBytes_GET_SIZE(a), nb = PyBytes_GET_SIZE(b)
    cdef int c = memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), na if na < nb else nb)
    if c:
        return c
    return (na > nb) - (na < nb)


cdef inline Py_ssize_t _lower_bound(list keys, bytes key) noexcept:
    """The first ``i`` with ``keys[i] >= key`` (``len(keys)`` if none): binary search of a sorted
    list of bytes. Over a table's index (``last_keys``) it is the one block that may hold
    ``key``; over a level's ``largest`` keys, the one table."""
    cdef Py_ssize_t lo = 0, hi = PyList_GET_SIZE(keys), mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if _cmp(<bytes>keys[mid], key) < 0:
            lo = mid + 1
        else:
            hi = mid
    return lo


def crc32(data, uint32_t crc=0):
    """zlib.crc32, in this module's C (tests compare the two)."""
    cdef const uint8_t[::1] mv = data
    return shmkv_crc32(crc, &mv[0] if mv.shape[0] else NULL, mv.shape[0])


include "lsm/wal_records.pxi"
include "lsm/bloom.pxi"
include "lsm/block.pxi"
include "lsm/table_read.pxi"
include "lsm/table_build.pxi"
include "lsm/merge.pxi"
include "lsm/memtable.pxi"
include "lsm/shared_page.pxi"
include "lsm/tail.pxi"
