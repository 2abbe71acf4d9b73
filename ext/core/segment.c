/* segment.c -- laying out a new segment, opening an existing one, and the process table.
 *
 * Creation and attach are serialised by the Python layer with an flock on the store's lock
 * file (shmkv/segment.py); init_done is written last, so a creator killed half-way leaves a
 * segment that the next creator recognises as unfinished and lays out again.
 *
 * Process table: each attached process owns a slot and holds a write lock (fcntl, POSIX
 * record lock) on byte `slot` of the lock file. The kernel drops that lock when the process
 * dies, whatever the signal, and a reused pid cannot fake it (kill(pid, 0) can). A slot whose
 * byte is unlocked belongs to a dead process: its in-flight chunk is reclaimed (repair.c) and
 * its stats folded into the header before the slot is reused.
 *
 * A slot belongs to a process, not to a handle: every handle one process has on a segment
 * shares one slot, counted in proc_slots below (the limit is SHMKV_MAX_SLOTS processes, as
 * the README says). That is sound because one slot already serves every thread of a process:
 * a slot's one in-flight chunk is set and cleared with the GIL held throughout (no wait in
 * between), so two handles of a process cannot both have a chunk in flight, exactly as two
 * threads on one handle cannot. (Rejected: a slot per handle, which let 256 handles in one
 * process lock every other process out.)
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core.h"
#include "btree.h"

#define PAGE_SIZE_MIN (64u << 10)

uint64_t shmkv_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }
static uint32_t pow2_at_least(uint64_t v) {
    uint32_t p = 1;
    while (p < v && p < (1u << 31)) p <<= 1;
    return p;
}

/* Chunk sizes: +8 bytes at a time while that is finer than the growth factor, then
 * geometric; the last class is exactly max_item. Returns the class count, or -1 when the
 * factor is too fine for SHMKV_MAX_CLASSES. */
static int build_classes(uint32_t *sizes, uint32_t max_item, uint32_t growth_x1000) {
    uint32_t n = 0, s = SHMKV_MIN_CHUNK;
    while (s < max_item) {
        if (n >= SHMKV_MAX_CLASSES - 1) return -1;
        sizes[n++] = s;
        uint64_t next = (uint64_t)s * growth_x1000 / 1000;
        next = align_up(next, SHMKV_UNIT);
        if (next < s + SHMKV_UNIT) next = s + SHMKV_UNIT;
        s = (uint32_t)next;
    }
    sizes[n++] = (uint32_t)align_up(max_item, SHMKV_UNIT);
    return (int)n;
}

