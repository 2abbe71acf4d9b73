/* table.c -- the hash index: chains of items per bucket, guarded by lock stripes, and the
 * operations built on it (get, put, add, incr, delete, clear, scan).
 *
 * Bucket b is guarded by stripe b & stripe_mask. Every write of a chain, and every read of
 * one that may lead to a write, happens under that stripe. A plain get reads without it and
 * checks the stripe's sequence afterwards (a seqlock: get_unlocked), falling back to the lock
 * when a holder came in between; so a get can never return a torn or mixed value either way.
 *
 * A put that a SIGKILL may interrupt at any instruction (DESIGN.md "A put that a SIGKILL
 * can interrupt anywhere", with the write done under the stripe rather than lock-free):
 *   1. take the chunk this process kept from its last replacing put in this class (IN
 *      FLIGHT and its own already: no lock; slab.c shmkv_take_kept), or under the class
 *      lock a new one, marked IN FLIGHT for this process and put at the LRU head; either way
 *      recorded in this process's slot;
 *   2. write header, key and value into it: nobody can reach it;
 *   3. mark it LINKED and publish it with ONE aligned 4-byte store into the predecessor's
 *      link (replacing the old version in place in the chain), then mark the old version
 *      UNLINKED;
 *   4. keep the old version, IN FLIGHT and this process's, for its next put of that class
 *      (slab.c shmkv_keep_replaced): a stream of same-class overwrites takes no class lock.
 * A crash before 3 leaves an IN FLIGHT chunk whose owner is dead (reclaimed when its stripe
 * or class is repaired, or by verify); after 3 the new value is in place. Either way the
 * chain is whole and holds the old or the new value, never neither.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "core.h"

/* failed node-page grabs before a put of a new key gives up: ~70 ms with backoff()'s 2 ms cap
 * -- longer than an eviction's ~10 ms, since a grab waits on another process's whole class walk,
 * and a holder descheduled on a loaded host holds it for tens of ms (seen in CI-like runs) */
#define GROW_RETRIES 40

static inline uint32_t bucket_of(store_t *st, uint64_t h) { return (uint32_t)h & st->bucket_mask; }
uint32_t shmkv_stripe_of(store_t *st, uint64_t h) { return bucket_of(st, h) & st->stripe_mask; }

/* The stripe's sequence (layout.h shlock_t.seq), for gets that read without the lock
 * (get_unlocked below). A holder makes it odd before it may change a chain and even again
 * as it lets go, so a reader that saw the same even value before and after its reads saw
 * no change. A holder killed inside leaves it odd; the next taker (who repairs) moves it on
 * by 2, so it stays odd -- and different -- until that taker lets go. */
static inline void seq_enter(store_t *st, uint32_t s) {
    uint32_t *q = &st->stripes[s].seq, v = __atomic_load_n(q, __ATOMIC_RELAXED);
    __atomic_store_n(q, v + ((v & 1u) ? 2u : 1u), __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE); /* odd before any change to the chains */
}

static inline void seq_leave(store_t *st, uint32_t s) {
    uint32_t *q = &st->stripes[s].seq;
    __atomic_store_n(q, __atomic_load_n(q, __ATOMIC_RELAXED) + 1u, __ATOMIC_RELEASE);
}

int shmkv_stripe_lock(store_t *st, uint32_t s) {
    int rc = shmkv_lock(st, &st->stripes[s].m, LK_STRIPE);
    if (rc >= 0 && rc <= 1) seq_enter(st, s);
    if (rc == 1) {
        shmkv_repair_stripe_locked(st, s);
        shmkv_lock_consistent(&st->stripes[s].m);
        shmkv_reclaim_dead_inflight(st);
        STAT(st, ST_REPAIRS);
        rc = 0;
    }
    return rc;
}

void shmkv_stripe_unlock(store_t *st, uint32_t s) {
    seq_leave(st, s);
    shmkv_unlock(&st->stripes[s].m);
}

/* REQUIRES: stripe of bucket b. Returns the item's offset (0 if absent) and, in *pp, the
 * link that points at it (or the chain's last link when absent). */
static inline uint32_t find_locked(store_t *st, uint32_t b, const char *k, size_t klen,
                                   uint32_t h32, uint32_t **pp) {
    uint32_t *link = &st->buckets[b];
    uint32_t off = *link;
    while (off) {
        item_t *it = shmkv_item(st, off);
        if (it->hash32 == h32 && it->klen == klen && memcmp(ITEM_KEY(it), k, klen) == 0) break;
        link = &it->hnext;
        off = *link;
    }
    if (pp) *pp = link;
    return off;
}

