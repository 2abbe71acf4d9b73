/* core.h -- the C API of the shared-memory store, called by ext/_core.pyx.
 *
 * Thread and process safety: every function may be called concurrently from any thread
 * of any attached process, with the GIL held; a function that has to wait for a lock
 * releases the GIL for the wait (lock.c). Functions named *_locked REQUIRE the lock that
 * their comment names; the others take what they need.
 *
 * Errors are returned as negative SHMKV_E* codes; the Cython layer turns them into
 * exceptions deriving from shmkv.Error.
 */
#ifndef SHMKV_CORE_H
#define SHMKV_CORE_H

#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"
#include "robust_mutex.h" /* shmkv_robust_mutex_init */

enum {
    SHMKV_OK = 0,
    SHMKV_ENOTFOUND = -1,
    SHMKV_EKEYLEN = -2,
    SHMKV_EVALLEN = -3,
    SHMKV_EFULL = -4,
    SHMKV_ENOTNUM = -5,
    SHMKV_EOVERFLOW = -6,
    SHMKV_ELOCK = -7,   /* a pthread call failed unexpectedly (errno in st->last_errno) */
    SHMKV_EEXISTS = -8, /* add(): key present */
    SHMKV_EPYTHON = -9, /* a Python exception is set */
    SHMKV_EBUSY = -10,  /* internal (eviction): every candidate was busy; never leaves C */
    SHMKV_EIDXFULL = -11, /* engine "btree": the node region is full (a new key; btree.c) */
    SHMKV_ENOMEM = -12,   /* engine "btree": a scan buffer could not grow */
    SHMKV_ECORRUPT = -13, /* engine "btree": the index could not be rebuilt from the chains */
};

/* One process's view of an attached segment. Not shared: lives in process memory. */
typedef struct {
    char *base;
    uint64_t size;
    header_t *hdr;
    slot_t *slots;
    class_t *classes;
    shlock_t *stripes;
    pagemeta_t *pagemeta;
    uint32_t *buckets;
    char *pages;
    uint32_t slot;   /* this process's slot index */
    int lockfd;      /* fcntl byte locks: byte i held by the live process in slot i */
    uint32_t pid;    /* getpid(), refreshed at registration (a forked child re-registers) */
    int last_errno;
    uint32_t bucket_mask, stripe_mask;
    /* Tests only: SIGKILL this process on reaching crash point `crash_at` (CP_*, see
     * SHMKV_CRASH_POINTS), to prove each window of each lock is survivable. 0 = off. With crash_sig =
     * SIGSTOP it stops instead, once (crash_at is reset), to prove a paused process holds
     * no more than that point's locks. */
    int crash_at;
    int crash_sig;
} store_t;

typedef struct {
    uint64_t size;
    uint32_t max_key;
    uint32_t max_item;
    uint32_t growth_x1000;
    uint32_t nstripes;
    uint32_t codec;
    uint32_t codec_arg;
    uint32_t tier;             /* TIER_* (layout.h) */
    uint32_t tier_interval_ms;
    uint32_t tier_path_len;    /* <= SHMKV_TIER_PATH_MAX, checked by the caller */
    const char *tier_path;
    uint32_t engine;           /* ENGINE_* (layout.h) */
} create_params_t;

/* segment.c */
uint64_t shmkv_min_size(void);
int shmkv_init_segment(char *base, const create_params_t *p, char *err, size_t errlen);
int shmkv_open(store_t *st, char *base, uint64_t size, int lockfd);
int shmkv_register(store_t *st);   /* claim a process slot; reclaims a dead owner's leftovers */
void shmkv_unregister(store_t *st);
int shmkv_reg_lock(store_t *st);   /* the registry lock (reg_lock): 0, or <0 */
void shmkv_reg_unlock(store_t *st);
int shmkv_slot_alive(store_t *st, uint32_t slot);
uint64_t shmkv_now_ms(void);

/* lock.c: 0 = acquired, 1 = acquired from a dead owner (caller repairs, then calls
 * shmkv_lock_consistent), <0 = error */
int shmkv_lock(store_t *st, pthread_mutex_t *m, int kind); /* kind: LK_*, for the stats */
void shmkv_lock_consistent(pthread_mutex_t *m);
int shmkv_trylock(pthread_mutex_t *m); /* 0, 1 (dead owner) or EBUSY */
void shmkv_unlock(pthread_mutex_t *m);

