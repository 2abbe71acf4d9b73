/* slab.c -- slab classes over fixed-size pages: allocation, freeing, page assignment, and
 * moving pages between classes ("automove", after memcached's slab rebalancer).
 *
 * A page belongs to one class (pagemeta.cls) and is cut into that class's chunks. Pages go
 * to classes on demand under the page lock. When a class is out of memory it evicts from its
 * own LRU tail; every 64th eviction, and whenever the class owns no memory at all, it looks
 * for a class whose recent demand per page is far lower and takes that class's emptiest
 * page, so memory follows the workload instead of calcifying in classes nobody writes to.
 *
 * Locks: functions named *_locked REQUIRE the class lock of `cls`. The donor of a page move
 * is locked with trylock (we already hold a class lock: blocking would break the order).
 */
#include <sched.h>
#include <string.h>
#include <time.h>

#include "core.h"

#define AUTOMOVE_EVERY 64
/* Walks that found only busy candidates before an allocation gives up with StoreFull; with
 * backoff() between them they span ~10 ms. */
#define EVICT_RETRIES 12

/* Between two walks of a busy class: yield at first (the holder may be running on the other
 * core and about to finish), then sleep 50 us doubling to 2 ms. Releases the GIL for it. */
static void backoff(int attempt) {
    if (attempt < 2) {
        sched_yield();
        return;
    }
    long us = 50L << (attempt - 2);
    if (us > 2000) us = 2000;
    struct timespec ts = {0, us * 1000};
    if (PyGILState_Check()) {
        Py_BEGIN_ALLOW_THREADS
        nanosleep(&ts, NULL);
        Py_END_ALLOW_THREADS
    } else {
        nanosleep(&ts, NULL);
    }
}

void shmkv_backoff(int attempt) { backoff(attempt); }

int shmkv_class_for(store_t *st, uint32_t itemsize) {
    uint32_t lo = 0, hi = st->hdr->nclasses;
    if (itemsize > st->classes[hi - 1].size) return -1;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (st->classes[mid].size < itemsize) lo = mid + 1;
        else hi = mid;
    }
    return (int)lo;
}

int shmkv_class_lock(store_t *st, uint32_t cls) {
    int rc = shmkv_lock(st, &st->classes[cls].lock.m, LK_CLASS);
    if (rc == 1) {
        shmkv_repair_class_locked(st, cls);
        shmkv_lock_consistent(&st->classes[cls].lock.m);
        STAT(st, ST_REPAIRS);
        rc = 0;
    }
    return rc;
}

void shmkv_class_unlock(store_t *st, uint32_t cls) { shmkv_unlock(&st->classes[cls].lock.m); }

static int page_lock(store_t *st) {
    int rc = shmkv_lock(st, &st->hdr->page_lock.m, LK_PAGE);
    if (rc == 1) {
        shmkv_repair_pages_locked(st);
        shmkv_lock_consistent(&st->hdr->page_lock.m);
        STAT(st, ST_REPAIRS);
        rc = 0;
    }
    return rc;
}

/* REQUIRES: class lock of `cls`, and page `p` assigned to `cls` with no live chunk. Writes
 * a FREE header into every chunk before listing it, so a crash mid-cut leaves chunks that
 * class repair recognises (FREE, or NONE on a zeroed page). */
static void cut_page_locked(store_t *st, uint32_t cls, uint32_t p) {
    class_t *c = &st->classes[cls];
    char *base = shmkv_page_addr(st, p);
    for (uint32_t i = 0; i < c->per_page; i++) {
        item_t *it = (item_t *)(base + (uint64_t)i * c->size);
        it->state = IT_FREE;
        it->cls = (uint8_t)cls;
        it->listed = LS_NONE;
        it->active = 0;
        it->owner = 0;
    }
    for (uint32_t i = c->per_page; i-- > 0;) {
        item_t *it = (item_t *)(base + (uint64_t)i * c->size);
        shmkv_list_push_head(st, c, it, shmkv_off(st, it), LS_FREE);
        if (i == c->per_page / 2) CRASH_POINT(st, CP_PAGE_HALF_CUT);
    }
    st->pagemeta[p].used = 0;
    c->pages++;
}