static inline int is_expired(item_t *it) {
    return it->expire_ms && it->expire_ms <= shmkv_now_ms();
}

/* REQUIRES: the item's stripe. Removes a LINKED item from its chain; 1 if it was there. */
int shmkv_unlink_from_chain_locked(store_t *st, item_t *it, uint32_t off) {
    uint64_t hv = shmkv_hash(ITEM_KEY(it), it->klen, st->hdr->seed);
    uint32_t *link = &st->buckets[bucket_of(st, hv)];
    uint32_t steps = 0;
    while (*link && steps++ < (1u << 24)) {
        if (*link == off) {
            __atomic_store_n(link, it->hnext, __ATOMIC_RELEASE);
            it->state = IT_UNLINKED;
            return 1;
        }
        link = &shmkv_item(st, *link)->hnext;
    }
    return 0;
}

/* REQUIRES: a class lock (the caller's: eviction or a page move), and `held_stripe` if the
 * caller holds one. Takes the victim's stripe with trylock -- blocking would break the lock
 * order -- and removes it from its chain. 0: it is unreachable now; -1: its stripe is busy. */
int shmkv_unlink_victim(store_t *st, item_t *it, uint32_t off, uint32_t held_stripe) {
    uint32_t s = shmkv_stripe_of(st, shmkv_hash(ITEM_KEY(it), it->klen, st->hdr->seed));
    if (s != held_stripe) {
        int rc = shmkv_trylock(&st->stripes[s].m);
        if (rc != 0 && rc != 1) return -1;
        seq_enter(st, s);
        if (rc == 1) {
            shmkv_repair_stripe_locked(st, s);
            shmkv_lock_consistent(&st->stripes[s].m);
        }
    }
    if (__atomic_load_n(&it->state, __ATOMIC_ACQUIRE) == IT_LINKED) {
        /* btree: the unlink and the index entry's removal under the tree lock or the latch of
         * the key's leaf, before the chunk is freed (btree.c: the tree never names a freed chunk) */
        shmkv_tree_w_t w = {0};
        int bt = shmkv_is_btree(st) && shmkv_tree_dbegin(st, ITEM_KEY(it), it->klen, off, &w) == 0;
        if (shmkv_unlink_from_chain_locked(st, it, off))
            __atomic_sub_fetch(&st->hdr->nitems, 1, __ATOMIC_RELAXED);
        if (bt) {
            shmkv_tree_wdel(st, &w, ITEM_KEY(it), it->klen, off);
            shmkv_tree_wend(st, &w);
        }
    }
    CRASH_POINT(st, CP_EVICT_UNLINK);
    if (s != held_stripe) shmkv_stripe_unlock(st, s);
    return 0;
}

/* REQUIRES: stripe of the item, which *link points at. Unlinks and frees it. */
static void remove_locked(store_t *st, uint32_t *link, uint32_t off) {
    item_t *it = shmkv_item(st, off);
    shmkv_tree_w_t w = {0};
    int bt = shmkv_is_btree(st) && shmkv_tree_dbegin(st, ITEM_KEY(it), it->klen, off, &w) == 0;
    __atomic_store_n(link, it->hnext, __ATOMIC_RELEASE);
    if (bt) {
        shmkv_tree_wdel(st, &w, ITEM_KEY(it), it->klen, off);
        shmkv_tree_wend(st, &w);
    }
    it->owner = (uint16_t)(st->slot + 1);
    __atomic_store_n(&it->state, IT_UNLINKED, __ATOMIC_RELEASE);
    __atomic_sub_fetch(&st->hdr->nitems, 1, __ATOMIC_RELAXED);
    CRASH_POINT(st, CP_REMOVE_UNLINKED);
    shmkv_free_unlinked(st, it->cls, off);
}

/* Batches (get_many): a lookup is two dependent cache misses (bucket, then item). Hashing
 * every key of a batch and prefetching its bucket, then prefetching every bucket's first
 * item, overlaps those misses across the batch instead of paying them one after another.
 * Reading a bucket without its stripe here is only a hint: prefetch never faults, and the
 * real lookup happens under the lock. */
uint64_t shmkv_prefetch_bucket(store_t *st, const char *k, size_t klen) {
    uint64_t hv = shmkv_hash(k, klen, st->hdr->seed);
    uint32_t b = bucket_of(st, hv);
    __builtin_prefetch(&st->buckets[b]);
    __builtin_prefetch(&st->stripes[b & st->stripe_mask]);
    return hv;
}

