# Data blocks: search and decode, every bound checked.
# Included into ext/_lsm.pyx (one module, shmkv.lsm._accel); its cimports and the
# constants of the stored layout are there.

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