/* REQUIRES: class lock of `cls`. Takes an unassigned page, if any is left. */
static int grab_page_locked(store_t *st, uint32_t cls) {
    header_t *h = st->hdr;
    if (page_lock(st) < 0) return -1;
    uint32_t found = h->npages;
    for (uint32_t i = 0; i < h->npages; i++) {
        uint32_t p = (uint32_t)((h->next_page_hint + i) % h->npages);
        if (st->pagemeta[p].cls == SHMKV_PAGE_UNASSIGNED) {
            found = p;
            break;
        }
    }
    if (found < h->npages) {
        st->pagemeta[found].cls = (uint16_t)cls;
        h->next_page_hint = found + 1;
    }
    shmkv_unlock(&h->page_lock.m);
    if (found == h->npages) return -1;
    cut_page_locked(st, cls, found);
    return 0;
}

/* REQUIRES: class lock of donor `d`; page `p` belongs to it. Empties the page: free chunks
 * leave the free list, live items are evicted (their stripes taken with trylock). Returns 0
 * when the page holds nothing anyone can reach; -1 (page left with the donor, every chunk
 * already emptied put back on the free list) when an item is busy. */
static int evacuate_page_locked(store_t *st, uint32_t d, uint32_t p, uint32_t held_stripe) {
    class_t *c = &st->classes[d];
    char *base = shmkv_page_addr(st, p);
    int ok = 1;
    for (uint32_t i = 0; i < c->per_page && ok; i++) {
        item_t *it = (item_t *)(base + (uint64_t)i * c->size);
        uint32_t off = shmkv_off(st, it);
        uint8_t state = __atomic_load_n(&it->state, __ATOMIC_ACQUIRE);
        if (state == IT_INFLIGHT) {
            if (shmkv_slot_alive(st, (uint32_t)it->owner - 1) && !shmkv_steal_kept_locked(st, it, off)) {
                ok = 0;
                break;
            }
        } else if (state == IT_LINKED) {
            if (shmkv_unlink_victim(st, it, off, held_stripe) != 0) { ok = 0; break; }
            c->evictions++;
            STAT(st, ST_EVICTIONS);
        }
        if (it->listed != LS_NONE) shmkv_list_remove(st, c, it, off);
        if (state != IT_FREE && state != IT_NONE) {
            c->used--;
            st->pagemeta[p].used--;
        }
        it->state = IT_FREE;
        it->owner = 0;
    }
    if (!ok) { /* give back what was emptied */
        for (uint32_t i = 0; i < c->per_page; i++) {
            item_t *it = (item_t *)(base + (uint64_t)i * c->size);
            if (it->listed == LS_NONE && (it->state == IT_FREE || it->state == IT_NONE)) {
                it->state = IT_FREE;
                shmkv_list_push_head(st, c, it, shmkv_off(st, it), LS_FREE);
            }
        }
        return -1;
    }
    return 0;
}