void shmkv_prefetch_item(store_t *st, uint64_t hv) {
    uint32_t off = __atomic_load_n(&st->buckets[bucket_of(st, hv)], __ATOMIC_RELAXED);
    uint64_t byte = (uint64_t)off * SHMKV_UNIT;
    if (!off || byte < st->hdr->off_pages) return;
    uint64_t page = shmkv_page_of_byte(st->hdr, byte);
    if (page >= st->hdr->npages) return;
    uint32_t cls = st->pagemeta[page].cls;
    if (cls >= st->hdr->nclasses) return;
    /* the whole chunk (header, key, value), up to 2 KiB: the copy then streams from cache */
    uint32_t size = st->classes[cls].size;
    if (size > 2048) size = 2048;
    for (uint32_t i = 0; i < size; i += 64) __builtin_prefetch(st->base + byte + i);
}

PyObject *shmkv_get(store_t *st, const char *k, size_t klen, int *err) {
    return shmkv_get_hashed(st, k, klen, shmkv_hash(k, klen, st->hdr->seed), err);
}

/* Optimistic tries of a get before it takes the stripe: a try fails only when a writer of
 * the same stripe came in between, which the next try usually misses */
#define GET_TRIES 3

/* A get without the stripe lock: a seqlock read (the stripe's seq, seq_enter above). Reads
 * the chain and copies the value with no lock and no store to shared memory, then checks
 * that the stripe's seq is the even value it was before: no holder changed a chain of the
 * stripe meanwhile, and every chunk the reader went through was then still chained, whole,
 * and not reused (a chunk is rewritten only after the unlink that bumped seq). Until that
 * check what it read may be anything, so every offset and length is bounded by the mapping
 * before it is followed, and the walk re-checks seq every 32 steps (a chain seen mid-change
 * can loop; a stable one cannot). Returns 1 with *res (the value, or NULL for a miss) when the
 * read was consistent; 0 to take the lock: the seq was odd (a holder is in, or died inside:
 * the locked path repairs), changed GET_TRIES times, or the item needs a store the locked
 * path makes (expired: remove it; active bit clear: set it -- a store into a chunk that may
 * be reused once the check is past would be a store into someone else's item).
 * Why: a get's lock and unlock are two atomic writes to a line that the other cores' gets
 * and puts of that stripe write too; under two processes that line moved between the cores
 * on about every get (bench/btree_bench.py's 2-process gets: ~1.4x one). */
static int get_unlocked(store_t *st, uint32_t b, uint32_t s, const char *k, size_t klen, uint32_t h32,
                        PyObject **res) {
    const uint32_t *q = &st->stripes[s].seq;
    const uint64_t lo = st->hdr->off_pages, hi = st->size;
    for (int t = 0; t < GET_TRIES; t++) {
        uint32_t v = __atomic_load_n(q, __ATOMIC_ACQUIRE);
        if (v & 1u) return 0;
        uint32_t off = __atomic_load_n(&st->buckets[b], __ATOMIC_ACQUIRE);
        item_t *it = NULL;
        int torn = 0;
        for (uint32_t step = 1; off; step++) {
            uint64_t byte = (uint64_t)off * SHMKV_UNIT;
            if (byte < lo || byte + SHMKV_ITEM_HDR + klen > hi) { torn = 1; break; }
            item_t *x = shmkv_item(st, off);
            if (x->hash32 == h32 && x->klen == klen && memcmp(ITEM_KEY(x), k, klen) == 0) { it = x; break; }
            off = __atomic_load_n(&x->hnext, __ATOMIC_RELAXED);
            if ((step & 31u) == 0 && __atomic_load_n(q, __ATOMIC_ACQUIRE) != v) { torn = 1; break; }
        }
        if (torn) continue;
        PyObject *r = NULL;
        if (it) {
            uint32_t vlen = it->vlen;
            if (!it->active || (it->expire_ms && it->expire_ms <= shmkv_now_ms())) return 0;
            if (vlen > st->hdr->max_item || (uint64_t)off * SHMKV_UNIT + SHMKV_ITEM_HDR + klen + vlen > hi)
                continue; /* torn: a consistent item never is */
            r = PyBytes_FromStringAndSize(ITEM_VAL(it), vlen);
            if (!r) return 0; /* out of memory: the locked path reports it */
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE); /* every read above before the check */
        if (__atomic_load_n(q, __ATOMIC_RELAXED) == v) {
            *res = r;
            return 1;
        }
        Py_XDECREF(r);
    }
    return 0;
}

