/* lru.c -- a class's doubly linked lists (the LRU and the free list) and eviction.
 *
 * REQUIRES: the class lock, for every function here.
 *
 * Reads never touch the LRU: a hit only sets the item's `active` byte (no class lock, no
 * relink), so reads from many processes don't serialise on one lock. Eviction looks at the
 * tail: an active item gets a second chance (bit cleared, moved to the head) -- CLOCK, the
 * idea behind memcached's segmented LRU -- so a key read since it last reached the tail
 * outlives any stream of one-time writes. Expired items and leftovers of replaced items are
 * taken first.
 */
#include "core.h"

#define EVICT_TRIES 64

void shmkv_list_push_head(store_t *st, class_t *c, item_t *it, uint32_t off, int which) {
    uint32_t *head = which == LS_LRU ? &c->lru_head : &c->free_head;
    it->prev = 0;
    it->next = *head;
    if (*head) shmkv_item(st, *head)->prev = off;
    else if (which == LS_LRU) c->lru_tail = off;
    *head = off;
    it->listed = (uint8_t)which;
    if (which == LS_FREE) c->free_count++;
}

void shmkv_list_remove(store_t *st, class_t *c, item_t *it, uint32_t off) {
    (void)off;
    int which = it->listed;
    uint32_t *head = which == LS_LRU ? &c->lru_head : &c->free_head;
    if (it->prev) shmkv_item(st, it->prev)->next = it->next;
    else *head = it->next;
    if (it->next) shmkv_item(st, it->next)->prev = it->prev;
    else if (which == LS_LRU) c->lru_tail = it->prev;
    it->prev = it->next = 0;
    it->listed = LS_NONE;
    if (which == LS_FREE) c->free_count--;
}

static void rotate(store_t *st, class_t *c, item_t *it, uint32_t off) {
    if (c->lru_head == off) return;
    shmkv_list_remove(st, c, it, off);
    shmkv_list_push_head(st, c, it, off, LS_LRU);
}

/* Takes a victim from the tail of class `cls`'s LRU: unlinks it from its chain (trylock on
 * its stripe unless it is `held_stripe`, which the caller holds) and returns its chunk,
 * out of every list and counted as free, in *out. */
int shmkv_evict_locked(store_t *st, uint32_t cls, uint32_t held_stripe, uint32_t *out) {
    class_t *c = &st->classes[cls];
    uint64_t now = 0;
    for (int tries = 0; tries < EVICT_TRIES && c->lru_tail; tries++) {
        uint32_t off = c->lru_tail;
        item_t *it = shmkv_item(st, off);
        uint8_t state = __atomic_load_n(&it->state, __ATOMIC_ACQUIRE);
        if (state == IT_INFLIGHT) { /* a writer is filling it */
            rotate(st, c, it, off);
            continue;
        }
        if (state == IT_LINKED) {
            if (it->expire_ms && !now) now = shmkv_now_ms();
            int expired = it->expire_ms && it->expire_ms <= now;
            if (it->active && !expired) {
                it->active = 0;
                rotate(st, c, it, off);
                continue;
            }
            if (shmkv_unlink_victim(st, it, off, held_stripe) != 0) {
                rotate(st, c, it, off); /* its stripe is busy: try the next one */
                continue;
            }
            if (expired) STAT(st, ST_EXPIRED);
            else {
                c->evictions++;
                STAT(st, ST_EVICTIONS);
            }
        }
        /* UNLINKED (a replaced item nobody freed yet) or LINKED and now unlinked */
        shmkv_list_remove(st, c, it, off);
        it->state = IT_FREE;
        it->owner = 0;
        c->used--;
        st->pagemeta[((uint64_t)off * SHMKV_UNIT - st->hdr->off_pages) / st->hdr->page_size].used--;
        *out = off;
        return 0;
    }
    return SHMKV_EFULL;
}
