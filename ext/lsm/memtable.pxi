# Memtables: a process's private copy of a WAL generation.
# Included into ext/_lsm.pyx (one module, shmkv.lsm._accel); its cimports and the
# constants of the stored layout are there.

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