PyObject *shmkv_get_hashed(store_t *st, const char *k, size_t klen, uint64_t hv, int *err) {
    uint32_t b = bucket_of(st, hv), s = b & st->stripe_mask;
    uint32_t *link;
    PyObject *res = NULL;
    if (get_unlocked(st, b, s, k, klen, (uint32_t)(hv >> 32), &res)) {
        STAT(st, ST_GETS);
        if (res) STAT(st, ST_HITS);
        else {
            STAT(st, ST_MISSES);
            *err = SHMKV_ENOTFOUND;
        }
        return res;
    }
    int rc = shmkv_stripe_lock(st, s);
    if (rc < 0) {
        *err = rc;
        return NULL;
    }
    uint32_t off = find_locked(st, b, k, klen, (uint32_t)(hv >> 32), &link);
    STAT(st, ST_GETS);
    if (off) {
        item_t *it = shmkv_item(st, off);
        if (it->expire_ms && is_expired(it)) {
            remove_locked(st, link, off);
            STAT(st, ST_EXPIRED);
        } else {
            if (!it->active) it->active = 1;
            res = PyBytes_FromStringAndSize(ITEM_VAL(it), it->vlen);
            if (!res) *err = SHMKV_EPYTHON;
        }
    }
    shmkv_stripe_unlock(st, s);
    if (res) STAT(st, ST_HITS);
    else {
        STAT(st, ST_MISSES);
        if (!*err) *err = SHMKV_ENOTFOUND;
    }
    return res;
}

int shmkv_contains(store_t *st, const char *k, size_t klen) {
    uint64_t hv = shmkv_hash(k, klen, st->hdr->seed);
    uint32_t b = bucket_of(st, hv), s = b & st->stripe_mask;
    int rc = shmkv_stripe_lock(st, s);
    if (rc < 0) return rc;
    uint32_t off = find_locked(st, b, k, klen, (uint32_t)(hv >> 32), NULL);
    int found = off && !is_expired(shmkv_item(st, off));
    shmkv_stripe_unlock(st, s);
    return found;
}

static int check_sizes(store_t *st, size_t klen, size_t vlen, int *cls) {
    if (klen == 0 || klen > st->hdr->max_key) return SHMKV_EKEYLEN;
    if (vlen > st->hdr->max_item || SHMKV_ITEM_HDR + klen + vlen > st->hdr->max_item)
        return SHMKV_EVALLEN;
    *cls = shmkv_class_for(st, (uint32_t)(SHMKV_ITEM_HDR + klen + vlen));
    return *cls < 0 ? SHMKV_EVALLEN : 0;
}

/* REQUIRES: stripe s of bucket b. Steps 1-4 of the put above.
 * `released` non-NULL: a blind put, whose outcome does not depend on what the stripe showed
 * before it (not add, cas or incr), so it may let go of stripe s while it waits for node room
 * (below). Held again on return, unless *released is set (then the put failed with rc). */
