# Building tables: BlockBuilder (the data block being built).
# Included into ext/_lsm.pyx (one module, shmkv.lsm._accel); its cimports and the
# constants of the stored layout are there.

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
