/* verify.c -- the structural check behind Store.verify() (crash repairs: repair.c).
 *
 * shmkv_verify holds at most ONE lock at any instant: the page lock (the page table), then
 * each stripe in turn (its chains), then each class in turn (its lists, chunks, counters),
 * then, for each LINKED chunk no chain reached, that chunk's stripe. A checker that is
 * paused (SIGSTOP, a debugger, `shmkv check` under ^Z) stalls only the processes that need
 * that one lock, never the whole store.
 *
 * The price: the passes see the store at different instants, so only facts about ONE
 * lock's data can be checked. The cross-structure checks of the first design became
 * per-lock checks, or were dropped:
 *   - "a reachable item is on its class's LRU" became "every chunk that is not free is on
 *     its class's LRU, every free one on its free list" -- a class-lock fact: allocation
 *     lists a chunk before anyone can link it, eviction unlists one only after unlinking.
 *   - "a LINKED chunk no chain reaches is an orphan" needs the chain's stripe: the class
 *     pass only collects candidates, and each is re-checked under the stripe of its key (an
 *     item linked after its stripe was walked is reachable by then) before it is reclaimed.
 *   - "pages counted per class = pages owned" stays exact: a class's page-table entries
 *     change only while its class lock is held.
 *   - "nitems = the number of reachable items" is dropped: chains are counted at different
 *     instants while puts go on, so there is no exact total to reset it to. nitems changes
 *     only by atomic adds next to each link and unlink, so it drifts only by one per writer
 *     killed between the two (README: len()).
 *   - IN FLIGHT and UNLINKED chunks are orphans only when their owner is dead (its fcntl
 *     liveness lock is gone): a live owner's are work in progress, or the chunk it keeps (slot.kept).
 * Anything else wrong is reported, then repaired (a broken class list or a MOVING page by
 * repair.c's rebuilds, a bad chain link or count here); orphans are reclaimed silently (stats
 * "reclaimed").
 * Rejected: stopping the world (every stripe, the registry, every class and the page lock
 * at once, as the first design did): exact, but a paused checker froze every process for as
 * long as it stayed paused. A robust mutex cannot help there: its holder is not dead.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"

static void report(PyObject *problems, const char *fmt, ...) {
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    PyObject *s = PyUnicode_FromString(msg);
    if (s) {
        PyList_Append(problems, s);
        Py_DECREF(s);
    }
}

#define BIT_SET(bm, i) ((bm)[(i) >> 6] |= 1ULL << ((i)&63))
#define BIT_CLR(bm, i) ((bm)[(i) >> 6] &= ~(1ULL << ((i)&63)))
#define BIT_GET(bm, i) (((bm)[(i) >> 6] >> ((i)&63)) & 1)

/* One bit per chunk: chunks don't overlap and are >= SHMKV_MIN_CHUNK bytes, so their start
 * bytes (from the first page) fall in distinct SHMKV_MIN_CHUNK-byte slots.
 * REQUIRES: shmkv_chunk_class(st, off) >= 0. */
static inline uint64_t chunk_bit(store_t *st, uint32_t off) {
    return ((uint64_t)off * SHMKV_UNIT - st->hdr->off_pages) / SHMKV_MIN_CHUNK;
}

/* A growable array of chunk offsets (or pairs: see suspects). */
typedef struct {
    uint32_t *v;
    size_t n, cap;
} offs_t;