static int put_locked_ex(store_t *st, uint32_t s, uint32_t b, uint32_t h32, int cls,
                         const char *k, size_t klen, const char *v, size_t vlen,
                         uint64_t expire_ms, int *released) {
    uint32_t x, *link;
    int rc = 0;
    if (!shmkv_take_kept(st, (uint32_t)cls, &x)) {
        rc = shmkv_class_lock(st, (uint32_t)cls);
        if (rc < 0) return rc;
        rc = shmkv_alloc_locked(st, (uint32_t)cls, s, &x);
        if (rc != SHMKV_ELOCK) shmkv_class_unlock(st, (uint32_t)cls); /* ELOCK: not held */
        if (rc < 0) return rc;
    }

    CRASH_POINT(st, CP_PUT_INFLIGHT);
    item_t *it = shmkv_item(st, x);
    it->vlen = (uint32_t)vlen;
    it->expire_ms = expire_ms;
    it->hash32 = h32;
    it->klen = (uint16_t)klen;
    memcpy(ITEM_KEY(it), k, klen);
    CRASH_POINT(st, CP_PUT_HALF_WRITTEN);
    memcpy(ITEM_KEY(it) + klen, v, vlen);

    /* Look up only now: eviction during the allocation may have changed this chain. */
    uint32_t old = find_locked(st, b, k, klen, h32, &link);
    /* btree: publication and the index entry under the tree lock or the latch of the key's
     * leaf (stripe -> tree -> latch), so the index always equals the chained items whenever
     * neither is held (btree.c); a full node region refuses a NEW key before anything is
     * published */
    int bt = 0;
    shmkv_tree_w_t w = {0};
    if (shmkv_is_btree(st)) {
        /* Out of nodes for a new key: a slab page becomes nodes (taken with the tree lock
         * released: page -> tree is the order). Its evictions may change this chain (the
         * stripe is ours, so they unlink without waiting): look the key up again. A page
         * whose items are all busy is an instant's state, as for an eviction (slab.c:
         * make_room_locked): back off and retry, GROW_RETRIES times, before StoreFull.
         * The hold is the latch of the key's leaf when the put changes that leaf only,
         * else the tree lock (btree.c: shmkv_tree_wbegin). */
        rc = shmkv_tree_wbegin(st, k, klen, &w);
        for (int grow = 0; rc == 0 && !old && !shmkv_tree_room_locked(st) && grow < GROW_RETRIES; grow++) {
            shmkv_tree_wend(st, &w);
            if (shmkv_tree_grow(st, s, x) < 0) {
                /* Two writers growing at once each hold their stripe, and the page each wants
                 * emptied (the same one: the emptiest of the coldest class) holds items of
                 * both stripes: neither can evacuate it while the other waits holding its own
                 * (StoreFull for both after GROW_RETRIES, seen in CI). A blind put lets go of
                 * its stripe while it backs off -- its chunk stays IN FLIGHT and ours, and the
                 * chain is looked up again below -- so the other's evacuation can go through. */
                if (released != NULL) shmkv_stripe_unlock(st, s);
                shmkv_backoff(grow);
                if (released != NULL && (rc = shmkv_stripe_lock(st, s)) < 0) {
                    *released = 1;
                    break;
                }
            }
            old = find_locked(st, b, k, klen, h32, &link);
            rc = shmkv_tree_wbegin(st, k, klen, &w);
        }
        if (rc < 0 || (!old && !shmkv_tree_room_locked(st))) {
            if (rc == 0) shmkv_tree_wend(st, &w);
            if (shmkv_class_lock(st, (uint32_t)cls) == 0) {
                if (it->state == IT_INFLIGHT && it->owner == st->slot + 1) shmkv_free_locked(st, (uint32_t)cls, x);
                shmkv_class_unlock(st, (uint32_t)cls);
            }
            shmkv_me(st)->inflight = 0;
            if (rc == 0) STAT(st, ST_FULL);
            return rc < 0 ? rc : SHMKV_EIDXFULL;
        }
        bt = 1;
    }
    if (old) {
        it->hnext = shmkv_item(st, old)->hnext;
    } else {
        link = &st->buckets[b];
        it->hnext = *link;
    }
    __atomic_store_n(&it->state, IT_LINKED, __ATOMIC_RELEASE);
    __atomic_store_n(link, x, __ATOMIC_RELEASE); /* the publication */
    if (bt) {
        shmkv_tree_wput(st, &w, k, klen, x);
        shmkv_tree_wend(st, &w);
    }
    CRASH_POINT(st, CP_PUT_PUBLISHED);
    shmkv_me(st)->inflight = 0;
    if (old) {
        shmkv_keep_replaced(st, old);
    } else {
        __atomic_add_fetch(&st->hdr->nitems, 1, __ATOMIC_RELAXED);
    }
    STAT(st, ST_PUTS);
    return 0;
}

/* put_locked_ex for add, cas, incr and batches: the stripe is held throughout. */
static int put_locked(store_t *st, uint32_t s, uint32_t b, uint32_t h32, int cls,
                      const char *k, size_t klen, const char *v, size_t vlen, uint64_t expire_ms) {
    return put_locked_ex(st, s, b, h32, cls, k, klen, v, vlen, expire_ms, NULL);
}

int shmkv_put(store_t *st, const char *k, size_t klen, const char *v, size_t vlen,
              uint64_t expire_ms, int only_if_absent) {
    return shmkv_put_hashed(st, k, klen, v, vlen, expire_ms, only_if_absent,
                            shmkv_hash(k, klen, st->hdr->seed));
}