int shmkv_init_segment(char *base, const create_params_t *p, char *err, size_t errlen) {
    header_t *h = (header_t *)base;
    uint32_t sizes[SHMKV_MAX_CLASSES];
    uint32_t max_item = (uint32_t)align_up(p->max_item, SHMKV_UNIT);
    /* A page holds at least one largest item; smaller pages mean more of them, so a small
     * store can still give a page to each of the classes its workload uses. */
    uint64_t page_size = pow2_at_least(max_item);
    if (page_size < PAGE_SIZE_MIN) page_size = PAGE_SIZE_MIN;
    /* Before the class count: a max_item the store cannot hold twice would otherwise be
     * reported as "too many slab classes", which names the wrong argument. */
    if (2 * page_size > p->size) {
        snprintf(err, errlen,
                 "size %llu bytes is too small for max_item %u bytes: a page holds at "
                 "least one largest item (pages of %llu bytes here) and the store needs at "
                 "least 2 pages besides its index; raise size or lower max_item",
                 (unsigned long long)p->size, max_item, (unsigned long long)page_size);
        return -1;
    }
    int ncls = build_classes(sizes, max_item, p->growth_x1000);
    if (ncls < 0) {
        snprintf(err, errlen,
                 "growth factor %.3f makes more than %u slab classes between %u bytes and "
                 "max_item %u bytes: raise growth_factor or lower max_item",
                 p->growth_x1000 / 1000.0, SHMKV_MAX_CLASSES, SHMKV_MIN_CHUNK, max_item);
        return -1;
    }
    uint32_t nstripes = pow2_at_least(p->nstripes ? p->nstripes : 1024);
    uint32_t nbuckets = pow2_at_least(p->size / 256);
    if (nbuckets < 1024) nbuckets = 1024;
    if (nstripes > nbuckets) nstripes = nbuckets;

    uint64_t off = SHMKV_HEADER_SIZE;
    uint64_t off_slots = off;
    off += (uint64_t)SHMKV_MAX_SLOTS * sizeof(slot_t);
    uint64_t off_classes = align_up(off, 64);
    off = off_classes + (uint64_t)ncls * sizeof(class_t);
    uint64_t off_stripes = align_up(off, 64);
    off = off_stripes + (uint64_t)nstripes * sizeof(shlock_t);
    uint64_t max_pages = p->size / page_size + 1;
    uint64_t off_pagemeta = align_up(off, 64);
    off = off_pagemeta + max_pages * sizeof(pagemeta_t);
    uint64_t off_buckets = align_up(off, 64);
    off = off_buckets + (uint64_t)nbuckets * sizeof(uint32_t);
    /* The B+tree's node region (engine "btree"): a sixteenth of the segment, reserved here;
     * when it runs out the index takes slab pages as nodes (btree.c: shmkv_tree_grow), so
     * its size is a starting point, not a limit (README "Engines"). 1 KiB aligned, like the
     * pages after it: a node of a page then has an index like one of the region. */
    uint64_t off_nodes = 0, nnodes = 0;
    if (p->engine == ENGINE_BTREE) {
        off_nodes = align_up(off, BT_NODE_SIZE);
        nnodes = p->size / 16 / BT_NODE_SIZE;
        if (nnodes < 64) nnodes = 64;
        if (nnodes > UINT32_MAX / 2) nnodes = UINT32_MAX / 2;
        off = off_nodes + nnodes * BT_NODE_SIZE;
    } else if (p->engine != ENGINE_HASH) {
        snprintf(err, errlen, "unknown engine code %u", p->engine);
        return -1;
    }
    uint64_t off_pages = align_up(off, 4096);
    uint64_t npages = p->size > off_pages ? (p->size - off_pages) / page_size : 0;
    if (npages < 2) {
        snprintf(err, errlen,
                 "size %llu bytes is too small: the index needs %llu bytes and at least "
                 "2 pages of %llu bytes",
                 (unsigned long long)p->size, (unsigned long long)off_pages,
                 (unsigned long long)page_size);
        return -1;
    }
    if (p->size > SHMKV_MAX_SEGMENT) {
        snprintf(err, errlen, "size %llu bytes exceeds the 32 GiB segment limit",
                 (unsigned long long)p->size);
        return -1;
    }

    memset(base, 0, off_pages); /* pages are left as the kernel zero-filled them */
    h->layout_version = SHMKV_LAYOUT_VERSION;
    h->header_size = SHMKV_HEADER_SIZE;
    h->total_size = p->size;
    h->page_size = page_size;
    h->npages = (uint32_t)npages;
    h->nclasses = (uint32_t)ncls;
    h->nbuckets = nbuckets;
    h->nstripes = nstripes;
    h->max_key = p->max_key;
    h->max_item = max_item;
    h->growth_x1000 = p->growth_x1000;
    h->codec = p->codec;
    h->codec_arg = p->codec_arg;
    if (p->tier_path_len > SHMKV_TIER_PATH_MAX || (p->tier != TIER_NONE) != (p->tier_path_len > 0)) {
        snprintf(err, errlen, "disk tier path of %u bytes (at most %u, and only with a tier)",
                 p->tier_path_len, SHMKV_TIER_PATH_MAX);
        return -1;
    }
    h->tier = p->tier;
    h->tier_interval_ms = p->tier_interval_ms;
    h->tier_path_len = p->tier_path_len;
    if (p->tier_path_len) memcpy(h->tier_path, p->tier_path, p->tier_path_len);
    h->created_ms = shmkv_now_ms();
    h->seed = h->created_ms * 0x9E3779B97F4A7C15ULL ^ (uint64_t)getpid();
    h->off_slots = off_slots;
    h->off_classes = off_classes;
    h->off_stripes = off_stripes;
    h->off_pagemeta = off_pagemeta;
    h->off_buckets = off_buckets;
    h->off_pages = off_pages;
    h->engine = p->engine;
    h->off_nodes = off_nodes;
    h->nnodes = (uint32_t)nnodes;

    int rc;
    if ((rc = shmkv_robust_mutex_init(&h->tree_lock.m))) goto mutex_fail;
    for (uint32_t i = 0; i < SHMKV_TREE_LATCHES; i++)
        if ((rc = shmkv_robust_mutex_init(&h->tree_latch[i].m))) goto mutex_fail;
    if (p->engine == ENGINE_BTREE) shmkv_tree_init(base, h);
    if ((rc = shmkv_robust_mutex_init(&h->page_lock.m)) || (rc = shmkv_robust_mutex_init(&h->reg_lock.m))) goto mutex_fail;
    class_t *classes = (class_t *)(base + off_classes);
    for (int i = 0; i < ncls; i++) {
        classes[i].size = sizes[i];
        classes[i].per_page = (uint32_t)(page_size / sizes[i]);
        if ((rc = shmkv_robust_mutex_init(&classes[i].lock.m))) goto mutex_fail;
    }
    shlock_t *stripes = (shlock_t *)(base + off_stripes);
    for (uint32_t i = 0; i < nstripes; i++)
        if ((rc = shmkv_robust_mutex_init(&stripes[i].m))) goto mutex_fail;
    pagemeta_t *pm = (pagemeta_t *)(base + off_pagemeta);
    for (uint64_t i = 0; i < npages; i++) pm[i].cls = SHMKV_PAGE_UNASSIGNED;
    h->magic = SHMKV_MAGIC;
    __atomic_store_n(&h->init_done, SHMKV_MAGIC, __ATOMIC_RELEASE);
    return 0;
mutex_fail:
    snprintf(err, errlen, "pthread_mutex_init failed: %s", strerror(rc));
    return -1;
}

