# WAL records: framing (13-byte head, CRC-32) and batch payloads (format.py).
# Included into ext/_lsm.pyx (one module, shmkv.lsm._accel); its cimports and the
# constants of the stored layout are there.

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
    return _encode_put(kind, key, value, expire)


cdef bytes _encode_put(int kind, bytes key, bytes value, uint64_t expire):
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


def find_record(buf, Py_ssize_t start, uint64_t max_record):
    """Offset of the first position >= ``start`` of ``buf`` where a whole, valid WAL record
    begins (known type, length <= ``max_record`` and within ``buf``, head crc, data crc), or -1.

    The resynchronisation of ``wal_recovery="skip"`` after a record whose header is bad (so its
    length cannot be trusted): a false match needs two independent 32-bit checksums to agree by
    chance. One pass over ``buf`` with the data crc computed only where the head crc matched,
    so it stays linear in practice. Rejected: LevelDB's fixed 32 KiB blocks, which bound the
    search but would change the stored layout."""
    cdef const uint8_t[::1] mv = buf
    cdef Py_ssize_t n = mv.shape[0], pos, found = -1
    cdef const uint8_t *b
    cdef uint32_t length
    cdef uint8_t t
    if start < 0:
        start = 0
    if n - start < REC_HEAD:
        return -1
    b = &mv[0]
    with nogil:
        for pos in range(start, n - REC_HEAD + 1):
            t = b[pos + 4]
            if t != 1 and t != 2:  # REC_BATCH, REC_SEAL
                continue
            length = shmkv_ld32(b + pos)
            if length > max_record or <uint64_t>length > <uint64_t>(n - pos - REC_HEAD):
                continue
            if shmkv_crc32(0, b + pos, 5) != shmkv_ld32(b + pos + 5):
                continue
            if shmkv_crc32(0, b + pos + REC_HEAD, length) != shmkv_ld32(b + pos + 9):
                continue
            found = pos
            break
    return found