int shmkv_put_hashed(store_t *st, const char *k, size_t klen, const char *v, size_t vlen,
                     uint64_t expire_ms, int only_if_absent, uint64_t hv) {
    int cls, rc = check_sizes(st, klen, vlen, &cls);
    if (rc) return rc;
    uint32_t b = bucket_of(st, hv), s = b & st->stripe_mask, h32 = (uint32_t)(hv >> 32);
    if ((rc = shmkv_stripe_lock(st, s)) < 0) return rc;
    if (only_if_absent) {
        uint32_t *link;
        uint32_t off = find_locked(st, b, k, klen, h32, &link);
        if (off && !is_expired(shmkv_item(st, off))) {
            shmkv_stripe_unlock(st, s);
            return SHMKV_EEXISTS;
        }
    }
    int released = 0;
    rc = put_locked_ex(st, s, b, h32, cls, k, klen, v, vlen, expire_ms, only_if_absent ? NULL : &released);
    if (!released) shmkv_stripe_unlock(st, s);
    return rc;
}

int shmkv_delete(store_t *st, const char *k, size_t klen) {
    uint64_t hv = shmkv_hash(k, klen, st->hdr->seed);
    uint32_t b = bucket_of(st, hv), s = b & st->stripe_mask;
    uint32_t *link;
    int rc = shmkv_stripe_lock(st, s);
    if (rc < 0) return rc;
    uint32_t off = find_locked(st, b, k, klen, (uint32_t)(hv >> 32), &link);
    int found = 0;
    if (off) {
        found = !is_expired(shmkv_item(st, off));
        remove_locked(st, link, off);
        STAT(st, ST_DELETES);
    }
    shmkv_stripe_unlock(st, s);
    return found;
}

static int parse_i64(const char *p, size_t n, int64_t *out) {
    if (n == 0 || n > 64) return -1;
    size_t i = 0;
    int neg = 0;
    if (p[0] == '-' || p[0] == '+') {
        neg = p[0] == '-';
        i = 1;
        if (n == 1) return -1;
    }
    uint64_t v = 0;
    for (; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        uint64_t d = (uint64_t)(p[i] - '0');
        if (v > (UINT64_MAX - d) / 10) return -1;
        v = v * 10 + d;
    }
    if (neg) {
        if (v > (uint64_t)INT64_MAX + 1) return -1;
        *out = (int64_t)(0 - v);
    } else {
        if (v > (uint64_t)INT64_MAX) return -1;
        *out = (int64_t)v;
    }
    return 0;
}

/* The counter rule, the one copy (the disk tier's incr uses it too: shmkv/tiered.py, through
 * _core.next_counter). A stored counter is an optional sign and 1..64 ASCII digits of a signed
 * 64-bit value; `cur` NULL is an absent key, which counts from 0. *out = cur + delta, which
 * must fit as well. 0, or SHMKV_ENOTNUM / SHMKV_EOVERFLOW. */
int shmkv_counter_add(const char *cur, size_t n, int64_t delta, int64_t *out) {
    int64_t v = 0;
    if (cur && parse_i64(cur, n, &v) != 0) return SHMKV_ENOTNUM;
    if ((delta > 0 && v > INT64_MAX - delta) || (delta < 0 && v < INT64_MIN - delta))
        return SHMKV_EOVERFLOW;
    *out = v + delta;
    return 0;
}

/* Counters are stored as ASCII decimal (like memcached and Redis), so get() and other
 * tools read them as they are. The new value goes to a new chunk (never rewritten in
 * place: a crash mid-rewrite would leave a torn number). A missing key counts from 0. */
int shmkv_incr(store_t *st, const char *k, size_t klen, int64_t delta, int64_t *out) {
    if (klen == 0 || klen > st->hdr->max_key) return SHMKV_EKEYLEN;
    uint64_t hv = shmkv_hash(k, klen, st->hdr->seed);
    uint32_t b = bucket_of(st, hv), s = b & st->stripe_mask, h32 = (uint32_t)(hv >> 32);
    int rc = shmkv_stripe_lock(st, s);
    if (rc < 0) return rc;
    int64_t cur = 0;
    uint64_t expire = 0;
    uint32_t off = find_locked(st, b, k, klen, h32, NULL);
    item_t *it = off ? shmkv_item(st, off) : NULL;
    if (it && is_expired(it)) it = NULL;
    if (it) expire = it->expire_ms;
    rc = shmkv_counter_add(it ? ITEM_VAL(it) : NULL, it ? it->vlen : 0, delta, &cur);
    if (rc < 0) {
        shmkv_stripe_unlock(st, s);
        return rc;
    }
    char buf[24];
    int n = snprintf(buf, sizeof buf, "%lld", (long long)cur);
    int cls;
    rc = check_sizes(st, klen, (size_t)n, &cls);
    if (rc == 0) rc = put_locked(st, s, b, h32, cls, k, klen, buf, (size_t)n, expire);
    shmkv_stripe_unlock(st, s);
    if (rc == 0) *out = cur;
    return rc;
}

