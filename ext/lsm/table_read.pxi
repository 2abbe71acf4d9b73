# Reading tables: the block cache, block reads, the index search, TableIter.
# Included into ext/_lsm.pyx (one module, shmkv.lsm._accel); its cimports and the
# constants of the stored layout are there.

# -- reading tables ---------------------------------------------------------------------------

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
    cdef Py_ssize_t lo = _lower_bound(last, key)
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
        cdef Py_ssize_t lo = 0 if start is None else _lower_bound(last, start)
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