/* slab.c */
int shmkv_class_for(store_t *st, uint32_t itemsize);
int shmkv_class_lock(store_t *st, uint32_t cls);
void shmkv_class_unlock(store_t *st, uint32_t cls);
int shmkv_alloc_locked(store_t *st, uint32_t cls, uint32_t held_stripe, uint32_t *out);
void shmkv_free_locked(store_t *st, uint32_t cls, uint32_t off);
void shmkv_free_kept(store_t *st);
void shmkv_free_unlinked(store_t *st, uint32_t cls, uint32_t off);
int shmkv_free_inflight_of(store_t *st, uint32_t slot, uint32_t off);
int shmkv_take_kept(store_t *st, uint32_t cls, uint32_t *out);
int shmkv_steal_kept_locked(store_t *st, item_t *it, uint32_t off); /* REQUIRES: the chunk's class lock */
void shmkv_keep_replaced(store_t *st, uint32_t off);

/* lru.c (REQUIRE the class lock) */
void shmkv_list_push_head(store_t *st, class_t *c, item_t *it, uint32_t off, int which);
void shmkv_list_remove(store_t *st, class_t *c, item_t *it, uint32_t off);
int shmkv_evict_locked(store_t *st, uint32_t cls, uint32_t held_stripe, uint32_t *out);

/* table.c */
uint32_t shmkv_stripe_of(store_t *st, uint64_t h);
int shmkv_stripe_lock(store_t *st, uint32_t s);
void shmkv_stripe_unlock(store_t *st, uint32_t s);
int shmkv_unlink_from_chain_locked(store_t *st, item_t *it, uint32_t off);
int shmkv_unlink_victim(store_t *st, item_t *it, uint32_t off, uint32_t held_stripe);
PyObject *shmkv_get(store_t *st, const char *k, size_t klen, int *err);
PyObject *shmkv_get_hashed(store_t *st, const char *k, size_t klen, uint64_t hv, int *err);
uint64_t shmkv_prefetch_bucket(store_t *st, const char *k, size_t klen);
void shmkv_prefetch_item(store_t *st, uint64_t hv);
int shmkv_contains(store_t *st, const char *k, size_t klen);
int shmkv_put(store_t *st, const char *k, size_t klen, const char *v, size_t vlen,
              uint64_t expire_ms, int only_if_absent);
int shmkv_put_hashed(store_t *st, const char *k, size_t klen, const char *v, size_t vlen,
                     uint64_t expire_ms, int only_if_absent, uint64_t hv);
int shmkv_delete(store_t *st, const char *k, size_t klen);
int shmkv_incr(store_t *st, const char *k, size_t klen, int64_t delta, int64_t *out);
int shmkv_counter_add(const char *cur, size_t n, int64_t delta, int64_t *out); /* incr's rule */
int shmkv_clear(store_t *st);
/* Copies the live keys of stripe s into a new list: keys (with_values=0), (key, value)
 * pairs (1), or (key, value, expire_ms) triples (2). */
PyObject *shmkv_scan_stripe(store_t *st, uint32_t s, int with_values);
uint64_t shmkv_count(store_t *st);
PyObject *shmkv_through(store_t *st, const char *k, size_t klen, int write, PyObject *fn, int *err);
/* 1: stored (the value was `expected`, or absent with expect_absent), 0: mismatch, <0 error */
int shmkv_cas(store_t *st, const char *k, size_t klen, const char *expected, size_t elen,
              int expect_absent, const char *v, size_t vlen, uint64_t expire_ms);

/* verify.c: checks every structure holding one lock at a time, reclaims orphans of dead writers,
 * appends a string per problem to `problems` (a Python list). */
int shmkv_verify(store_t *st, PyObject *problems);

/* repair.c: every crash repair. The *_locked ones REQUIRE the lock they name, taken from a
 * dead owner (or found broken by verify); the caller marks the mutex consistent after. */
void shmkv_repair_stripe_locked(store_t *st, uint32_t s);
void shmkv_repair_class_locked(store_t *st, uint32_t cls);
void shmkv_repair_pages_locked(store_t *st);
void shmkv_reclaim_slot_inflight_locked(store_t *st, uint32_t slot); /* REQUIRES: reg_lock */
int shmkv_reclaim_dead_inflight(store_t *st);                       /* takes reg_lock */

/* btree.c: the ordered index of engine "btree" (see btree.c for the design). */
int shmkv_tree_lock(store_t *st);   /* the tree mutex + every leaf latch: 0, or <0; rebuilds the index if a holder died */
void shmkv_tree_unlock(store_t *st);
int shmkv_tree_room_locked(store_t *st); /* nonzero if an insert cannot run out of nodes */
void shmkv_tree_upsert_locked(store_t *st, const char *k, size_t klen, uint32_t off);
/* A put's hold on the index (btree.c): the latch of the key's leaf (mode 1) or the tree lock
 * (mode 2). wbegin REQUIRES the key's stripe; wput the hold, for the same key. */