int shmkv_clear(store_t *st) {
    for (uint32_t s = 0; s < st->hdr->nstripes; s++) {
        int rc = shmkv_stripe_lock(st, s);
        if (rc < 0) return rc;
        for (uint32_t b = s; b < st->hdr->nbuckets; b += st->hdr->nstripes)
            while (st->buckets[b]) remove_locked(st, &st->buckets[b], st->buckets[b]);
        shmkv_stripe_unlock(st, s);
    }
    return 0;
}

/* Python objects are built after the stripe is released: allocating a list or tuple may run
 * the garbage collector, whose finalizers may call back into this store and relock the
 * stripe (a self-deadlock on a non-recursive mutex). So copy out first, into a C buffer. */
PyObject *shmkv_scan_stripe(store_t *st, uint32_t s, int with_values) {
    size_t cap = 4096, used = 0, n = 0;
    char *buf = NULL;
    uint64_t now = shmkv_now_ms();
    int rc = shmkv_stripe_lock(st, s);
    if (rc < 0) return PyErr_Format(PyExc_OSError, "lock failed: %s", strerror(st->last_errno));
    for (int pass = 0; pass < 2; pass++) {
        used = n = 0;
        for (uint32_t b = s; b < st->hdr->nbuckets; b += st->hdr->nstripes) {
            for (uint32_t off = st->buckets[b]; off; off = shmkv_item(st, off)->hnext) {
                item_t *it = shmkv_item(st, off);
                if (it->expire_ms && it->expire_ms <= now) continue;
                size_t need = 16 + it->klen + (with_values ? it->vlen : 0);
                if (pass == 1 && used + need <= cap) {
                    uint32_t kl = it->klen, vl = with_values ? it->vlen : 0;
                    memcpy(buf + used, &kl, 4);
                    memcpy(buf + used + 4, &vl, 4);
                    memcpy(buf + used + 8, &it->expire_ms, 8);
                    memcpy(buf + used + 16, ITEM_KEY(it), kl + vl);
                }
                used += need;
                n++;
            }
        }
        if (pass == 0) {
            cap = used;
            buf = PyMem_RawMalloc(cap ? cap : 1);
            if (!buf) break;
        }
    }
    shmkv_stripe_unlock(st, s);
    if (!buf) return PyErr_NoMemory();
    PyObject *list = PyList_New(0);
    for (size_t pos = 0; list && pos + 16 <= cap;) {
        uint32_t kl, vl;
        uint64_t expire;
        memcpy(&kl, buf + pos, 4);
        memcpy(&vl, buf + pos + 4, 4);
        memcpy(&expire, buf + pos + 8, 8);
        PyObject *key = PyBytes_FromStringAndSize(buf + pos + 16, kl), *elem = key;
        if (key && with_values) {
            PyObject *val = PyBytes_FromStringAndSize(buf + pos + 16 + kl, vl);
            PyObject *exp = with_values == 2 ? PyLong_FromUnsignedLongLong(expire) : NULL;
            if (with_values == 2)
                elem = val && exp ? PyTuple_Pack(3, key, val, exp) : NULL;
            else
                elem = val ? PyTuple_Pack(2, key, val) : NULL;
            Py_XDECREF(val);
            Py_XDECREF(exp);
            Py_DECREF(key);
        }
        if (!elem || PyList_Append(list, elem) < 0) Py_CLEAR(list);
        Py_XDECREF(elem);
        pos += 16 + kl + vl;
    }
    PyMem_RawFree(buf);
    return list;
}

uint64_t shmkv_count(store_t *st) {
    int64_t n = __atomic_load_n(&st->hdr->nitems, __ATOMIC_RELAXED);
    return n < 0 ? 0 : (uint64_t)n;
}

