/* repair.c -- every crash repair: what a lock guards, rebuilt by the locker that got the lock
 * from a process that died holding it (EOWNERDEAD, lock.c), and the chunk a dead process left
 * IN FLIGHT, reclaimed from its process slot.
 *
 * Callers: each lock's wrapper repairs on taking it from a dead owner, then marks the mutex
 * consistent (shmkv_stripe_lock in table.c, shmkv_class_lock and the page lock in slab.c; the
 * trylocks of eviction and page moves do the same); the registry lock needs no repair
 * (segment.c says why). verify() (verify.c) calls the page and class repairs too, on what its
 * check finds. A repairer that dies mid-repair leaves the mark in place, so the next locker
 * repairs again: every repair here is idempotent and starts from what is in memory, never
 * from a record of what the dead holder was doing.
 */
#include <string.h>

#include "core.h"

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
    /* btree: the index may name items past a cut; rebuild it from the chains while this
     * stripe is still held, so none of them can be freed before the index forgets them */
    shmkv_tree_invalidate(st);
}

/* REQUIRES: page lock, taken from a dead owner (or verify's pass over the page table). A
 * page caught MOVING between classes is zeroed and returned to the unassigned pool (its
 * donor already let go of it). */
void shmkv_repair_pages_locked(store_t *st) {
    header_t *h = st->hdr;
    for (uint32_t p = 0; p < h->npages; p++) {
        if (st->pagemeta[p].cls == SHMKV_PAGE_MOVING) {
            memset(shmkv_page_addr(st, p), 0, h->page_size);
            st->pagemeta[p].used = 0;
            st->pagemeta[p].cls = SHMKV_PAGE_UNASSIGNED;
        }
    }
}

/* REQUIRES: class lock of `cls`, taken from a dead owner (or found broken by verify).
 * Rebuilds the class's LRU and free list and its counters from a scan of its pages; the LRU
 * order is lost (a crash costs recency, not data). A chunk IN FLIGHT for a live writer stays
 * in the LRU; one left by a dead writer is freed. */
void shmkv_repair_class_locked(store_t *st, uint32_t cls) {
    header_t *h = st->hdr;
    class_t *c = &st->classes[cls];
    c->lru_head = c->lru_tail = c->free_head = 0;
    c->free_count = c->used = c->pages = 0;
    for (uint32_t p = 0; p < h->npages; p++) {
        if (st->pagemeta[p].cls != cls) continue;
        c->pages++;
        uint32_t used = 0;
        char *base = shmkv_page_addr(st, p);
        for (uint32_t i = 0; i < c->per_page; i++) {
            item_t *it = (item_t *)(base + (uint64_t)i * c->size);
            uint32_t off = shmkv_off(st, it);
            it->listed = LS_NONE;
            it->cls = (uint8_t)cls;
            int keep = it->state == IT_LINKED ||
                       (it->state == IT_INFLIGHT && it->owner >= 1 &&
                        it->owner <= SHMKV_MAX_SLOTS && shmkv_slot_alive(st, it->owner - 1u));
            if (it->state == IT_UNLINKED && it->owner >= 1 && it->owner <= SHMKV_MAX_SLOTS &&
                shmkv_slot_alive(st, it->owner - 1u))
                keep = 1; /* its live owner frees it (a delete's: table.c remove_locked) */
            if (keep) {
                used++;
                shmkv_list_push_head(st, c, it, off, LS_LRU);
            } else {
                if (it->state == IT_INFLIGHT || it->state == IT_UNLINKED) c->reclaimed++;
                it->state = IT_FREE;
                it->owner = 0;
                shmkv_list_push_head(st, c, it, off, LS_FREE);
            }
        }
        st->pagemeta[p].used = used;
        c->used += used;
    }
}

/* REQUIRES: reg_lock; `slot` belongs to a dead process. Frees `off`, a chunk the slot names
 * (in flight or kept), if it is still that slot's, and counts it reclaimed. */
static void reclaim_named_locked(store_t *st, uint32_t slot, uint32_t off) {
    if (off && shmkv_free_inflight_of(st, slot, off)) {
        st->classes[shmkv_item(st, off)->cls].reclaimed++;
        STAT(st, ST_RECLAIMED);
    }
}

/* REQUIRES: reg_lock; `slot` belongs to a dead process. Frees the chunks it left in flight
 * and kept (both may name one chunk: slab.c shmkv_take_kept's crash order). */
void shmkv_reclaim_slot_inflight_locked(store_t *st, uint32_t slot) {
    slot_t *s = &st->slots[slot];
    reclaim_named_locked(st, slot, s->inflight);
    if (s->kept != s->inflight) reclaim_named_locked(st, slot, s->kept);
    s->inflight = 0;
    s->kept = 0;
}

/* After a stripe was taken from a dead owner: the chunks every dead process left in flight.
 * Returns how many slots had one. */
int shmkv_reclaim_dead_inflight(store_t *st) {
    int n = 0;
    if (shmkv_reg_lock(st) < 0) return 0;
    for (uint32_t i = 0; i < SHMKV_MAX_SLOTS; i++) {
        slot_t *s = &st->slots[i];
        if (s->pid && (s->inflight || s->kept) && !shmkv_slot_alive(st, i)) {
            shmkv_reclaim_slot_inflight_locked(st, i);
            n++;
        }
    }
    shmkv_reg_unlock(st);
    return n;
}
