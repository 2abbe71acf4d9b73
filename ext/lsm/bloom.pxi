# Bloom filters (build, probe) and Probe: one version's lookup path over memtables and tables.
# Included into ext/_lsm.pyx (one module, shmkv.lsm._accel); its cimports and the
# constants of the stored layout are there.

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
        cdef Py_ssize_t lo, lvl
        out = []
        for row in self._l0:
            if _cmp(<bytes>row[0], key) <= 0 and _cmp(key, <bytes>row[1]) <= 0:
                if self._admits(row, key, h, &hashed):
                    out.append(row[2])
        for lvl in range(len(self._rows)):
            largest = <list>self._largest[lvl]
            lo = _lower_bound(largest, key)
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