/* Tiered stores (shmkv/tiered.py): `fn` -- a call into the disk tier -- runs while the key's
 * stripe is held, so memory and disk see the same order of writes to a key and a read-through
 * can never install a value older than one written meanwhile.
 *
 *   write=1: the key leaves memory first; then fn() writes to disk and returns what memory
 *            should now hold: None, or (value: bytes or None, expire_ms: int[, anything]) --
 *            the third item is the caller's (the write's commit ticket: its fsync runs after
 *            this returns, without the stripe lock; _core.pyx _commit_tier). A crash anywhere
 *            leaves the key absent from memory, so the next read goes to disk, which holds
 *            the truth -- memory never contradicts disk.
 *   write=0: a read-through. If another process promoted the key meanwhile, its value (bytes)
 *            is returned without calling fn; else fn() reads the disk and returns None or
 *            (value, expire_ms), which is installed in memory if it fits.
 * Returns a new reference (fn's result, or the bytes found), NULL with *err set on failure.
 * Python code runs under the stripe lock: stripes are ERRORCHECK mutexes, so re-entry from the
 * same thread (a finalizer touching the store) fails with an error instead of deadlocking. */
PyObject *shmkv_through(store_t *st, const char *k, size_t klen, int write, PyObject *fn, int *err) {
    if (klen == 0 || klen > st->hdr->max_key) {
        *err = SHMKV_EKEYLEN;
        return NULL;
    }
    uint64_t hv = shmkv_hash(k, klen, st->hdr->seed);
    uint32_t b = bucket_of(st, hv), s = b & st->stripe_mask, h32 = (uint32_t)(hv >> 32);
    uint32_t *link;
    int rc = shmkv_stripe_lock(st, s);
    if (rc < 0) {
        *err = rc;
        return NULL;
    }
    PyObject *res = NULL;
    uint32_t off = find_locked(st, b, k, klen, h32, &link);
    if (off) {
        item_t *it = shmkv_item(st, off);
        if (!write && !is_expired(it)) {
            if (!it->active) it->active = 1;
            res = PyBytes_FromStringAndSize(ITEM_VAL(it), it->vlen);
            if (!res) *err = SHMKV_EPYTHON;
            shmkv_stripe_unlock(st, s);
            return res;
        }
        remove_locked(st, link, off);
    }
    res = PyObject_CallNoArgs(fn);
    if (!res) {
        *err = SHMKV_EPYTHON;
    } else if (PyTuple_Check(res) && PyTuple_GET_SIZE(res) >= 2 &&
               PyBytes_Check(PyTuple_GET_ITEM(res, 0))) {
        PyObject *v = PyTuple_GET_ITEM(res, 0);
        unsigned long long expire = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(res, 1));
        int cls;
        if (expire == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_CLEAR(res);
            *err = SHMKV_EPYTHON;
        } else if (check_sizes(st, klen, (size_t)PyBytes_GET_SIZE(v), &cls) == 0 &&
                   (!expire || expire > shmkv_now_ms())) {
            /* Too big for memory, or full: the value stays on disk only. Not an error. */
            put_locked(st, s, b, h32, cls, k, klen, PyBytes_AS_STRING(v),
                       (size_t)PyBytes_GET_SIZE(v), expire);
        }
    }
    shmkv_stripe_unlock(st, s);
    return res;
}

/* Compare-and-swap: store `v` under `k` only if the key's current value is exactly
 * `expected` (expect_absent=1: only if the key is absent or expired), all under the key's
 * stripe lock, so a read-modify-write retried on a mismatch is atomic across every process
 * (the cluster's --workers merge version sets this way: replica.py). The value is compared
 * byte for byte; rejected: comparing a version number or the item's offset -- a chunk is
 * reused after a free, so an equal offset does not mean an unchanged value (ABA).
 * Returns 1 when stored, 0 on a mismatch (nothing changed), <0 SHMKV_E* (nothing changed). */
int shmkv_cas(store_t *st, const char *k, size_t klen, const char *expected, size_t elen,
              int expect_absent, const char *v, size_t vlen, uint64_t expire_ms) {
    int cls, rc = check_sizes(st, klen, vlen, &cls);
    if (rc) return rc;
    uint64_t hv = shmkv_hash(k, klen, st->hdr->seed);
    uint32_t b = bucket_of(st, hv), s = b & st->stripe_mask, h32 = (uint32_t)(hv >> 32);
    if ((rc = shmkv_stripe_lock(st, s)) < 0) return rc;
    uint32_t off = find_locked(st, b, k, klen, h32, NULL);
    item_t *it = off ? shmkv_item(st, off) : NULL;
    int present = it && !is_expired(it);
    int match = expect_absent ? !present
                              : present && it->vlen == elen && memcmp(ITEM_VAL(it), expected, elen) == 0;
    rc = match ? put_locked(st, s, b, h32, cls, k, klen, v, vlen, expire_ms) : 0;
    shmkv_stripe_unlock(st, s);
    return rc < 0 ? rc : match;
}