int shmkv_open(store_t *st, char *base, uint64_t size, int lockfd) {
    header_t *h = (header_t *)base;
    memset(st, 0, sizeof(*st));
    st->base = base;
    st->size = size;
    st->hdr = h;
    st->slots = (slot_t *)(base + h->off_slots);
    st->classes = (class_t *)(base + h->off_classes);
    st->stripes = (shlock_t *)(base + h->off_stripes);
    st->pagemeta = (pagemeta_t *)(base + h->off_pagemeta);
    st->buckets = (uint32_t *)(base + h->off_buckets);
    st->pages = base + h->off_pages;
    st->bucket_mask = h->nbuckets - 1;
    st->stripe_mask = h->nstripes - 1;
    st->lockfd = lockfd;
    st->slot = SHMKV_MAX_SLOTS; /* none until registered */
    return 0;
}

static int byte_lock(int fd, uint32_t slot, int cmd, short type) {
    struct flock fl;
    memset(&fl, 0, sizeof(fl));
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = slot;
    fl.l_len = 1;
    int rc = fcntl(fd, cmd, &fl);
    if (rc < 0) return -errno;
    if (cmd == F_GETLK) return fl.l_type != F_UNLCK; /* 1: another process holds it */
    return 0;
}

int shmkv_slot_alive(store_t *st, uint32_t slot) {
    if (slot == st->slot) return 1;
    uint32_t pid = st->slots[slot].pid;
    if (pid == 0) return 0;
    /* F_GETLK does not report our own locks: another handle of this very process */
    if (pid == st->pid) return 1;
    int rc = byte_lock(st->lockfd, slot, F_GETLK, F_WRLCK);
    return rc != 0; /* on a failed query assume alive: never reclaim a live writer's chunk */
}

static void fold_stats(store_t *st, slot_t *s) {
    for (int k = 0; k < ST__COUNT; k++) {
        if (k >= ST_WAIT_MAX_US && k < ST_WAIT_MAX_US + LK__COUNT) {
            if (s->stats[k] > st->hdr->retired[k]) st->hdr->retired[k] = s->stats[k];
        } else {
            st->hdr->retired[k] += s->stats[k];
        }
        s->stats[k] = 0;
    }
}

int shmkv_reg_lock(store_t *st) {
    int rc = shmkv_lock(st, &st->hdr->reg_lock.m, LK_REGISTRY);
    if (rc == 1) {
        /* The registry is a flat table: any half-written slot is re-validated by the
         * liveness test at its next use, so there is nothing to rebuild. */
        shmkv_lock_consistent(&st->hdr->reg_lock.m);
        rc = 0;
    }
    return rc;
}