typedef struct {
    int mode; /* 0 none, 1 leaf latch, 2 tree lock */
    int eq;   /* mode 1: the leaf has the key, at pos */
    uint32_t latch, leaf, pos;
    uint32_t sepn, sepi; /* mode 1, an overwrite of a first entry: the inner node and key copying it */
} shmkv_tree_w_t;
int shmkv_tree_wbegin(store_t *st, const char *k, size_t klen, shmkv_tree_w_t *w); /* 0, or <0 */
void shmkv_tree_wput(store_t *st, shmkv_tree_w_t *w, const char *k, size_t klen, uint32_t off);
int shmkv_tree_dbegin(store_t *st, const char *k, size_t klen, uint32_t off, shmkv_tree_w_t *w);
void shmkv_tree_wdel(store_t *st, shmkv_tree_w_t *w, const char *k, size_t klen, uint32_t off);
void shmkv_tree_wend(store_t *st, shmkv_tree_w_t *w);
void shmkv_tree_delete_locked(store_t *st, const char *k, size_t klen, uint32_t off);
void shmkv_tree_rebuild_locked(store_t *st);
void shmkv_tree_invalidate(store_t *st); /* takes the tree lock and rebuilds (after a chain cut) */
int shmkv_tree_init(char *base, header_t *h); /* at creation */
/* REQUIRES: no lock but `held_stripe`. More nodes for the index: a slab page (an unassigned
 * one, else one emptied by evicting its items, never the page of `mine`: the caller's chunk
 * IN FLIGHT) becomes nodes. 0, or -1 when none can be had. */
int shmkv_tree_grow(store_t *st, uint32_t held_stripe, uint32_t mine);
int shmkv_page_for_nodes(store_t *st, uint32_t held_stripe, uint32_t mine); /* slab.c, for the above */
void shmkv_backoff(int attempt); /* slab.c: yield, then sleep 50 us doubling to 2 ms (GIL released) */
/* A scan's private copy of one batch: `count` pairs, each [klen u32][vlen u32][key][value],
 * in `used` bytes of `buf` (PyMem_Raw; the owner frees it), the last one at byte `last`.
 * `done`: the range is exhausted. */
typedef struct {
    char *buf;
    size_t used, cap, last;
    uint32_t count;
    int done;
} shmkv_scanbuf_t;
/* a batch stops once it holds this many bytes (big values: memory stays bounded) */
#define SHMKV_SCAN_BYTES (256u * 1024u)
/* Copies up to `max` live (key, value) pairs in key order (reverse: descending) with lo <(=)
 * key <(=) hi (NULL: unbounded) into `o` (maybe fewer though more keys follow: o->done says
 * whether the range is exhausted), read without a lock (btree.c). 0, SHMKV_ENOMEM,
 * SHMKV_ELOCK (errno in st->last_errno) or SHMKV_ECORRUPT. Makes no Python object. */
int shmkv_tree_fill(store_t *st, const char *lo, size_t lolen, int lo_incl, const char *hi, size_t hilen,
                    int hi_incl, int reverse, uint32_t max, shmkv_scanbuf_t *o);
int shmkv_tree_verify(store_t *st, PyObject *problems);
static inline int shmkv_is_btree(store_t *st) { return st->hdr->engine == ENGINE_BTREE; }

/* hash.c */
uint64_t shmkv_hash(const void *key, size_t len, uint64_t seed);

static inline item_t *shmkv_item(store_t *st, uint32_t off) {
    return (item_t *)(st->base + (uint64_t)off * SHMKV_UNIT);
}
static inline uint32_t shmkv_off(store_t *st, const void *p) {
    return (uint32_t)(((const char *)p - st->base) / SHMKV_UNIT);
}
static inline slot_t *shmkv_me(store_t *st) { return &st->slots[st->slot]; }

/* Page geometry (layout.h): the page a chunk's unit offset falls in, where a page starts, and
 * whether an offset is the start of a chunk of an assigned page (its class, or -1). */