/* REQUIRES: class lock of `cls`. Moves one page from a colder class to `cls`. */
static int automove_locked(store_t *st, uint32_t cls, uint32_t held_stripe) {
    header_t *h = st->hdr;
    class_t *dst = &st->classes[cls];
    uint64_t dst_rate = dst->recent_allocs / (dst->pages ? dst->pages : 1);
    uint32_t donor = h->nclasses;
    uint64_t best = UINT64_MAX;
    for (uint32_t i = 0; i < h->nclasses; i++) {
        class_t *c = &st->classes[i];
        uint64_t pages = __atomic_load_n(&c->pages, __ATOMIC_RELAXED);
        if (i == cls || pages == 0) continue;
        if (dst->pages > 0 && pages < 2) continue; /* don't strip a class bare for a rebalance */
        uint64_t rate = __atomic_load_n(&c->recent_allocs, __ATOMIC_RELAXED) / pages;
        if (rate < best) { best = rate; donor = i; }
        /* decay: demand is measured over the recent past, halving at each check. A racy
         * read-modify-write: losing an update only blurs a heuristic. */
        __atomic_store_n(&c->recent_allocs, __atomic_load_n(&c->recent_allocs, __ATOMIC_RELAXED) / 2,
                         __ATOMIC_RELAXED);
    }
    dst->recent_allocs /= 2;
    if (donor == h->nclasses) return -1;
    if (dst->pages > 0 && best * 4 > dst_rate) return -1; /* the donor is not much colder */

    class_t *dc = &st->classes[donor];
    int rc = shmkv_trylock(&dc->lock.m);
    if (rc == 1) {
        shmkv_repair_class_locked(st, donor);
        shmkv_lock_consistent(&dc->lock.m);
    } else if (rc != 0) {
        return -1;
    }
    int moved = -1;
    uint32_t victim = h->npages;
    uint32_t least = UINT32_MAX;
    for (uint32_t p = 0; p < h->npages; p++)
        if (st->pagemeta[p].cls == donor && st->pagemeta[p].used < least) {
            least = st->pagemeta[p].used;
            victim = p;
        }
    if (victim < h->npages && page_lock(st) == 0) {
        if (st->pagemeta[victim].cls == donor &&
            evacuate_page_locked(st, donor, victim, held_stripe) == 0) {
            /* MOVING + zeroing: a crash here leaves a page that page repair zeroes again and
             * returns to the unassigned pool. */
            st->pagemeta[victim].cls = SHMKV_PAGE_MOVING;
            dc->pages--;
            memset(shmkv_page_addr(st, victim), 0, h->page_size);
            CRASH_POINT(st, CP_PAGE_MOVING);
            st->pagemeta[victim].cls = (uint16_t)cls;
            moved = 0;
        }
        shmkv_unlock(&h->page_lock.m);
    }
    shmkv_unlock(&dc->lock.m);
    if (moved == 0) {
        cut_page_locked(st, cls, victim);
        STAT(st, ST_AUTOMOVES);
    }
    return moved;
}

/* REQUIRES: no class lock and no page lock (a stripe may be held: `held_stripe`). A page for
 * the btree's nodes (btree.c: shmkv_tree_grow): an unassigned one, else the emptiest page of
 * the class with the fewest recent allocations per page (but not the page of `mine`, the
 * caller's own chunk IN FLIGHT), emptied as a page move empties it (its items evicted; -1
 * if one is busy). Returns the page with the page lock HELD, zeroed
 * and marked MOVING -- a crash there leaves it to page repair, which returns it to the
 * unassigned pool -- or -1 (no lock held). */
int shmkv_page_for_nodes(store_t *st, uint32_t held_stripe, uint32_t mine) {
    header_t *h = st->hdr;
    if (page_lock(st) < 0) return -1;
    for (uint32_t i = 0; i < h->npages; i++) {
        uint32_t p = (uint32_t)((h->next_page_hint + i) % h->npages);
        if (st->pagemeta[p].cls == SHMKV_PAGE_UNASSIGNED) {
            st->pagemeta[p].cls = SHMKV_PAGE_MOVING;
            memset(shmkv_page_addr(st, p), 0, h->page_size);
            return (int)p;
        }
    }
    shmkv_unlock(&h->page_lock.m);
    uint32_t donor = h->nclasses;
    uint64_t best = UINT64_MAX;
    for (uint32_t i = 0; i < h->nclasses; i++) {
        class_t *c = &st->classes[i];
        uint64_t pages = __atomic_load_n(&c->pages, __ATOMIC_RELAXED);
        if (pages == 0) continue;
        uint64_t rate = __atomic_load_n(&c->recent_allocs, __ATOMIC_RELAXED) / pages;
        if (rate < best) { best = rate; donor = i; }
    }
    if (donor == h->nclasses) return -1;
    class_t *dc = &st->classes[donor];
    if (shmkv_class_lock(st, donor) < 0) return -1; /* (no class lock held: it may block) */
    uint32_t victim = h->npages, least = UINT32_MAX;
    uint32_t avoid = shmkv_page_of(st, mine);
    for (uint32_t p = 0; p < h->npages; p++)
        if (st->pagemeta[p].cls == donor && st->pagemeta[p].used < least && p != avoid) {
            least = st->pagemeta[p].used;
            victim = p;
        }
    int got = -1;
    if (victim < h->npages && page_lock(st) == 0) {
        if (st->pagemeta[victim].cls == donor && evacuate_page_locked(st, donor, victim, held_stripe) == 0) {
            st->pagemeta[victim].cls = SHMKV_PAGE_MOVING;
            dc->pages--;
            memset(shmkv_page_addr(st, victim), 0, h->page_size);
            STAT(st, ST_AUTOMOVES);
            got = (int)victim;
        } else {
            shmkv_unlock(&h->page_lock.m);
        }
    }
    shmkv_unlock(&dc->lock.m);
    return got;
}

