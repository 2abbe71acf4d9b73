# Merging: k-way merge of sorted sources, newest version per key.
# Included into ext/_lsm.pyx (one module, shmkv.lsm._accel); its cimports and the
# constants of the stored layout are there.

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