static inline uint64_t shmkv_page_of_byte(const header_t *h, uint64_t byte) {
    /* REQUIRES: byte >= h->off_pages (the caller bounds an untrusted offset first) */
    return (byte - h->off_pages) / h->page_size;
}
static inline uint32_t shmkv_page_of(store_t *st, uint32_t off) {
    return (uint32_t)shmkv_page_of_byte(st->hdr, (uint64_t)off * SHMKV_UNIT);
}
static inline char *shmkv_page_addr(store_t *st, uint32_t p) {
    return st->pages + (uint64_t)p * st->hdr->page_size;
}
static inline int shmkv_chunk_class(store_t *st, uint32_t off) {
    header_t *h = st->hdr;
    uint64_t byte = (uint64_t)off * SHMKV_UNIT;
    if (byte < h->off_pages) return -1;
    uint64_t rel = byte - h->off_pages;
    uint64_t p = rel / h->page_size;
    if (p >= h->npages) return -1;
    uint32_t cls = st->pagemeta[p].cls;
    if (cls >= h->nclasses) return -1;
    uint64_t in_page = rel % h->page_size;
    class_t *c = &st->classes[cls];
    if (in_page % c->size != 0 || in_page / c->size >= c->per_page) return -1;
    return (int)cls;
}

/* Crash points, named once here (tests only: store_t.crash_at). A process whose crash_at is
 * a point's number SIGKILLs itself on reaching CRASH_POINT(st, CP_<name>), to prove each
 * window of each lock survivable (tests/test_crash.py), or SIGSTOPs there (test_verify.py).
 * Python sees the names as shmkv._core.CRASH_POINTS ({"PUT_PUBLISHED": 4, ...}), built from
 * this list; the numbers are what Core._set_crash_point stores, nothing persistent.
 *   name               n   where: what the process holds there */
#define SHMKV_CRASH_POINTS(X)                                                                   \
    X(ALLOC_TAKEN,       1)  /* slab.c alloc: stripe + class lock; chunk taken, not listed */   \
    X(PUT_INFLIGHT,      2)  /* table.c put: stripe; the new chunk IN FLIGHT, empty */          \
    X(PUT_HALF_WRITTEN,  3)  /* table.c put: stripe; key written, value not */                  \
    X(PUT_PUBLISHED,     4)  /* table.c put: stripe; published, the old version still LINKED */ \
    X(EVICT_UNLINK,      5)  /* table.c eviction: class lock + the victim's stripe */           \
    X(PAGE_MOVING,       6)  /* slab.c page move: page lock + both class locks, page MOVING */  \
    X(REMOVE_UNLINKED,   7)  /* table.c delete/expiry: stripe; unlinked, not yet freed */       \
    X(PAGE_HALF_CUT,     8)  /* slab.c page cut: class lock; half the chunks listed */          \
    X(VERIFY_STRIPE,     9)  /* verify.c: one stripe and nothing else */                        \
    X(VERIFY_CLASS,     10)  /* verify.c: one class lock and nothing else */                    \
    X(VERIFY_PAGE_LOCK, 11)  /* verify.c: the page lock and nothing else */                \
    X(BTREE_SPLIT,      12)  /* btree.c: stripe + tree; new right node filled, not linked */    \
    X(BTREE_MERGE,      13)  /* btree.c: stripe + tree; right node copied into left, not cut */ \
    X(BTREE_ROOT_GROW,  14)  /* btree.c: stripe + tree; new root built, root not switched */ \
    X(BTREE_GROW,       15)  /* btree.c: stripe + page + tree; a page marked NODES, not listed */ \
    X(BTREE_LEAF_PUT,   16)  /* btree.c: stripe + a leaf latch; published, the leaf half changed */ \
    X(BTREE_LEAF_DEL,   17)  /* btree.c: stripe + a leaf latch; unlinked, the leaf half changed */ \
    X(KEPT_TAKEN,       18)  /* slab.c take_kept: stripe; kept chunk named in flight AND kept */ \
    X(KEEP_NAMED,       19)  /* slab.c keep_replaced: stripe; kept names the old, still LINKED */

enum {
#define SHMKV_CP_ENUM(name, n) CP_##name = n,
    SHMKV_CRASH_POINTS(SHMKV_CP_ENUM)
#undef SHMKV_CP_ENUM
    CP__END
};
#define CRASH_POINT(st, cp) \
    do { if ((st)->crash_at == (cp)) shmkv_crash_now(st); } while (0)
void shmkv_crash_now(store_t *st);
/* The name of crash point n ("PUT_PUBLISHED"), NULL if there is none: for _core.CRASH_POINTS. */
const char *shmkv_crash_point_name(int n);
/* Tests only: how many of the segment's locks the thread `tid` holds right now (glibc keeps
 * the owner's tid in the mutex word; a hint, read without the locks). */
uint32_t shmkv_locks_held_by(store_t *st, uint32_t tid);

#define STAT(st, k) \
    do { if ((st)->slot < SHMKV_MAX_SLOTS) shmkv_me(st)->stats[(k)]++; } while (0)

#endif
