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
    /* The last chunk this process replaced: UNLINKED, still on its class's LRU. It is freed
     * at this process's next allocation in that class, under the class lock that allocation
     * takes anyway, so a replacing put costs one class lock, not two. A crash leaves it
     * UNLINKED, which eviction and repair free. */
    uint32_t pending, pending_cls;
    /* Tests only: SIGKILL this process on reaching crash point `crash_at` (see CRASH_POINT
     * uses), to prove each window of each lock is survivable. 0 = off. */
    int crash_at;
} store_t;

typedef struct {
    uint64_t size;
    uint32_t max_key;
    uint32_t max_item;
    uint32_t growth_x1000;
    uint32_t nstripes;
    uint32_t codec;
    uint32_t codec_arg;
} create_params_t;

/* segment.c */
uint64_t shmkv_min_size(void);
int shmkv_init_segment(char *base, const create_params_t *p, char *err, size_t errlen);
int shmkv_open(store_t *st, char *base, uint64_t size, int lockfd);
int shmkv_register(store_t *st);   /* claim a process slot; reclaims a dead owner's leftovers */
void shmkv_unregister(store_t *st);
int shmkv_slot_alive(store_t *st, uint32_t slot);
uint64_t shmkv_now_ms(void);

/* lock.c: 0 = acquired, 1 = acquired from a dead owner (caller repairs, then calls
 * shmkv_lock_consistent), <0 = error */
int shmkv_lock(store_t *st, pthread_mutex_t *m);
void shmkv_lock_consistent(pthread_mutex_t *m);
int shmkv_trylock(pthread_mutex_t *m); /* 0, 1 (dead owner) or EBUSY */
void shmkv_unlock(pthread_mutex_t *m);
int shmkv_init_mutex(pthread_mutex_t *m);

/* slab.c */
int shmkv_class_for(store_t *st, uint32_t itemsize);
int shmkv_class_lock(store_t *st, uint32_t cls);
void shmkv_class_unlock(store_t *st, uint32_t cls);
int shmkv_alloc_locked(store_t *st, uint32_t cls, uint32_t held_stripe, uint32_t *out);
void shmkv_free_locked(store_t *st, uint32_t cls, uint32_t off);
void shmkv_free_pending(store_t *st);
void shmkv_free_unlinked(store_t *st, uint32_t cls, uint32_t off);
void shmkv_repair_class_locked(store_t *st, uint32_t cls);
int shmkv_reclaim_dead_inflight(store_t *st);

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
int shmkv_clear(store_t *st);
/* Copies the live keys of stripe s into a new list: keys (with_values=0), (key, value)
 * pairs (1), or (key, value, expire_ms) triples (2). */
PyObject *shmkv_scan_stripe(store_t *st, uint32_t s, int with_values);
uint64_t shmkv_count(store_t *st);
PyObject *shmkv_through(store_t *st, const char *k, size_t klen, int write, PyObject *fn, int *err);

/* verify.c: stops the world, checks every structure, reclaims orphans of dead writers,
 * appends a string per problem to `problems` (a Python list). */
int shmkv_verify(store_t *st, PyObject *problems);
int shmkv_chunk_class(store_t *st, uint32_t off);
void shmkv_repair_stripe_locked(store_t *st, uint32_t s);
void shmkv_repair_pages_locked(store_t *st);

/* hash.c */
uint64_t shmkv_hash(const void *key, size_t len, uint64_t seed);

static inline item_t *shmkv_item(store_t *st, uint32_t off) {
    return (item_t *)(st->base + (uint64_t)off * SHMKV_UNIT);
}
static inline uint32_t shmkv_off(store_t *st, const void *p) {
    return (uint32_t)(((const char *)p - st->base) / SHMKV_UNIT);
}
static inline slot_t *shmkv_me(store_t *st) { return &st->slots[st->slot]; }
#define CRASH_POINT(st, n) \
    do { if ((st)->crash_at == (n)) shmkv_crash_now(); } while (0)
void shmkv_crash_now(void);

#define STAT(st, k) \
    do { if ((st)->slot < SHMKV_MAX_SLOTS) shmkv_me(st)->stats[(k)]++; } while (0)

#endif
