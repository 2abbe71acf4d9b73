/* verify.c -- structural checks and the repairs that follow a dead lock holder.
 *
 * shmkv_verify stops the world: it takes every stripe (in index order), the registry, every
 * class (in index order) and the page lock -- the documented lock order, so it cannot
 * deadlock with a worker -- and then walks every structure. With every stripe held no put is
 * in progress, so any chunk still IN FLIGHT or UNLINKED, and any LINKED chunk no chain
 * reaches, is the leftover of a killed writer: such orphans are reclaimed silently (counted
 * in stats "reclaimed"). Everything else that is wrong is reported, then repaired.
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

/* Is `off` the start of a chunk in an assigned page? Returns the class, or -1. */
int shmkv_chunk_class(store_t *st, uint32_t off) {
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

/* REQUIRES: stripe s, taken from a dead owner. Publication is one atomic store, so chains
 * should be whole; this re-validates every link of the stripe's chains anyway and cuts a
 * chain at the first link that is not a LINKED item of that bucket (items past a cut are
 * unreachable and are freed by eviction or verify). */
void shmkv_repair_stripe_locked(store_t *st, uint32_t s) {
    header_t *h = st->hdr;
    uint64_t limit = (h->total_size / SHMKV_MIN_CHUNK) + 1;
    for (uint32_t b = s; b < h->nbuckets; b += h->nstripes) {
        uint32_t *link = &st->buckets[b];
        uint64_t steps = 0;
        while (*link) {
            uint32_t off = *link;
            item_t *it = shmkv_item(st, off);
            if (shmkv_chunk_class(st, off) < 0 || it->state != IT_LINKED || it->klen == 0 ||
                it->klen > h->max_key || ++steps > limit ||
                (shmkv_hash(ITEM_KEY(it), it->klen, h->seed) & st->bucket_mask) != b) {
                *link = 0;
                break;
            }
            link = &it->hnext;
        }
    }
}

/* REQUIRES: page lock, taken from a dead owner. A page caught MOVING between classes is
 * zeroed and returned to the unassigned pool (its donor already let go of it). */
void shmkv_repair_pages_locked(store_t *st) {
    header_t *h = st->hdr;
    for (uint32_t p = 0; p < h->npages; p++) {
        if (st->pagemeta[p].cls == SHMKV_PAGE_MOVING) {
            memset(st->pages + (uint64_t)p * h->page_size, 0, h->page_size);
            st->pagemeta[p].used = 0;
            st->pagemeta[p].cls = SHMKV_PAGE_UNASSIGNED;
        }
    }
}

#define BIT_SET(bm, i) ((bm)[(i) >> 6] |= 1ULL << ((i)&63))
#define BIT_GET(bm, i) (((bm)[(i) >> 6] >> ((i)&63)) & 1)

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

int shmkv_verify(store_t *st, PyObject *problems) {
    header_t *h = st->hdr;
    uint32_t s, cls;
    int rc = 0;
    for (s = 0; s < h->nstripes; s++)
        if ((rc = shmkv_stripe_lock(st, s)) < 0) break;
    uint32_t stripes_held = s;
    if (rc < 0) goto out_stripes;
    if ((rc = shmkv_lock(st, &h->reg_lock.m)) < 0) goto out_stripes;
    if (rc == 1) shmkv_lock_consistent(&h->reg_lock.m);
    for (cls = 0; cls < h->nclasses; cls++)
        if ((rc = shmkv_class_lock(st, cls)) < 0) break;
    uint32_t classes_held = cls;
    if (rc < 0) goto out_classes;
    if ((rc = shmkv_lock(st, &h->page_lock.m)) < 0) goto out_classes;
    shmkv_repair_pages_locked(st); /* with every class held, MOVING can only be a leftover */
    if (rc == 1) shmkv_lock_consistent(&h->page_lock.m);

    uint64_t nunits = h->total_size / SHMKV_UNIT;
    uint64_t *seen = calloc(nunits / 64 + 1, 8);
    if (!seen) {
        rc = SHMKV_EPYTHON;
        PyErr_NoMemory();
        goto out_all;
    }
    /* 1. pages per class */
    for (cls = 0; cls < h->nclasses; cls++) {
        uint64_t pages = 0;
        for (uint32_t p = 0; p < h->npages; p++) pages += st->pagemeta[p].cls == cls;
        if (pages != st->classes[cls].pages) {
            report(problems, "class %u: counts %llu pages, owns %llu", cls,
                   (unsigned long long)st->classes[cls].pages, (unsigned long long)pages);
            st->classes[cls].pages = pages;
        }
    }
    /* 2. chains */
    int64_t linked = 0;
    uint64_t limit = nunits;
    for (uint32_t b = 0; b < h->nbuckets; b++) {
        uint32_t *link = &st->buckets[b];
        uint64_t steps = 0;
        while (*link) {
            uint32_t off = *link;
            item_t *it = shmkv_item(st, off);
            const char *bad = NULL;
            if (shmkv_chunk_class(st, off) < 0) bad = "points outside every chunk";
            else if (it->state != IT_LINKED) bad = "reaches an item that is not LINKED";
            else if (BIT_GET(seen, off)) bad = "reaches an item twice (cycle or shared tail)";
            else if (it->klen == 0 || it->klen > h->max_key) bad = "reaches an item with a bad key length";
            else if ((shmkv_hash(ITEM_KEY(it), it->klen, h->seed) & st->bucket_mask) != b)
                bad = "holds an item of another bucket";
            else if (++steps > limit) bad = "is longer than the segment";
            if (bad) {
                report(problems, "bucket %u: chain %s (offset %u); chain cut", b, bad, off);
                *link = 0;
                break;
            }
            BIT_SET(seen, off);
            linked++;
            if (it->listed != LS_LRU) {
                report(problems, "item at offset %u is reachable but not on its class's LRU", off);
                if (it->listed == LS_FREE) shmkv_list_remove(st, &st->classes[it->cls], it, off);
                shmkv_list_push_head(st, &st->classes[it->cls], it, off, LS_LRU);
            }
            link = &it->hnext;
        }
    }
    /* 3. class lists; 4. every chunk; 5. counters */
    for (cls = 0; cls < h->nclasses; cls++) {
        class_t *c = &st->classes[cls];
        uint64_t nlru = 0, nfree = 0;
        if (check_list(st, cls, LS_LRU, &nlru, problems) || check_list(st, cls, LS_FREE, &nfree, problems)) {
            shmkv_repair_class_locked(st, cls);
        }
        uint64_t used = 0, free_n = 0;
        for (uint32_t p = 0; p < h->npages; p++) {
            if (st->pagemeta[p].cls != cls) continue;
            uint32_t pused = 0;
            char *base = st->pages + (uint64_t)p * h->page_size;
            for (uint32_t i = 0; i < c->per_page; i++) {
                item_t *it = (item_t *)(base + (uint64_t)i * c->size);
                uint32_t off = shmkv_off(st, it);
                int orphan = (it->state == IT_LINKED && !BIT_GET(seen, off)) ||
                             it->state == IT_INFLIGHT || it->state == IT_UNLINKED;
                if (orphan) {
                    shmkv_free_locked(st, cls, off);
                    c->reclaimed++;
                    STAT(st, ST_RECLAIMED);
                } else if (it->state != IT_LINKED && it->listed != LS_FREE) {
                    /* a chunk a crashed page cut never listed */
                    if (it->listed == LS_LRU) shmkv_list_remove(st, c, it, off);
                    it->state = IT_FREE;
                    shmkv_list_push_head(st, c, it, off, LS_FREE);
                }
                if (it->state == IT_LINKED) {
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
        if (c->used != used || c->free_count != free_n) {
            report(problems, "class %u: counts %llu used / %llu free chunks, holds %llu / %llu", cls,
                   (unsigned long long)c->used, (unsigned long long)c->free_count,
                   (unsigned long long)used, (unsigned long long)free_n);
            c->used = used;
            c->free_count = free_n;
        }
    }
    /* nitems can lag by one per killed writer (killed between publish and count) */
    __atomic_store_n(&h->nitems, linked, __ATOMIC_RELAXED);
    free(seen);
    for (uint32_t i = 0; i < SHMKV_MAX_SLOTS; i++)
        if (st->slots[i].pid && i != st->slot && !shmkv_slot_alive(st, i)) st->slots[i].inflight = 0;
    st->pending = 0;
out_all:
    shmkv_unlock(&h->page_lock.m);
out_classes:
    for (cls = classes_held; cls-- > 0;) shmkv_class_unlock(st, cls);
    shmkv_unlock(&h->reg_lock.m);
out_stripes:
    for (s = stripes_held; s-- > 0;) shmkv_stripe_unlock(st, s);
    return rc < 0 ? rc : 0;
}
