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

/* Busy candidates (IN FLIGHT, or a stripe another process holds) one walk skips before it
 * gives up; the caller backs off and walks again (shmkv_alloc_locked). At most two chunks per
 * process are IN FLIGHT (the one it fills and the one it keeps: slab.c shmkv_take_kept, only
 * in classes of KEEP_MIN_CHUNKS or more) and each process holds at most one stripe, so meeting
 * this many in a row means the class really is busy at this instant. */
#define BUSY_TRIES 64

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
 * out of every list and counted as free, in *out. Returns SHMKV_EBUSY when every candidate
 * it met was busy (IN FLIGHT, or its stripe held by someone else), SHMKV_EFULL when the
 * LRU is empty.
 *
 * CLOCK is bounded: a second chance clears the active bit, so one pass over the list leaves
 * no active item behind. The walk therefore honours active bits only for the first `used`
 * steps (the list's length: every chunk not free is on it) and evicts the first candidate
 * that is not busy after that -- even one a reader re-activated meanwhile, so readers
 * racing the walk cannot starve it. Second chances never count against a budget; only busy
 * candidates do (BUSY_TRIES), because only they say "nothing evictable right now".
 * Rejected: a fixed number of tries for everything (the first design): a hot set longer than
 * the budget at the tail made eviction refuse while almost every item was evictable.
 * Cost: one step per second chance, each bought by a read since the item last passed the
 * tail, so amortised O(1) per eviction; O(items) at worst, once per sweep. */
int shmkv_evict_locked(store_t *st, uint32_t cls, uint32_t held_stripe, uint32_t *out) {
    class_t *c = &st->classes[cls];
    uint64_t now = 0;
    /* the list's length; capped by the class's chunks should the counter be off */
    uint64_t sweep = c->used, chunks = c->pages * c->per_page;
    if (sweep > chunks) sweep = chunks;
    sweep++;
    uint32_t busy = 0;
    for (uint64_t step = 0; c->lru_tail; step++) {
        uint32_t off = c->lru_tail;
        item_t *it = shmkv_item(st, off);
        uint8_t state = __atomic_load_n(&it->state, __ATOMIC_ACQUIRE);
        if (state == IT_INFLIGHT && !shmkv_steal_kept_locked(st, it, off)) { /* a writer is filling it */
            rotate(st, c, it, off);
            if (++busy >= BUSY_TRIES) return SHMKV_EBUSY;
            continue;
        }
        if (state == IT_LINKED) {
            if (it->expire_ms && !now) now = shmkv_now_ms();
            int expired = it->expire_ms && it->expire_ms <= now;
            if (it->active && !expired && step < sweep) {
                it->active = 0;
                rotate(st, c, it, off);
                continue;
            }
            if (shmkv_unlink_victim(st, it, off, held_stripe) != 0) {
                rotate(st, c, it, off); /* its stripe is busy: try the next one */
                if (++busy >= BUSY_TRIES) return SHMKV_EBUSY;
                continue;
            }
            if (expired) STAT(st, ST_EXPIRED);
            else {
                c->evictions++;
                STAT(st, ST_EVICTIONS);
            }
        }
        /* UNLINKED (a replaced item nobody freed yet), a kept chunk taken back, or LINKED and
         * now unlinked */
        shmkv_list_remove(st, c, it, off);
        it->state = IT_FREE;
        it->owner = 0;
        it->active = 0;
        c->used--;
        st->pagemeta[shmkv_page_of(st, off)].used--;
        *out = off;
        return 0;
    }
    return busy ? SHMKV_EBUSY : SHMKV_EFULL;
}
