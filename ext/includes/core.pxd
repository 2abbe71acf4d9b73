# C declarations of the shared-memory core (ext/core/core.h, ext/core/layout.h).
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from cpython.object cimport PyObject


cdef extern from "core/core.h":
    enum:
        SHMKV_OK
        SHMKV_ENOTFOUND
        SHMKV_EKEYLEN
        SHMKV_EVALLEN
        SHMKV_EFULL
        SHMKV_ENOTNUM
        SHMKV_EOVERFLOW
        SHMKV_ELOCK
        SHMKV_EEXISTS
        SHMKV_EPYTHON
        SHMKV_EIDXFULL
        SHMKV_ENOMEM
        SHMKV_ECORRUPT
        SHMKV_SCAN_BYTES
        SHMKV_LAYOUT_VERSION
        SHMKV_MAX_SLOTS
        SHMKV_ITEM_HDR
        SHMKV_PAGE_UNASSIGNED
        SHMKV_TIER_PATH_MAX
        CP__END
        ENGINE_HASH
        ENGINE_BTREE
        ST_GETS
        ST_HITS
        ST_MISSES
        ST_PUTS
        ST_DELETES
        ST_EVICTIONS
        ST_EXPIRED
        ST_RECLAIMED
        ST_AUTOMOVES
        ST_REPAIRS
        ST_LOCK_WAITS
        ST_FULL
        ST_WAITS
        ST_WAIT_MAX_US
        ST_SCAN_RETRIES
        ST_SCAN_LOCKED
        ST_TREE_LATCHED
        ST_TREE_LOCKED
        LK__COUNT
        ST__COUNT

    const uint64_t SHMKV_MAGIC

    ctypedef struct slot_t:
        uint32_t pid
        uint32_t gen
        uint32_t inflight
        uint64_t stats[24]

    ctypedef struct class_t:
        uint32_t size
        uint32_t per_page
        uint64_t free_count
        uint64_t used
        uint64_t pages
        uint64_t evictions
        uint64_t allocs
        uint64_t reclaimed

    ctypedef struct pagemeta_t:
        uint16_t cls
        uint32_t used

    ctypedef struct header_t:
        uint64_t magic
        uint32_t layout_version
        uint64_t total_size
        uint64_t page_size
        uint32_t npages
        uint32_t nclasses
        uint32_t nbuckets
        uint32_t nstripes
        uint32_t max_key
        uint32_t max_item
        uint32_t growth_x1000
        uint32_t codec
        uint32_t codec_arg
        uint64_t created_ms
        uint64_t seed
        uint64_t retired[24]
        uint64_t init_done
        int64_t nitems
        uint32_t tier
        uint32_t tier_interval_ms
        uint32_t tier_path_len
        char tier_path[1]
        uint32_t engine
        uint32_t nnodes
        uint32_t tree_height
        uint32_t tree_nfree
        uint64_t tree_keys
        uint64_t tree_rebuilds
        uint32_t tree_pages

    ctypedef struct store_t:
        char *base
        uint64_t size
        header_t *hdr
        slot_t *slots
        class_t *classes
        pagemeta_t *pagemeta
        uint32_t slot
        int lockfd
        int last_errno
        int crash_at
        int crash_sig

    ctypedef struct create_params_t:
        uint64_t size
        uint32_t max_key
        uint32_t max_item
        uint32_t growth_x1000
        uint32_t nstripes
        uint32_t codec
        uint32_t codec_arg
        uint32_t tier
        uint32_t tier_interval_ms
        uint32_t tier_path_len
        const char *tier_path
        uint32_t engine

    int shmkv_init_segment(char *base, const create_params_t *p, char *err, size_t errlen)
    int shmkv_open(store_t *st, char *base, uint64_t size, int lockfd)
    int shmkv_register(store_t *st)
    void shmkv_unregister(store_t *st)
    int shmkv_slot_alive(store_t *st, uint32_t slot)
    uint64_t shmkv_now_ms()
    void shmkv_free_kept(store_t *st)

    PyObject *shmkv_get(store_t *st, const char *k, size_t klen, int *err)
    PyObject *shmkv_get_hashed(store_t *st, const char *k, size_t klen, uint64_t hv, int *err)
    uint64_t shmkv_prefetch_bucket(store_t *st, const char *k, size_t klen)
    void shmkv_prefetch_item(store_t *st, uint64_t hv)
    int shmkv_contains(store_t *st, const char *k, size_t klen)
    int shmkv_put(store_t *st, const char *k, size_t klen, const char *v, size_t vlen,
                  uint64_t expire_ms, int only_if_absent)
    int shmkv_put_hashed(store_t *st, const char *k, size_t klen, const char *v, size_t vlen,
                         uint64_t expire_ms, int only_if_absent, uint64_t hv)
    int shmkv_delete(store_t *st, const char *k, size_t klen)
    int shmkv_incr(store_t *st, const char *k, size_t klen, int64_t delta, int64_t *out)
    int shmkv_counter_add(const char *cur, size_t n, int64_t delta, int64_t *out)
    int shmkv_clear(store_t *st)
    object shmkv_scan_stripe(store_t *st, uint32_t s, int with_values)
    uint64_t shmkv_count(store_t *st)
    uint32_t shmkv_locks_held_by(store_t *st, uint32_t tid)
    const char *shmkv_crash_point_name(int n)
    uint32_t shmkv_stripe_of(store_t *st, uint64_t h)
    uint64_t shmkv_hash(const void *key, size_t len, uint64_t seed)
    PyObject *shmkv_through(store_t *st, const char *k, size_t klen, int write, object fn, int *err)
    int shmkv_cas(store_t *st, const char *k, size_t klen, const char *expected, size_t elen,
                  int expect_absent, const char *v, size_t vlen, uint64_t expire_ms)
    int shmkv_verify(store_t *st, object problems)
    ctypedef struct shmkv_scanbuf_t:
        char *buf
        size_t used
        size_t cap
        size_t last
        uint32_t count
        int done
    int shmkv_tree_fill(store_t *st, const char *lo, size_t lolen, int lo_incl, const char *hi,
                        size_t hilen, int hi_incl, int reverse, uint32_t max, shmkv_scanbuf_t *o)