/* REQUIRES: class lock of `cls`, which this RELEASES AND RETAKES while it backs off (the
 * caller keeps nothing of the class across the call); on SHMKV_ELOCK it is not held.
 * Room for one chunk when the class has no free chunk and no unassigned page is left: a
 * page from a colder class (automove), else an eviction. "Every candidate is busy" (each
 * one IN FLIGHT or behind a stripe someone else holds) is a state of an instant, not of the
 * store: back off -- the class lock released, so the holders can finish, and the GIL
 * released for the sleep -- and walk again, EVICT_RETRIES times (~10 ms) before StoreFull.
 * A page move fails the same transient way (its donor's lock or one of its items busy), so
 * it gets the same retries.
 * Rejected: giving up at the first busy walk (StoreFull under ordinary contention), and
 * retrying forever (a store whose every candidate stays busy -- a SIGSTOPped holder on a
 * one-stripe store -- would hang its writers instead of telling them). */
static int make_room_locked(store_t *st, uint32_t cls, uint32_t held_stripe, uint32_t *off) {
    class_t *c = &st->classes[cls];
    for (int attempt = 0;; attempt++) {
        int tried = 0;
        if (c->pages == 0 || c->evictions % AUTOMOVE_EVERY == 0) {
            tried = 1;
            automove_locked(st, cls, held_stripe);
        }
        if (c->free_head) return 0;
        if (shmkv_evict_locked(st, cls, held_stripe, off) == 0) return 0;
        if (!tried && automove_locked(st, cls, held_stripe) == 0) return 0;
        if (attempt >= EVICT_RETRIES) return SHMKV_EFULL;
        shmkv_class_unlock(st, cls);
        backoff(attempt);
        int rc = shmkv_class_lock(st, cls);
        if (rc < 0) return rc;
        if (c->free_head) return 0; /* someone freed a chunk meanwhile */
    }
}

/* REQUIRES: class lock of `cls` (released and retaken inside if the class must wait for
 * room: see make_room_locked; on SHMKV_ELOCK it is not held). Takes a chunk for a new item
 * and marks it IN FLIGHT for this process; the chunk goes to the LRU head (eviction skips
 * IN FLIGHT chunks). */
int shmkv_alloc_locked(store_t *st, uint32_t cls, uint32_t held_stripe, uint32_t *out) {
    class_t *c = &st->classes[cls];
    uint32_t off = 0;
    c->allocs++;
    c->recent_allocs++;
    if (!c->free_head && grab_page_locked(st, cls) != 0) {
        int rc = make_room_locked(st, cls, held_stripe, &off);
        if (rc < 0) {
            if (rc == SHMKV_EFULL) STAT(st, ST_FULL);
            return rc;
        }
    }
    if (!off) {
        off = c->free_head;
        shmkv_list_remove(st, c, shmkv_item(st, off), off);
    }
    CRASH_POINT(st, CP_ALLOC_TAKEN);
    item_t *it = shmkv_item(st, off);
    it->state = IT_INFLIGHT;
    it->owner = (uint16_t)(st->slot + 1);
    it->cls = (uint8_t)cls;
    it->active = 0;
    it->hnext = 0;
    shmkv_me(st)->inflight = off;
    c->used++;
    st->pagemeta[shmkv_page_of(st, off)].used++;
    shmkv_list_push_head(st, c, it, off, LS_LRU);
    *out = off;
    return 0;
}