static int offs_push(offs_t *a, uint32_t x) {
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 256;
        uint32_t *v = realloc(a->v, cap * sizeof *v);
        if (!v) return -1;
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

static inline int owner_alive(store_t *st, uint16_t owner) {
    return owner >= 1 && owner <= SHMKV_MAX_SLOTS && shmkv_slot_alive(st, owner - 1u);
}

/* Walks one of class c's lists; 0 if well formed. */
static int check_list(store_t *st, uint32_t cls, int which, uint64_t *count, PyObject *problems) {
    class_t *c = &st->classes[cls];
    uint32_t off = which == LS_LRU ? c->lru_head : c->free_head, prev = 0;
    uint64_t n = 0, limit = c->pages * c->per_page + 1;
    const char *name = which == LS_LRU ? "LRU" : "free list";
    while (off) {
        item_t *it = shmkv_item(st, off);
        if (shmkv_chunk_class(st, off) != (int)cls) {
            report(problems, "class %u %s: offset %u is not a chunk of the class", cls, name, off);
            return -1;
        }
        if (it->listed != which || it->prev != prev) {
            report(problems, "class %u %s: broken link at offset %u", cls, name, off);
            return -1;
        }
        if (++n > limit) {
            report(problems, "class %u %s: cycle", cls, name);
            return -1;
        }
        prev = off;
        off = it->next;
    }
    if (which == LS_LRU && c->lru_tail != prev) {
        report(problems, "class %u LRU: tail does not match the last item", cls);
        return -1;
    }
    *count = n;
    return 0;
}

/* Under stripe s alone: every chain of the stripe leads through LINKED items of its own
 * bucket, without a cycle or a shared tail; a chain is cut at its first bad link. Marks
 * every reachable chunk in `seen` (for the class pass); `mark` finds an item reached twice
 * within the stripe and is cleared again before the stripe is released -- across stripes a
 * chunk may legitimately be freed and reused under another key between two walks. */
static int check_stripe(store_t *st, uint32_t s, uint64_t *seen, uint64_t *mark, offs_t *walked,
                        PyObject *problems) {
    header_t *h = st->hdr;
    uint64_t limit = h->total_size / SHMKV_MIN_CHUNK + 1;
    int rc = shmkv_stripe_lock(st, s);
    if (rc < 0) return rc;
    CRASH_POINT(st, CP_VERIFY_STRIPE);
    walked->n = 0;
    for (uint32_t b = s; b < h->nbuckets && rc == 0; b += h->nstripes) {
        uint32_t *link = &st->buckets[b];
        uint64_t steps = 0;
        while (*link) {
            uint32_t off = *link;
            item_t *it = shmkv_item(st, off);
            const char *bad = NULL;
            if (shmkv_chunk_class(st, off) < 0) bad = "points outside every chunk";
            else if (it->state != IT_LINKED) bad = "reaches an item that is not LINKED";
            else if (BIT_GET(mark, chunk_bit(st, off))) bad = "reaches an item twice (cycle or shared tail)";
            else if (it->klen == 0 || it->klen > h->max_key) bad = "reaches an item with a bad key length";
            else if ((shmkv_hash(ITEM_KEY(it), it->klen, h->seed) & st->bucket_mask) != b)
                bad = "holds an item of another bucket";
            else if (++steps > limit) bad = "is longer than the segment";
            if (bad) {
                report(problems, "bucket %u: chain %s (offset %u); chain cut", b, bad, off);
                *link = 0;
                shmkv_tree_invalidate(st); /* under the stripe: see shmkv_repair_stripe_locked */
                break;
            }
            if (offs_push(walked, off) < 0) {
                rc = SHMKV_EPYTHON;
                break;
            }
            BIT_SET(mark, chunk_bit(st, off));
            BIT_SET(seen, chunk_bit(st, off));
            link = &it->hnext;
        }
    }
    for (size_t i = 0; i < walked->n; i++) BIT_CLR(mark, chunk_bit(st, walked->v[i]));
    shmkv_stripe_unlock(st, s);
    if (rc == SHMKV_EPYTHON) PyErr_NoMemory();
    return rc;
}

/* Under class cls's lock alone: its page count, its two lists, every chunk of its pages and
 * its counters. Orphans of dead writers are freed. LINKED chunks that no chain reached when
 * their stripe was walked go to `suspects` as (offset, hash32) pairs, for check_suspect. */
static int check_class(store_t *st, uint32_t cls, const uint64_t *seen, offs_t *suspects,
                       PyObject *problems) {
    header_t *h = st->hdr;
    class_t *c = &st->classes[cls];
    int rc = shmkv_class_lock(st, cls);
    if (rc < 0) return rc;
    if (c->pages) CRASH_POINT(st, CP_VERIFY_CLASS);
    uint64_t pages = 0;
    for (uint32_t p = 0; p < h->npages; p++) pages += st->pagemeta[p].cls == cls;
    if (pages != c->pages) {
        report(problems, "class %u: counts %llu pages, owns %llu", cls,
               (unsigned long long)c->pages, (unsigned long long)pages);
        c->pages = pages;
    }
    uint64_t nlru = 0, nfree = 0;
    if (check_list(st, cls, LS_LRU, &nlru, problems) || check_list(st, cls, LS_FREE, &nfree, problems))
        shmkv_repair_class_locked(st, cls);
    uint64_t used = 0, free_n = 0;
    for (uint32_t p = 0; p < h->npages && rc == 0; p++) {
        if (st->pagemeta[p].cls != cls) continue;
        uint32_t pused = 0;
        char *base = st->pages + (uint64_t)p * h->page_size;
        for (uint32_t i = 0; i < c->per_page; i++) {
            item_t *it = (item_t *)(base + (uint64_t)i * c->size);
            uint32_t off = shmkv_off(st, it);
            /* LINKED->UNLINKED and IN FLIGHT->LINKED happen under a stripe, concurrently with
             * this scan: both leave the chunk in use and on the LRU, which is all that is
             * counted here. */
            uint8_t state = __atomic_load_n(&it->state, __ATOMIC_ACQUIRE);
            int in_use = state == IT_LINKED || state == IT_INFLIGHT || state == IT_UNLINKED;
            if (in_use && state != IT_LINKED && !owner_alive(st, it->owner)) {
                shmkv_free_locked(st, cls, off);
                c->reclaimed++;
                STAT(st, ST_RECLAIMED);
                in_use = 0;
            } else if (in_use) {
                if (it->listed != LS_LRU) {
                    report(problems, "chunk at offset %u is in use but not on its class's LRU", off);
                    if (it->listed == LS_FREE) shmkv_list_remove(st, c, it, off);
                    shmkv_list_push_head(st, c, it, off, LS_LRU);
                }
                if (state == IT_LINKED && !BIT_GET(seen, chunk_bit(st, off)) &&
                    (offs_push(suspects, off) < 0 || offs_push(suspects, it->hash32) < 0))
                    rc = SHMKV_EPYTHON;
            } else if (it->listed != LS_FREE) {
                /* a chunk a crashed page cut never listed */
                if (it->listed == LS_LRU) shmkv_list_remove(st, c, it, off);
                it->state = IT_FREE;
                shmkv_list_push_head(st, c, it, off, LS_FREE);
            }
            if (in_use) {
                used++;
                pused++;
            } else {
                free_n++;
            }
        }
        if (st->pagemeta[p].used != pused) {
            report(problems, "page %u: counts %u used chunks, holds %u", p, st->pagemeta[p].used, pused);
            st->pagemeta[p].used = pused;
        }
    }
    if (rc == 0 && (c->used != used || c->free_count != free_n)) {
        report(problems, "class %u: counts %llu used / %llu free chunks, holds %llu / %llu", cls,
               (unsigned long long)c->used, (unsigned long long)c->free_count,
               (unsigned long long)used, (unsigned long long)free_n);
        c->used = used;
        c->free_count = free_n;
    }
    shmkv_class_unlock(st, cls);
    if (rc == SHMKV_EPYTHON) PyErr_NoMemory();
    return rc;
}

/* A LINKED chunk that no chain reached when its stripe was walked: an orphan (its writer
 * died between marking it LINKED and publishing it, or a stripe repair cut the chain before
 * it) -- or an item linked after the walk. Decided under the stripe of its key alone: there,
 * a chunk that is LINKED under a key of that stripe cannot change (unlinking it needs the
 * stripe), so "LINKED, key of this stripe, not in its bucket's chain" is an orphan. It is
 * marked UNLINKED with no owner (still under the stripe), then freed under its class lock,
 * taken after the stripe is released.
 * The key is read before the stripe is taken (to find the stripe), so it may be torn by a
 * concurrent reuse of the chunk; under the stripe the chunk must still be LINKED with the
 * hash32 seen by the class pass and a key hashing to that hash32 and to this stripe. A chunk
 * reused meanwhile fails that (or is IN FLIGHT: its key's stripe, if this one, is ours). */
static int check_suspect(store_t *st, uint32_t off, uint32_t hash32, char *key) {
    header_t *h = st->hdr;
    item_t *it = shmkv_item(st, off);
    if (shmkv_chunk_class(st, off) < 0) return 0; /* its page moved meanwhile */
    uint16_t klen = it->klen;
    if (klen == 0 || klen > h->max_key) return 0;
    memcpy(key, ITEM_KEY(it), klen);
    uint64_t hv = shmkv_hash(key, klen, h->seed);
    if ((uint32_t)(hv >> 32) != hash32) return 0;
    uint32_t b = (uint32_t)hv & st->bucket_mask, s = b & st->stripe_mask;
    int rc = shmkv_stripe_lock(st, s);
    if (rc < 0) return rc;
    int orphan = 0;
    if (shmkv_chunk_class(st, off) >= 0 &&
        __atomic_load_n(&it->state, __ATOMIC_ACQUIRE) == IT_LINKED && it->hash32 == hash32 &&
        it->klen == klen && memcmp(ITEM_KEY(it), key, klen) == 0) {
        orphan = 1;
        uint64_t steps = 0, limit = h->total_size / SHMKV_MIN_CHUNK + 1;
        for (uint32_t x = st->buckets[b]; x && steps++ < limit; x = shmkv_item(st, x)->hnext)
            if (x == off) {
                orphan = 0;
                break;
            }
        if (orphan) {
            it->owner = 0; /* owner of a LINKED chunk is this stripe's to write */
            __atomic_store_n(&it->state, IT_UNLINKED, __ATOMIC_RELEASE);
        }
    }
    shmkv_stripe_unlock(st, s);
    if (!orphan) return 0;
    int cls = shmkv_chunk_class(st, off);
    if (cls < 0 || shmkv_class_lock(st, (uint32_t)cls) < 0) return 0; /* eviction frees it */
    /* eviction may have freed and reused it meanwhile: only an ownerless UNLINKED is ours */
    if (shmkv_chunk_class(st, off) == cls && it->state == IT_UNLINKED && it->owner == 0) {
        shmkv_free_locked(st, (uint32_t)cls, off);
        st->classes[cls].reclaimed++;
        STAT(st, ST_RECLAIMED);
    }
    shmkv_class_unlock(st, (uint32_t)cls);
    return 0;
}

int shmkv_verify(store_t *st, PyObject *problems) {
    header_t *h = st->hdr;
    int rc;
    uint64_t nbits = (h->total_size - h->off_pages) / SHMKV_MIN_CHUNK + 1;
    uint64_t *seen = calloc(nbits / 64 + 1, 8), *mark = calloc(nbits / 64 + 1, 8);
    char *key = malloc(h->max_key + 1u);
    offs_t walked = {0}, suspects = {0};
    if (!seen || !mark || !key) {
        rc = SHMKV_EPYTHON;
        PyErr_NoMemory();
        goto out;
    }
    /* 1. the page table, under the page lock alone: a page move sets and clears MOVING within
     * one hold of it, so a MOVING page seen here is the leftover of a dead mover. */
    if ((rc = shmkv_lock(st, &h->page_lock.m, LK_PAGE)) < 0) goto out;
    CRASH_POINT(st, CP_VERIFY_PAGE_LOCK);
    shmkv_repair_pages_locked(st);
    if (rc == 1) shmkv_lock_consistent(&h->page_lock.m);
    shmkv_unlock(&h->page_lock.m);
    /* 2. chains, stripe by stripe */
    for (uint32_t s = 0; s < h->nstripes; s++)
        if ((rc = check_stripe(st, s, seen, mark, &walked, problems)) < 0) goto out;
    /* 3. classes, one by one */
    for (uint32_t cls = 0; cls < h->nclasses; cls++)
        if ((rc = check_class(st, cls, seen, &suspects, problems)) < 0) goto out;
    /* 4. LINKED chunks no chain reached */
    for (size_t i = 0; i + 1 < suspects.n; i += 2)
        if ((rc = check_suspect(st, suspects.v[i], suspects.v[i + 1], key)) < 0) goto out;
    /* 5. btree: the ordered index against the chains, under the tree lock alone */
    if ((rc = shmkv_tree_verify(st, problems)) < 0) goto out;
    rc = 0;
out:
    free(seen);
    free(mark);
    free(key);
    free(walked.v);
    free(suspects.v);
    return rc < 0 ? rc : 0;
}