void shmkv_reg_unlock(store_t *st) { shmkv_unlock(&st->hdr->reg_lock.m); }

/* This process's slots, one per segment it is attached to, with the number of handles
 * sharing each. Process memory (never shared); a segment is known by its (seed,
 * created_ms), which a re-created segment of the same name does not repeat. An entry is
 * valid only for the pid that made it: a forked child inherits a copy and ignores it (its
 * handles re-register). Read and written under that segment's reg_lock, with the GIL held and
 * no wait between a lookup and its update, so threads on other segments cannot interleave.
 * When full, a handle simply takes a slot of its own, as before. */
typedef struct {
    uint64_t seed, created_ms;
    uint32_t pid, slot, refs;
} proc_slot_t;
#define PROC_SLOTS_MAX 64
static proc_slot_t proc_slots[PROC_SLOTS_MAX];

static proc_slot_t *proc_slot_find(store_t *st) {
    for (int i = 0; i < PROC_SLOTS_MAX; i++) {
        proc_slot_t *e = &proc_slots[i];
        if (e->refs && e->pid == st->pid && e->seed == st->hdr->seed &&
            e->created_ms == st->hdr->created_ms)
            return e;
    }
    return NULL;
}

static void proc_slot_add(store_t *st, uint32_t slot) {
    for (int i = 0; i < PROC_SLOTS_MAX; i++) {
        proc_slot_t *e = &proc_slots[i];
        if (e->refs == 0 || e->pid != st->pid) {
            e->seed = st->hdr->seed;
            e->created_ms = st->hdr->created_ms;
            e->pid = st->pid;
            e->slot = slot;
            e->refs = 1;
            return;
        }
    }
}

int shmkv_register(store_t *st) {
    st->pid = (uint32_t)getpid();
    int rc = shmkv_reg_lock(st);
    if (rc < 0) return rc;
    proc_slot_t *mine = proc_slot_find(st);
    if (mine && mine->slot < SHMKV_MAX_SLOTS && st->slots[mine->slot].pid == st->pid) {
        mine->refs++;
        st->slot = mine->slot;
        shmkv_unlock(&st->hdr->reg_lock.m);
        return 0;
    }
    if (mine) mine->refs = 0; /* stale (its slot was taken from us): forget it */
    uint32_t found = SHMKV_MAX_SLOTS;
    for (uint32_t i = 0; i < SHMKV_MAX_SLOTS; i++) {
        slot_t *s = &st->slots[i];
        if (s->pid == 0 || !shmkv_slot_alive(st, i)) {
            if (s->pid) { /* a dead process's slot */
                shmkv_reclaim_slot_inflight_locked(st, i); /* repair.c */
                fold_stats(st, s);
            }
            found = i;
            break;
        }
    }
    if (found == SHMKV_MAX_SLOTS) {
        shmkv_unlock(&st->hdr->reg_lock.m);
        return SHMKV_EFULL;
    }
    rc = byte_lock(st->lockfd, found, F_SETLK, F_WRLCK);
    if (rc < 0) {
        st->last_errno = -rc;
        shmkv_unlock(&st->hdr->reg_lock.m);
        return SHMKV_ELOCK;
    }
    slot_t *s = &st->slots[found];
    s->inflight = 0;
    s->kept = 0;
    s->gen++;
    s->pid = (uint32_t)getpid();
    st->slot = found;
    proc_slot_add(st, found);
    shmkv_unlock(&st->hdr->reg_lock.m);
    return 0;
}

void shmkv_unregister(store_t *st) {
    if (st->slot >= SHMKV_MAX_SLOTS) return;
    if (shmkv_reg_lock(st) == 0) {
        proc_slot_t *mine = proc_slot_find(st);
        if (mine && mine->slot == st->slot && --mine->refs > 0) {
            /* another handle of this process still uses the slot */
            shmkv_unlock(&st->hdr->reg_lock.m);
            st->slot = SHMKV_MAX_SLOTS;
            return;
        }
        slot_t *s = &st->slots[st->slot];
        fold_stats(st, s);
        s->inflight = 0;
        s->kept = 0;
        s->pid = 0;
        byte_lock(st->lockfd, st->slot, F_SETLK, F_UNLCK);
        shmkv_unlock(&st->hdr->reg_lock.m);
    }
    st->slot = SHMKV_MAX_SLOTS;
}