/* REQUIRES: class lock of `cls`; `off` is reachable from no chain. */
void shmkv_free_locked(store_t *st, uint32_t cls, uint32_t off) {
    class_t *c = &st->classes[cls];
    item_t *it = shmkv_item(st, off);
    if (it->listed != LS_NONE) shmkv_list_remove(st, c, it, off);
    if (it->state != IT_FREE) {
        c->used--;
        st->pagemeta[shmkv_page_of(st, off)].used--;
    }
    it->state = IT_FREE;
    it->owner = 0;
    shmkv_list_push_head(st, c, it, off, LS_FREE);
}

/* Frees `off` if it is still the UNLINKED leftover of this process (eviction or a repair
 * may have freed, even reused, it meanwhile). Takes the class lock. */
void shmkv_free_unlinked(store_t *st, uint32_t cls, uint32_t off) {
    if (cls >= st->hdr->nclasses || shmkv_class_lock(st, cls) != 0) return;
    item_t *it = shmkv_item(st, off);
    /* its page may have moved to another class meanwhile: check the chunk grid first */
    if (shmkv_chunk_class(st, off) == (int)cls && it->state == IT_UNLINKED && it->owner == st->slot + 1 && it->cls == cls)
        shmkv_free_locked(st, cls, off);
    shmkv_class_unlock(st, cls);
}

/* This process's kept chunk (slot.kept: the last version it replaced), for a put of class
 * `cls`: taken with no class lock -- the chunk is IN FLIGHT and ours, so no other process
 * writes it, repairs keep it, and its page cannot change class; the one thing another process
 * may do is take it back (eviction, a page move: shmkv_steal_kept_locked), which the swap of
 * `kept` to 0 below decides. It keeps its place on the LRU and gets the active bit: an
 * overwrite counts as a use, so CLOCK gives it a second chance where the old version sat
 * instead of a relink to the head under the class lock. That lock was the one every
 * overwrite of one class took (bench/btree_put_scaling.py: two processes overwriting 100 B
 * values ran at 0.28x one). Bounded CLOCK (lru.c) makes those second chances cost one step
 * each. Rejected: the relink to the head (the design before): right order, shared lock.
 * Returns 1 with *out, the chunk now this process's IN FLIGHT one; 0 when there is none of
 * that class (the kept one stays kept). Crash order: `inflight` names the chunk before
 * `kept` lets go of it, so a SIGKILL in between leaves it named twice, never zero times
 * (repair.c frees it once: the state check). */
int shmkv_take_kept(store_t *st, uint32_t cls, uint32_t *out) {
    slot_t *me = shmkv_me(st);
    uint32_t p = __atomic_load_n(&me->kept, __ATOMIC_ACQUIRE);
    if (!p) return 0;
    item_t *it = shmkv_item(st, p);
    if (it->cls != cls) return 0; /* (a chunk just stolen may read anything: the swap decides) */
    __atomic_store_n(&me->inflight, p, __ATOMIC_RELEASE);
    CRASH_POINT(st, CP_KEPT_TAKEN);
    /* Eviction and page moves may take it back meanwhile (shmkv_steal_kept_locked): whoever
     * swaps `kept` from p to 0 has it; this process writes into it only after winning */
    uint32_t expect = p;
    if (!__atomic_compare_exchange_n(&me->kept, &expect, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&me->inflight, 0, __ATOMIC_RELEASE);
        return 0;
    }
    if (__atomic_load_n(&it->state, __ATOMIC_ACQUIRE) != IT_INFLIGHT || it->owner != st->slot + 1 || it->cls != cls) {
        __atomic_store_n(&me->inflight, 0, __ATOMIC_RELEASE); /* not ours (a verify() that thought us dead) */
        return 0;
    }
    it->active = 1;
    it->hnext = 0;
    *out = p;
    return 1;
}

/* REQUIRES: the class lock of the chunk at `off`, IN FLIGHT for a live process. Takes it back
 * from that process when it is the chunk the process keeps (slot.kept names it): 1 when this
 * call took it -- it is reachable from no chain, so the caller frees or reuses it as it would
 * an UNLINKED leftover; 0 when it is a chunk being written (busy). Why: a process that kept a
 * chunk and then went idle would pin it, and with it its page, for as long as it lives. */
int shmkv_steal_kept_locked(store_t *st, item_t *it, uint32_t off) {
    uint16_t o = it->owner;
    if (o < 1 || o > SHMKV_MAX_SLOTS) return 0;
    uint32_t expect = off;
    return __atomic_compare_exchange_n(&st->slots[o - 1u].kept, &expect, 0, 0, __ATOMIC_ACQ_REL,
                                       __ATOMIC_ACQUIRE);
}

/* Frees `off` if it is still IN FLIGHT for process slot `slot` (takes its class lock; the
 * chunk may have been freed, even reused, meanwhile: the class lock decides). 1 if freed. */
int shmkv_free_inflight_of(store_t *st, uint32_t slot, uint32_t off) {
    item_t *it = shmkv_item(st, off);
    uint32_t cls = it->cls;
    int freed = 0;
    if (cls >= st->hdr->nclasses || shmkv_class_lock(st, cls) != 0) return 0;
    if (shmkv_chunk_class(st, off) == (int)cls && it->state == IT_INFLIGHT && it->owner == slot + 1 &&
        it->cls == cls) {
        shmkv_free_locked(st, cls, off);
        freed = 1;
    }
    shmkv_class_unlock(st, cls);
    return freed;
}

/* A class keeps replaced chunks only when it has this many (a hint: read without its lock):
 * up to two chunks per live process are then IN FLIGHT, which a small class -- a few pages of
 * large values -- could not spare (eviction skips them), while its puts are dominated by the
 * copy anyway. */
#define KEEP_MIN_CHUNKS 1024u

/* REQUIRES: the stripe that guarded `off`, which a put just unlinked (replaced by its new
 * version). Keeps it for this process's next put of its class (shmkv_take_kept), or frees it
 * now in a class too small to keep chunks. A kept chunk of another class is freed first, so
 * `kept` never loses a chunk it named. Crash order: `kept` names the chunk before its state
 * says IN FLIGHT, so a SIGKILL in between leaves a LINKED chunk that no chain reaches --
 * eviction frees that (it unlinks nothing and takes the chunk), as it did for an UNLINKED
 * leftover. */
void shmkv_keep_replaced(store_t *st, uint32_t off) {
    slot_t *me = shmkv_me(st);
    item_t *o = shmkv_item(st, off);
    o->owner = (uint16_t)(st->slot + 1);
    class_t *c = &st->classes[o->cls];
    if ((uint64_t)c->pages * c->per_page < KEEP_MIN_CHUNKS) {
        __atomic_store_n(&o->state, IT_UNLINKED, __ATOMIC_RELEASE);
        shmkv_free_unlinked(st, o->cls, off);
        return;
    }
    uint32_t prev = me->kept;
    if (prev) {
        shmkv_free_inflight_of(st, st->slot, prev);
        __atomic_store_n(&me->kept, 0, __ATOMIC_RELEASE);
    }
    __atomic_store_n(&me->kept, off, __ATOMIC_RELEASE);
    CRASH_POINT(st, CP_KEEP_NAMED);
    __atomic_store_n(&o->state, IT_INFLIGHT, __ATOMIC_RELEASE);
}

/* At close: the kept chunk goes back to its class. */
void shmkv_free_kept(store_t *st) {
    if (st->slot >= SHMKV_MAX_SLOTS) return;
    slot_t *me = shmkv_me(st);
    uint32_t p = me->kept;
    if (!p) return;
    shmkv_free_inflight_of(st, st->slot, p);
    __atomic_store_n(&me->kept, 0, __ATOMIC_RELEASE);
}
