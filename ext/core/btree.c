/* btree.c -- the ordered index of engine "btree": a B+tree over the hash table's items.
 *
 * Design (README "Engines" has the user's view):
 *   - The hash table stays the source of truth: point get/put/delete are the hash engine's
 *     code. The tree is DERIVED data: key -> item offset, one entry per chained item, in key
 *     order, in 1 KiB nodes: a node region reserved at creation (layout.h: a sixteenth of the
 *     segment), and when that runs out, whole slab pages turned into nodes (shmkv_tree_grow:
 *     an unassigned page, else the emptiest page of the coldest class, its items evicted, as
 *     a page move does). Nodes are never slab CHUNKS, so the LRU, page moves and class repair
 *     never meet one (a node page is marked SHMKV_PAGE_NODES, which no class matches, and is
 *     never given back). A put of a NEW key fails with StoreFull only when no page can be
 *     had (every page's items busy), never by evicting a node.
 *   - Writers: a put or delete that changes ONE LEAF only (an overwrite, a new key into a leaf
 *     with room, a delete that keeps the leaf above its minimum; shmkv_tree_wbegin says which
 *     exactly) holds that leaf's LATCH: one of SHMKV_TREE_LATCHES robust mutexes in the
 *     header, picked by a hash of the leaf's index. Everything that changes the tree's shape
 *     (splits, merges, root growth, rebuilds, node pages) holds the TREE LOCK: the tree mutex
 *     and then every latch, 0 up, so it excludes every writer. Lock order (layout.h): stripe
 *     -> registry -> class -> page -> tree -> latches; a latch holder takes no other lock. In a
 *     btree store every publication of an item into a chain and every unlink from one happens
 *     under the tree lock or the latch of the key's leaf (table.c), so "the tree's entries =
 *     the chained items" holds whenever none is held, and while the tree lock is held the
 *     chains are frozen -- which is what makes a rebuild possible under the tree lock alone.
 *   - Readers (scans) never lock: two seqlocks. tree_version covers the SHAPE (inner nodes,
 *     root, height, free list; odd while the tree lock's holder changes it), each leaf's `ver`
 *     its entries (odd while its latch holder changes it). A reader copies up to a batch of
 *     (key, value) pairs out of the leaves and their items, noting each leaf's version before
 *     reading it, re-checks those every SCAN_CHUNK entries, and the tree's at the end; a
 *     change means retry. An item named by the tree is never freed or rewritten before its
 *     entry leaves the tree (frees follow the unlink, which moves the leaf's or the tree's
 *     version), so unchanged versions mean every byte copied was a live item's. Every offset
 *     is bounds-checked before it is followed, so a torn read is only ever a retry. After a
 *     few failed tries (a writer storm) the reader takes the tree lock for one batch:
 *     progress is guaranteed, and writers wait for one memcpy of a batch at worst.
 *   - A scan is lazy (shmkv/store.py): each batch resumes strictly after the last key it
 *     returned, so a key live during the whole scan is returned exactly once, in order.
 *   - Crashes: a process killed inside a split, merge or root growth leaves the tree lock
 *     owner-dead (and its version odd); one killed inside a leaf change leaves that leaf's
 *     latch owner-dead (and the leaf's version odd). Whoever next takes such a mutex sets
 *     tree_dirty, and the tree lock's taker (which takes every latch) rebuilds the tree from
 *     the chains (sort + bulk load) -- the index is derived, so nothing is lost. A chain cut
 *     by a stripe repair or verify() rebuilds it too (shmkv_tree_invalidate).
 * Rejected: latch coupling (readers lock nodes: a reader SIGSTOPped holding a latch stalls
 * writers, and every read writes a shared lock word); B-link trees (right-links make readers
 * correct without locks, but deletes/merges are the hard part and would not fit the time);
 * optimistic lock coupling with the latch a word in each node (LeanStore): a cache line less
 * per put, but a writer killed holding a spin word leaves a lock nobody knows is dead (every
 * waiter would check the owner's liveness), while a robust mutex hands its next taker
 * EOWNERDEAD -- and a 1 KiB node of 42 entries has no room for a 40-byte mutex. One tree
 * mutex alone (the first design) serialised every put's ~200 ns of index work, most of it
 * the leaf's cache miss: two processes put slower than one (README "Puts across processes").
 * Rejected: nodes as slab chunks: eviction, page moves and class repair would each need to
 * know them, and allocating a node under the tree lock would need a class lock (against the
 * lock order). Whole pages avoid both: a put short of nodes releases the tree lock, takes a
 * page (class -> page), then the tree lock again (page -> tree) to list its nodes. Rejected
 * too: a region sized for the most items the slab could hold (smallest chunks, sparsest
 * leaves: more than the slab itself).
 *
 * Invariants (checked by shmkv_tree_verify):
 *   - keys strictly increase along the leaf chain; every leaf is at depth height-1;
 *   - inner key i is the entry of the smallest key of child i+1's subtree (a live item);
 *   - every non-root node holds >= 1 entry; every entry names a LINKED, chained item.
 */
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "btree.h"
#include "core.h"

#define LEAF_MIN (BT_LEAF_CAP / 4)
#define INNER_MIN (BT_INNER_CAP / 4)
#define BULK_LEAF 38u  /* entries per leaf of a rebuild: room for inserts before a split */
#define BULK_INNER 32u /* children per inner node of a rebuild */
#define OPTIMISTIC_TRIES 32
#define MIN_BATCH 16u /* pairs: the smallest retry of a disturbed scan batch */

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause");
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline bt_node_t *node_at(char *base, header_t *h, uint32_t i) {
    return (bt_node_t *)(base + h->off_nodes + (uint64_t)i * BT_NODE_SIZE);
}
#define NODE(st, i) node_at((st)->base, (st)->hdr, (i))

/* Node indexes: the region's (1 .. nnodes-1) and those of slab pages turned into nodes
 * (shmkv_tree_grow): node i is at off_nodes + i KiB wherever it lies, so a page's nodes have
 * indexes like the region's. node_limit bounds every index a reader follows (a torn read
 * stays inside the segment); node_real says whether one is a node at all (verify). */
static inline uint32_t node_limit(header_t *h) { return (uint32_t)((h->total_size - h->off_nodes) / BT_NODE_SIZE); }
static inline int node_ok(header_t *h, uint32_t i) { return i > 0 && i < node_limit(h); }
static inline uint32_t nodes_per_page(header_t *h) { return (uint32_t)(h->page_size / BT_NODE_SIZE); }
static inline uint64_t nodes_total(header_t *h) { /* usable ones (node 0 is none) */
    return (uint64_t)h->nnodes - 1 + (uint64_t)h->tree_pages * nodes_per_page(h);
}
static inline uint32_t page_first_node(header_t *h, uint32_t p) {
    return (uint32_t)((h->off_pages + (uint64_t)p * h->page_size - h->off_nodes) / BT_NODE_SIZE);
}
static inline int can_grow(header_t *h) { /* segments of layout 5 always can */
    return (h->off_pages - h->off_nodes) % BT_NODE_SIZE == 0 && h->page_size % BT_NODE_SIZE == 0;
}
static int node_real(store_t *st, uint32_t i) {
    header_t *h = st->hdr;
    if (i == 0) return 0;
    if (i < h->nnodes) return 1;
    uint64_t byte = h->off_nodes + (uint64_t)i * BT_NODE_SIZE;
    if (byte < h->off_pages || byte + BT_NODE_SIZE > h->total_size) return 0;
    uint64_t p = shmkv_page_of_byte(h, byte);
    return p < h->npages && st->pagemeta[p].cls == SHMKV_PAGE_NODES;
}

/* Key bytes [from, from + 8) as a big-endian integer, zero padded: integer order = byte order. */
static inline uint64_t key_pfx(const char *k, size_t n, size_t from) {
    uint64_t p = 0;
    if (n >= from + 8) {
        memcpy(&p, k + from, 8);
        return __builtin_bswap64(p);
    }
    for (size_t i = from; i < from + 8; i++) p = p << 8 | (i < n ? (uint8_t)k[i] : 0u);
    return p;
}

typedef struct {
    const char *k;
    size_t n;
    uint64_t pfx, pfx2;
} bkey_t;

static inline bkey_t mkkey(const char *k, size_t n) {
    bkey_t b = {k, n, key_pfx(k, n, 0), key_pfx(k, n, 8)};
    return b;
}

/* The key bytes of the item at unit offset `off`, or NULL (and *ok = 0) when no item of that
 * key length can start there: an optimistic reader met a node in change. */
static inline const char *item_key(store_t *st, uint32_t off, size_t klen, int *ok) {
    uint64_t byte = (uint64_t)off * SHMKV_UNIT;
    if (byte < st->hdr->off_pages || byte + SHMKV_ITEM_HDR + klen > st->hdr->total_size) {
        *ok = 0;
        return NULL;
    }
    return st->base + byte + SHMKV_ITEM_HDR;
}

/* <0, 0, >0: `key` against the key of entry `e`. */
static inline int cmp_entry(store_t *st, const bkey_t *key, const bt_entry_t *e, int *ok) {
    if (key->pfx != e->pfx) return key->pfx < e->pfx ? -1 : 1;
    if (key->pfx2 != e->pfx2) return key->pfx2 < e->pfx2 ? -1 : 1;
    size_t el = e->klen;
    if (key->n <= 16 && el <= 16) return (key->n > el) - (key->n < el); /* the prefix is the key */
    const char *ek = item_key(st, e->off, el, ok);
    if (!ek) return 0;
    size_t m = key->n < el ? key->n : el;
    int c = m > 16 ? memcmp(key->k + 16, ek + 16, m - 16) : 0;
    if (c) return c;
    return (key->n > el) - (key->n < el);
}

/* A binary search over a cold 1 KiB node touches ~6 of its 16 cache lines one after another;
 * asking for all of them first makes that one miss's latency instead of six. */
static inline void prefetch_node(const bt_node_t *nd) {
    for (uint32_t i = 0; i < BT_NODE_SIZE; i += 64) __builtin_prefetch((const char *)nd + i);
}

/* Inner node: the number of keys <= key (the child to descend into); *eq when key[idx-1] is key. */
static inline uint32_t inner_upper(store_t *st, bt_node_t *nd, const bkey_t *key, int *eq, int *ok) {
    prefetch_node(nd);
    uint32_t lo = 0, hi = nd->n;
    if (hi > BT_INNER_CAP) {
        *ok = 0;
        return 0;
    }
    *eq = 0;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        int c = cmp_entry(st, key, &nd->u.in.k[mid], ok);
        if (c >= 0) {
            lo = mid + 1;
            if (c == 0) *eq = 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* Leaf: the first index whose entry is >= key (strict: > key); *eq when that entry is key. */
static inline uint32_t leaf_bound(store_t *st, bt_node_t *nd, const bkey_t *key, int strict, int *eq, int *ok) {
    prefetch_node(nd);
    uint32_t lo = 0, hi = nd->n;
    if (hi > BT_LEAF_CAP) {
        *ok = 0;
        return 0;
    }
    *eq = 0;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        int c = cmp_entry(st, key, &nd->u.e[mid], ok);
        if (c > 0 || (strict && c == 0)) {
            lo = mid + 1;
        } else {
            hi = mid;
            if (c == 0) *eq = 1;
        }
    }
    return lo;
}

/* -- the seqlock's write side (REQUIRES: tree lock) -------------------------------------- */

static inline void w_begin(store_t *st) {
    uint64_t v = __atomic_load_n(&st->hdr->tree_version, __ATOMIC_RELAXED);
    /* a dead writer may have left it odd: make it odd by exactly one step from even */
    __atomic_store_n(&st->hdr->tree_version, (v | 1u), __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
static inline void w_end(store_t *st) {
    uint64_t v = __atomic_load_n(&st->hdr->tree_version, __ATOMIC_RELAXED);
    __atomic_store_n(&st->hdr->tree_version, (v | 1u) + 1u, __ATOMIC_RELEASE);
}

/* -- nodes (REQUIRES: tree lock) ------------------------------------------------------- */

static uint32_t node_alloc(store_t *st) {
    header_t *h = st->hdr;
    uint32_t i = h->tree_free;
    if (!i) return 0;
    bt_node_t *nd = NODE(st, i);
    h->tree_free = nd->next;
    h->tree_nfree--;
    memset(nd, 0, sizeof *nd);
    return i;
}

static void node_free(store_t *st, uint32_t i) {
    header_t *h = st->hdr;
    bt_node_t *nd = NODE(st, i);
    memset(nd, 0, sizeof *nd);
    nd->next = h->tree_free;
    h->tree_free = i;
    h->tree_nfree++;
}

static inline void push_free(char *base, header_t *h, uint32_t i) {
    bt_node_t *nd = node_at(base, h, i);
    memset(nd, 0, sizeof *nd);
    nd->next = h->tree_free;
    h->tree_free = i;
    h->tree_nfree++;
}

/* Every node free (the region's and every node page's); no root. Under the tree lock the set
 * of node pages is fixed: a page becomes nodes under page + tree lock, and never goes back. */
static void reset_nodes(char *base, header_t *h) {
    pagemeta_t *pm = (pagemeta_t *)(base + h->off_pagemeta);
    h->tree_free = 0;
    h->tree_nfree = 0;
    h->tree_pages = 0;
    for (uint32_t p = h->npages; p-- > 0;) {
        if (pm[p].cls != SHMKV_PAGE_NODES) continue;
        h->tree_pages++;
        for (uint32_t j = nodes_per_page(h); j-- > 0;) push_free(base, h, page_first_node(h, p) + j);
    }
    for (uint32_t i = h->nnodes; i-- > 1;) push_free(base, h, i);
    h->tree_root = 0;
    h->tree_height = 0;
    h->tree_keys = 0;
}

int shmkv_tree_init(char *base, header_t *h) {
    reset_nodes(base, h);
    uint32_t r = h->tree_free;
    bt_node_t *nd = node_at(base, h, r);
    h->tree_free = nd->next;
    h->tree_nfree--;
    memset(nd, 0, sizeof *nd);
    nd->leaf = 1;
    h->tree_root = r;
    h->tree_height = 1;
    return 0;
}

/* -- locking ------------------------------------------------------------------------- */

/* The tree lock: the tree mutex, then every leaf latch, 0 up (layout.h's order). Its holder
 * excludes every other writer of the tree, and so may change its shape; a leaf-latch holder
 * (below: shmkv_tree_wbegin) changes one leaf's entries only. A dead holder of the tree mutex
 * or of any latch (EOWNERDEAD: each is marked consistent at once, with tree_dirty set first,
 * so no later failure can leave a latch unrecoverable) means a tree left mid-change: rebuilt
 * from the chains here, which every latch held freezes (table.c publishes and unlinks only
 * under the tree lock or the latch of the key's leaf). */
static void latches_unlock(header_t *h, uint32_t n) {
    while (n-- > 0) shmkv_unlock(&h->tree_latch[n].m);
}

int shmkv_tree_lock(store_t *st) {
    header_t *h = st->hdr;
    int rc = shmkv_lock(st, &h->tree_lock.m, LK_TREE);
    if (rc < 0) return rc;
    if (rc == 1) {
        __atomic_store_n(&h->tree_dirty, 1u, __ATOMIC_SEQ_CST);
        shmkv_lock_consistent(&h->tree_lock.m);
    }
    for (uint32_t i = 0; i < SHMKV_TREE_LATCHES; i++) {
        int r = shmkv_lock(st, &h->tree_latch[i].m, LK_TREE);
        if (r < 0) {
            latches_unlock(h, i);
            shmkv_unlock(&h->tree_lock.m);
            return r;
        }
        if (r == 1) {
            __atomic_store_n(&h->tree_dirty, 1u, __ATOMIC_SEQ_CST);
            shmkv_lock_consistent(&h->tree_latch[i].m);
        }
    }
    if (__atomic_load_n(&h->tree_dirty, __ATOMIC_ACQUIRE)) {
        shmkv_tree_rebuild_locked(st); /* clears tree_dirty once the tree is whole */
        STAT(st, ST_REPAIRS);
    }
    return 0;
}

void shmkv_tree_unlock(store_t *st) {
    latches_unlock(st->hdr, SHMKV_TREE_LATCHES);
    shmkv_unlock(&st->hdr->tree_lock.m);
}

/* Room for the splits of one insert (height + 1 nodes), plus an eighth of the nodes in use:
 * a rebuild packs BULK_LEAF of BT_LEAF_CAP entries per leaf, so it needs up to ~1/8 more
 * nodes than a tree of full leaves, and must never run out (it cannot take a page). */
int shmkv_tree_room_locked(store_t *st) {
    header_t *h = st->hdr;
    uint64_t used = nodes_total(h) - h->tree_nfree;
    return h->tree_height < BT_MAX_HEIGHT && h->tree_nfree >= h->tree_height + 1u + used / 8;
}

int shmkv_tree_grow(store_t *st, uint32_t held_stripe, uint32_t mine) {
    header_t *h = st->hdr;
    if (!can_grow(h)) return -1;
    int p = shmkv_page_for_nodes(st, held_stripe, mine); /* page lock held from here */
    if (p < 0) return -1;
    if (shmkv_tree_lock(st) < 0) { /* (a pthread error) the page, zeroed, back to the pool */
        st->pagemeta[p].cls = SHMKV_PAGE_UNASSIGNED;
        shmkv_unlock(&h->page_lock.m);
        return -1;
    }
    /* page -> tree (the lock order): a crash from here leaves the tree lock owner-dead, and
     * its next locker's rebuild lists every node page's nodes, this one's included */
    st->pagemeta[p].cls = SHMKV_PAGE_NODES;
    h->tree_pages++;
    CRASH_POINT(st, CP_BTREE_GROW);
    for (uint32_t j = nodes_per_page(h); j-- > 0;) push_free(st->base, h, page_first_node(h, (uint32_t)p) + j);
    shmkv_tree_unlock(st);
    shmkv_unlock(&h->page_lock.m);
    return 0;
}

void shmkv_tree_invalidate(store_t *st) {
    if (!shmkv_is_btree(st) || shmkv_tree_lock(st) < 0) return;
    shmkv_tree_rebuild_locked(st);
    shmkv_tree_unlock(st);
}

/* -- insert -------------------------------------------------------------------------- */

typedef struct {
    uint32_t node[BT_MAX_HEIGHT];
    uint32_t idx[BT_MAX_HEIGHT];
} path_t;

/* Inserts separator `sep` with right child `right` (left sibling `left`) into the inner node
 * at depth d of the path; d < 0: the root split, the tree grows a level. */
static void insert_inner(store_t *st, path_t *p, int d, bt_entry_t sep, uint32_t right, uint32_t left) {
    header_t *h = st->hdr;
    if (d < 0) {
        uint32_t ni = node_alloc(st);
        bt_node_t *N = NODE(st, ni);
        N->leaf = 0;
        N->level = (uint8_t)h->tree_height;
        N->n = 1;
        N->u.in.k[0] = sep;
        N->u.in.c[0] = left;
        N->u.in.c[1] = right;
        CRASH_POINT(st, CP_BTREE_ROOT_GROW);
        h->tree_root = ni;
        h->tree_height++;
        return;
    }
    uint32_t pi = p->node[d], idx = p->idx[d];
    bt_node_t *P = NODE(st, pi);
    if (P->n < BT_INNER_CAP) {
        memmove(&P->u.in.k[idx + 1], &P->u.in.k[idx], (P->n - idx) * sizeof(bt_entry_t));
        memmove(&P->u.in.c[idx + 2], &P->u.in.c[idx + 1], (P->n - idx) * sizeof(uint32_t));
        P->u.in.k[idx] = sep;
        P->u.in.c[idx + 1] = right;
        P->n++;
        return;
    }
    bt_entry_t tk[BT_INNER_CAP + 1];
    uint32_t tc[BT_INNER_CAP + 2];
    memcpy(tk, P->u.in.k, idx * sizeof(bt_entry_t));
    tk[idx] = sep;
    memcpy(tk + idx + 1, P->u.in.k + idx, (BT_INNER_CAP - idx) * sizeof(bt_entry_t));
    memcpy(tc, P->u.in.c, (idx + 1) * sizeof(uint32_t));
    tc[idx + 1] = right;
    memcpy(tc + idx + 2, P->u.in.c + idx + 1, (BT_INNER_CAP - idx) * sizeof(uint32_t));
    uint32_t total = BT_INNER_CAP + 1, mid = total / 2;
    uint32_t ri = node_alloc(st);
    bt_node_t *R = NODE(st, ri);
    R->leaf = 0;
    R->level = P->level;
    R->n = (uint16_t)(total - mid - 1);
    memcpy(R->u.in.k, tk + mid + 1, R->n * sizeof(bt_entry_t));
    memcpy(R->u.in.c, tc + mid + 1, (R->n + 1u) * sizeof(uint32_t));
    CRASH_POINT(st, CP_BTREE_SPLIT);
    P->n = (uint16_t)mid;
    memcpy(P->u.in.k, tk, mid * sizeof(bt_entry_t));
    memcpy(P->u.in.c, tc, (mid + 1) * sizeof(uint32_t));
    insert_inner(st, p, d - 1, tk[mid], ri, pi);
}

/* REQUIRES: tree lock, and shmkv_tree_room_locked() true if `k` may be new. Adds k -> off,
 * or points k's entry (and its separator copy, if any) at `off` when k is present. */
void shmkv_tree_upsert_locked(store_t *st, const char *k, size_t klen, uint32_t off) {
    header_t *h = st->hdr;
    bkey_t key = mkkey(k, klen);
    path_t p;
    int ok = 1, eq = 0;
    w_begin(st);
    uint32_t cur = h->tree_root;
    int inner = (int)h->tree_height - 1;
    for (int d = 0; d < inner; d++) {
        bt_node_t *nd = NODE(st, cur);
        uint32_t idx = inner_upper(st, nd, &key, &eq, &ok);
        if (eq) nd->u.in.k[idx - 1].off = off;
        p.node[d] = cur;
        p.idx[d] = idx;
        cur = nd->u.in.c[idx];
    }
    bt_node_t *L = NODE(st, cur);
    uint32_t pos = leaf_bound(st, L, &key, 0, &eq, &ok);
    if (eq) {
        L->u.e[pos].off = off;
        w_end(st);
        return;
    }
    bt_entry_t ne = {key.pfx, key.pfx2, off, (uint16_t)klen, 0};
    h->tree_keys++;
    if (L->n < BT_LEAF_CAP) {
        memmove(&L->u.e[pos + 1], &L->u.e[pos], (L->n - pos) * sizeof(bt_entry_t));
        L->u.e[pos] = ne;
        L->n++;
        w_end(st);
        return;
    }
    /* split: the lower half stays, the upper half goes to a new right sibling -- except for
     * a key past the end of the last leaf (keys written in ascending order: timestamps,
     * sequence numbers), where the left keeps BULK_LEAF entries, as dense as a rebuild packs
     * them: halves would leave every leaf of an ascending load half empty for good */
    bt_entry_t tmp[BT_LEAF_CAP + 1];
    memcpy(tmp, L->u.e, pos * sizeof(bt_entry_t));
    tmp[pos] = ne;
    memcpy(tmp + pos + 1, L->u.e + pos, (BT_LEAF_CAP - pos) * sizeof(bt_entry_t));
    uint32_t total = BT_LEAF_CAP + 1, nl = pos == BT_LEAF_CAP && !L->next ? BULK_LEAF : total / 2;
    uint32_t ri = node_alloc(st);
    bt_node_t *R = NODE(st, ri);
    R->leaf = 1;
    R->n = (uint16_t)(total - nl);
    memcpy(R->u.e, tmp + nl, R->n * sizeof(bt_entry_t));
    R->next = L->next;
    R->prev = cur;
    CRASH_POINT(st, CP_BTREE_SPLIT);
    if (L->next) NODE(st, L->next)->prev = ri;
    memcpy(L->u.e, tmp, nl * sizeof(bt_entry_t));
    L->n = (uint16_t)nl;
    L->next = ri;
    insert_inner(st, &p, inner - 1, R->u.e[0], ri, cur);
    w_end(st);
}

/* -- puts under a leaf latch ----------------------------------------------------------- */

/* Which latch guards leaf `i` (a multiplicative hash: neighbouring leaves, the ones a run of
 * nearby keys hits, get different latches). */
static inline uint32_t latch_of(uint32_t i) { return (i * 2654435761u) >> 16 & (SHMKV_TREE_LATCHES - 1u); }

#define LATCH_TRIES 4 /* optimistic descents a put tries before it takes the tree lock */

static int tree_wbegin(store_t *st, const char *k, size_t klen, int del, uint32_t doff, shmkv_tree_w_t *w);

/* REQUIRES: the stripe of k (no other lock). Makes this process the writer of k's index
 * entry: with the latch of k's leaf alone when the put changes that leaf only, else with the
 * tree lock. A put changes one leaf only when it overwrites an entry that no separator
 * copies (not the first entry of a leaf, unless it is the leftmost leaf -- or one of a key
 * of at most 16 bytes, whose separator copy's `off` it changes too: no comparison reads the
 * item of such an entry), or adds one to a leaf with room (then never in first place of a
 * non-leftmost leaf: a key there would be below the separator that led to it) while the
 * node reserve holds; inner nodes' keys and children, node counts, root and height -- the
 * tree's shape -- then stay untouched, so they change only under the tree lock, always
 * between w_begin and w_end.
 *
 * The leaf is found by a descent without locks (as a scan does: every read bounds-checked,
 * a torn one only a retry), then its latch is taken and the tree-wide version read again:
 * unchanged means no shape change happened since the descent began (the tree lock's holder
 * holds every latch before w_begin, so one in progress would have kept this latch from us),
 * so the leaf is k's, and, ours now, nobody else changes it. 0, or <0 (a lock failed). */
int shmkv_tree_wbegin(store_t *st, const char *k, size_t klen, shmkv_tree_w_t *w) {
    return tree_wbegin(st, k, klen, 0, 0, w);
}

/* The same for a delete of k's entry if it names `off` (0: whatever it names): under the
 * leaf latch when the entry is not copied by a separator and the leaf keeps LEAF_MIN
 * entries (or is the root) -- no merge, no borrow, no separator to fix. */
int shmkv_tree_dbegin(store_t *st, const char *k, size_t klen, uint32_t off, shmkv_tree_w_t *w) {
    return tree_wbegin(st, k, klen, 1, off, w);
}

static int tree_wbegin(store_t *st, const char *k, size_t klen, int del, uint32_t doff, shmkv_tree_w_t *w) {
    header_t *h = st->hdr;
    bkey_t key = mkkey(k, klen);
    w->mode = 0;
    for (int attempt = 0; attempt < LATCH_TRIES; attempt++) {
        uint64_t v = __atomic_load_n(&h->tree_version, __ATOMIC_ACQUIRE);
        if ((v & 1u) || __atomic_load_n(&h->tree_dirty, __ATOMIC_ACQUIRE)) break;
        uint32_t height = __atomic_load_n(&h->tree_height, __ATOMIC_RELAXED);
        uint32_t cur = __atomic_load_n(&h->tree_root, __ATOMIC_RELAXED);
        if (height == 0 || height > BT_MAX_HEIGHT || !node_ok(h, cur)) break;
        int ok = 1, eq = 0;
        uint32_t sepn = 0, sepi = 0; /* the separator that copies k's entry, if any */
        for (uint32_t d = 0; ok && d + 1 < height; d++) {
            bt_node_t *nd = NODE(st, cur);
            if (nd->leaf) ok = 0;
            uint32_t idx = ok ? inner_upper(st, nd, &key, &eq, &ok) : 0;
            if (ok && eq) {
                sepn = cur;
                sepi = idx - 1;
            }
            if (ok) cur = nd->u.in.c[idx];
            if (!node_ok(h, cur)) ok = 0;
        }
        if (!ok) continue;
        uint32_t l = latch_of(cur);
        int rc = shmkv_lock(st, &h->tree_latch[l].m, LK_TREE);
        if (rc < 0) return rc;
        if (rc == 1) { /* its holder died mid-change: the tree lock's taker rebuilds */
            __atomic_store_n(&h->tree_dirty, 1u, __ATOMIC_SEQ_CST);
            shmkv_lock_consistent(&h->tree_latch[l].m);
            shmkv_unlock(&h->tree_latch[l].m);
            break;
        }
        if (__atomic_load_n(&h->tree_version, __ATOMIC_ACQUIRE) != v ||
            __atomic_load_n(&h->tree_dirty, __ATOMIC_ACQUIRE)) {
            shmkv_unlock(&h->tree_latch[l].m);
            continue;
        }
        /* the leaf is k's and ours: from here every read of it is stable */
        bt_node_t *L = NODE(st, cur);
        uint32_t pos = L->leaf && L->n <= BT_LEAF_CAP ? leaf_bound(st, L, &key, 0, &eq, &ok) : (ok = 0);
        int local;
        if (del) /* nothing to delete is local too: the chain's unlink still needs a hold */
            local = ok && (!eq || (doff && L->u.e[pos].off != doff) ||
                           ((pos > 0 || L->prev == 0) && (height == 1 || L->n > LEAF_MIN)));
        else /* an overwrite of a first entry: its separator's copy too, when the key fits the
              * entry's 16 inline bytes -- then no comparison ever reads the item a separator
              * names, so a descent cannot be misled by the copy changing under it */
            local = ok && (eq ? pos > 0 || L->prev == 0 || (klen <= 16 && sepn)
                              : L->n < BT_LEAF_CAP && (pos > 0 || L->prev == 0) && shmkv_tree_room_locked(st));
        if (!local) {
            shmkv_unlock(&h->tree_latch[l].m);
            break;
        }
        STAT(st, ST_TREE_LATCHED);
        w->mode = 1;
        w->latch = l;
        w->leaf = cur;
        w->pos = pos;
        w->eq = eq;
        w->sepn = !del && eq && pos == 0 && L->prev ? sepn : 0;
        w->sepi = sepi;
        return 0;
    }
    int rc = shmkv_tree_lock(st);
    if (rc == 0) {
        STAT(st, ST_TREE_LOCKED);
        w->mode = 2;
    }
    return rc;
}

/* REQUIRES: shmkv_tree_wbegin's hold for this very key. k -> off in the index. Under a leaf
 * latch the leaf's own version is odd meanwhile (its seqlock for scans); the entry found by
 * wbegin is still where it was (only this process changes the leaf now). */
void shmkv_tree_wput(store_t *st, shmkv_tree_w_t *w, const char *k, size_t klen, uint32_t off) {
    if (w->mode != 1) {
        shmkv_tree_upsert_locked(st, k, klen, off);
        return;
    }
    bt_node_t *L = NODE(st, w->leaf);
    uint32_t ver = __atomic_load_n(&L->ver, __ATOMIC_RELAXED);
    __atomic_store_n(&L->ver, ver | 1u, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE); /* odd before any entry changes (a store-store order) */
    if (w->eq) {
        __atomic_store_n(&L->u.e[w->pos].off, off, __ATOMIC_RELAXED);
        if (w->sepn) __atomic_store_n(&NODE(st, w->sepn)->u.in.k[w->sepi].off, off, __ATOMIC_RELAXED);
    } else {
        bkey_t key = mkkey(k, klen);
        bt_entry_t ne = {key.pfx, key.pfx2, off, (uint16_t)klen, 0};
        memmove(&L->u.e[w->pos + 1], &L->u.e[w->pos], (L->n - w->pos) * sizeof(bt_entry_t));
        CRASH_POINT(st, CP_BTREE_LEAF_PUT);
        L->u.e[w->pos] = ne;
        L->n++;
        __atomic_add_fetch(&st->hdr->tree_keys, 1, __ATOMIC_RELAXED);
    }
    CRASH_POINT(st, CP_BTREE_LEAF_PUT);
    __atomic_store_n(&L->ver, (ver | 1u) + 1u, __ATOMIC_RELEASE);
}

/* REQUIRES: shmkv_tree_dbegin's hold for this very key and off. The item must still hold its
 * key (it is freed only after this returns). */
void shmkv_tree_wdel(store_t *st, shmkv_tree_w_t *w, const char *k, size_t klen, uint32_t off) {
    if (w->mode != 1) {
        shmkv_tree_delete_locked(st, k, klen, off);
        return;
    }
    bt_node_t *L = NODE(st, w->leaf);
    if (!w->eq || (off && L->u.e[w->pos].off != off)) return;
    uint32_t ver = __atomic_load_n(&L->ver, __ATOMIC_RELAXED);
    __atomic_store_n(&L->ver, ver | 1u, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memmove(&L->u.e[w->pos], &L->u.e[w->pos + 1], (L->n - w->pos - 1u) * sizeof(bt_entry_t));
    CRASH_POINT(st, CP_BTREE_LEAF_DEL);
    L->n--;
    __atomic_sub_fetch(&st->hdr->tree_keys, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&L->ver, (ver | 1u) + 1u, __ATOMIC_RELEASE);
}

void shmkv_tree_wend(store_t *st, shmkv_tree_w_t *w) {
    if (w->mode == 1) shmkv_unlock(&st->hdr->tree_latch[w->latch].m);
    else if (w->mode == 2) shmkv_tree_unlock(st);
    w->mode = 0;
}

/* -- delete -------------------------------------------------------------------------- */

static void remove_inner_key(bt_node_t *P, uint32_t ki) {
    memmove(&P->u.in.k[ki], &P->u.in.k[ki + 1], (P->n - ki - 1) * sizeof(bt_entry_t));
    memmove(&P->u.in.c[ki + 1], &P->u.in.c[ki + 2], (P->n - ki - 1) * sizeof(uint32_t));
    P->n--;
}

/* The node at depth d of the path (ni) may have fallen under its minimum: merge it with a
 * sibling when both fit one node, else borrow one entry from the sibling. */
static void rebalance(store_t *st, path_t *p, int d, uint32_t ni) {
    header_t *h = st->hdr;
    bt_node_t *N = NODE(st, ni);
    if (d == 0) {
        if (!N->leaf && N->n == 0) { /* the root shrinks a level */
            h->tree_root = N->u.in.c[0];
            h->tree_height--;
            node_free(st, ni);
        }
        return;
    }
    if (N->n >= (N->leaf ? LEAF_MIN : INNER_MIN)) return;
    uint32_t pi = p->node[d - 1], idx = p->idx[d - 1];
    bt_node_t *P = NODE(st, pi);
    uint32_t li, ri, sepi;
    if (idx < P->n) {
        li = ni;
        ri = P->u.in.c[idx + 1];
        sepi = idx;
    } else {
        li = P->u.in.c[idx - 1];
        ri = ni;
        sepi = idx - 1;
    }
    bt_node_t *L = NODE(st, li), *R = NODE(st, ri);
    if (N->leaf) {
        if (L->n + R->n <= BT_LEAF_CAP) {
            memcpy(&L->u.e[L->n], R->u.e, R->n * sizeof(bt_entry_t));
            CRASH_POINT(st, CP_BTREE_MERGE);
            L->n = (uint16_t)(L->n + R->n);
            L->next = R->next;
            if (R->next) NODE(st, R->next)->prev = li;
            remove_inner_key(P, sepi);
            node_free(st, ri);
            rebalance(st, p, d - 1, pi);
        } else if (L == N) {
            L->u.e[L->n++] = R->u.e[0];
            memmove(R->u.e, R->u.e + 1, (R->n - 1u) * sizeof(bt_entry_t));
            R->n--;
            P->u.in.k[sepi] = R->u.e[0];
        } else {
            memmove(R->u.e + 1, R->u.e, R->n * sizeof(bt_entry_t));
            R->u.e[0] = L->u.e[L->n - 1u];
            L->n--;
            R->n++;
            P->u.in.k[sepi] = R->u.e[0];
        }
        return;
    }
    if (L->n + 1u + R->n <= BT_INNER_CAP) {
        L->u.in.k[L->n] = P->u.in.k[sepi];
        memcpy(&L->u.in.k[L->n + 1u], R->u.in.k, R->n * sizeof(bt_entry_t));
        memcpy(&L->u.in.c[L->n + 1u], R->u.in.c, (R->n + 1u) * sizeof(uint32_t));
        CRASH_POINT(st, CP_BTREE_MERGE);
        L->n = (uint16_t)(L->n + 1u + R->n);
        remove_inner_key(P, sepi);
        node_free(st, ri);
        rebalance(st, p, d - 1, pi);
    } else if (L == N) { /* rotate left through the parent */
        L->u.in.k[L->n] = P->u.in.k[sepi];
        L->u.in.c[L->n + 1u] = R->u.in.c[0];
        L->n++;
        P->u.in.k[sepi] = R->u.in.k[0];
        memmove(R->u.in.k, R->u.in.k + 1, (R->n - 1u) * sizeof(bt_entry_t));
        memmove(R->u.in.c, R->u.in.c + 1, R->n * sizeof(uint32_t));
        R->n--;
    } else { /* rotate right through the parent */
        memmove(R->u.in.k + 1, R->u.in.k, R->n * sizeof(bt_entry_t));
        memmove(R->u.in.c + 1, R->u.in.c, (R->n + 1u) * sizeof(uint32_t));
        R->u.in.k[0] = P->u.in.k[sepi];
        R->u.in.c[0] = L->u.in.c[L->n];
        R->n++;
        P->u.in.k[sepi] = L->u.in.k[L->n - 1u];
        L->n--;
    }
}

/* REQUIRES: tree lock. Removes k's entry if it names `off` (0: whatever it names). The item
 * must still hold its key (it is freed only after this returns). */
void shmkv_tree_delete_locked(store_t *st, const char *k, size_t klen, uint32_t off) {
    header_t *h = st->hdr;
    bkey_t key = mkkey(k, klen);
    path_t p;
    int ok = 1, eq = 0;
    uint32_t cur = h->tree_root;
    int inner = (int)h->tree_height - 1;
    for (int d = 0; d < inner; d++) {
        bt_node_t *nd = NODE(st, cur);
        uint32_t idx = inner_upper(st, nd, &key, &eq, &ok);
        p.node[d] = cur;
        p.idx[d] = idx;
        cur = nd->u.in.c[idx];
    }
    bt_node_t *L = NODE(st, cur);
    uint32_t pos = leaf_bound(st, L, &key, 0, &eq, &ok);
    if (!eq || (off && L->u.e[pos].off != off)) return;
    uint32_t gone = L->u.e[pos].off;
    w_begin(st);
    memmove(&L->u.e[pos], &L->u.e[pos + 1], (L->n - pos - 1u) * sizeof(bt_entry_t));
    L->n--;
    h->tree_keys--;
    rebalance(st, &p, inner, cur);
    /* The separator naming the deleted key, if any, lies on its search path: it becomes the
     * smallest key of the subtree it leads to (merges may have moved it down a level). */
    cur = h->tree_root;
    for (int d = 0; d < (int)h->tree_height - 1; d++) {
        bt_node_t *nd = NODE(st, cur);
        uint32_t idx = inner_upper(st, nd, &key, &eq, &ok);
        if (eq && nd->u.in.k[idx - 1].off == gone) {
            uint32_t x = nd->u.in.c[idx];
            while (!NODE(st, x)->leaf) x = NODE(st, x)->u.in.c[0];
            nd->u.in.k[idx - 1] = NODE(st, x)->u.e[0];
        }
        cur = nd->u.in.c[idx];
    }
    w_end(st);
}

/* -- rebuild ------------------------------------------------------------------------- */

static store_t *sort_st; /* qsort's context: rebuilds run under the tree lock, GIL held */

static int cmp_entries(const void *a, const void *b) {
    const bt_entry_t *x = a, *y = b;
    int ok = 1;
    bkey_t kx = {item_key(sort_st, x->off, x->klen, &ok), x->klen, x->pfx, x->pfx2};
    return cmp_entry(sort_st, &kx, y, &ok);
}

/* REQUIRES: tree lock. The tree rebuilt from the hash chains, which nobody can change while
 * the tree lock is held (table.c): collect every chained LINKED item, sort, bulk load. */
void shmkv_tree_rebuild_locked(store_t *st) {
    header_t *h = st->hdr;
    size_t cap = 1024, n = 0;
    bt_entry_t *v = malloc(cap * sizeof *v);
    uint64_t limit = h->total_size / SHMKV_MIN_CHUNK + 1;
    if (!v) return; /* the old tree stays; the next verify() retries */
    for (uint32_t b = 0; b < h->nbuckets; b++) {
        uint64_t steps = 0;
        for (uint32_t off = st->buckets[b]; off && steps++ < limit; off = shmkv_item(st, off)->hnext) {
            item_t *it = shmkv_item(st, off);
            if (shmkv_chunk_class(st, off) < 0 || it->state != IT_LINKED || it->klen == 0 ||
                it->klen > h->max_key)
                break;
            if (n == cap) {
                bt_entry_t *w = realloc(v, 2 * cap * sizeof *v);
                if (!w) {
                    free(v);
                    return;
                }
                v = w;
                cap *= 2;
            }
            bt_entry_t e = {key_pfx(ITEM_KEY(it), it->klen, 0), key_pfx(ITEM_KEY(it), it->klen, 8), off, it->klen, 0};
            v[n++] = e;
        }
    }
    sort_st = st;
    qsort(v, n, sizeof *v, cmp_entries);
    w_begin(st);
    reset_nodes(st->base, h);
    h->tree_rebuilds++;
    /* leaves */
    uint32_t nleaves = n ? (uint32_t)((n + BULK_LEAF - 1) / BULK_LEAF) : 1;
    uint32_t *level = malloc((nleaves + 1) * sizeof(uint32_t));
    bt_entry_t *mins = malloc((nleaves + 1) * sizeof(bt_entry_t));
    if (!level || !mins || nleaves > h->tree_nfree) {
        /* cannot happen: inserts keep a reserve of an eighth of the nodes in use for this
         * (shmkv_tree_room_locked); leave an empty tree that scans report as broken, never
         * a partial one */
        free(level);
        free(mins);
        free(v);
        h->tree_height = 0;
        w_end(st);
        return;
    }
    uint32_t prev = 0;
    for (uint32_t i = 0; i < nleaves; i++) {
        uint32_t li = node_alloc(st);
        bt_node_t *L = NODE(st, li);
        L->leaf = 1;
        size_t from = (size_t)i * BULK_LEAF, to = from + BULK_LEAF < n ? from + BULK_LEAF : n;
        L->n = (uint16_t)(to - from);
        if (to > from) memcpy(L->u.e, v + from, (to - from) * sizeof(bt_entry_t));
        L->prev = prev;
        if (prev) NODE(st, prev)->next = li;
        prev = li;
        level[i] = li;
        if (L->n) mins[i] = L->u.e[0];
    }
    uint32_t count = nleaves, height = 1;
    while (count > 1) {
        uint32_t up = (count + BULK_INNER - 1) / BULK_INNER, j = 0;
        if (up > h->tree_nfree) { /* as above */
            h->tree_height = 0;
            free(level);
            free(mins);
            free(v);
            w_end(st);
            return;
        }
        /* the children spread evenly over the `up` nodes: filling each to BULK_INNER could
         * leave the last with one child -- an inner node with no key, which a delete's
         * rebalance below it cannot handle (it has no sibling to merge with: a SIGSEGV
         * seen after a rebuild). Evenly, every node gets at least count/up >= 2 children. */
        for (; j < up; j++) {
            uint32_t i = (uint32_t)((uint64_t)j * count / up);
            uint32_t ni = node_alloc(st);
            bt_node_t *N = NODE(st, ni);
            uint32_t m = (uint32_t)((uint64_t)(j + 1) * count / up) - i;
            N->leaf = 0;
            N->level = (uint8_t)height;
            N->n = (uint16_t)(m - 1);
            for (uint32_t c = 0; c < m; c++) {
                N->u.in.c[c] = level[i + c];
                if (c) N->u.in.k[c - 1] = mins[i + c];
            }
            bt_entry_t mn = mins[i];
            level[j] = ni;
            mins[j] = mn;
        }
        count = up;
        height++;
    }
    h->tree_root = level[0];
    h->tree_height = height;
    h->tree_keys = n;
    __atomic_store_n(&h->tree_dirty, 0u, __ATOMIC_RELEASE);
    w_end(st);
    free(level);
    free(mins);
    free(v);
}

/* -- scans --------------------------------------------------------------------------- */

/* Appends one pair as [klen u32][vlen u32][key][value]. The buffer belongs to the caller (a
 * scan iterator, ext/_core.pyx) and is reused batch after batch: it grows here and is never
 * shrunk, so a long scan allocates once. No Python object is made here (no GC can run). */
static inline int out_push(shmkv_scanbuf_t *o, const char *k, uint32_t kl, const char *v, uint32_t vl) {
    size_t need = 8 + (size_t)kl + vl;
    if (o->used + need > o->cap) {
        size_t cap = o->cap ? o->cap : 16384;
        while (o->used + need > cap) cap *= 2;
        char *b = PyMem_RawRealloc(o->buf, cap);
        if (!b) return -1;
        o->buf = b;
        o->cap = cap;
    }
    char *p = o->buf + o->used;
    o->last = o->used;
    memcpy(p, &kl, 4);
    memcpy(p + 4, &vl, 4);
    memcpy(p + 8, k, kl);
    memcpy(p + 8 + kl, v, vl);
    o->used += need;
    o->count++;
    return 0;
}

/* One pass: copies up to `max` live pairs (and about SHMKV_SCAN_BYTES at most) into `o`.
 * Returns 1 when every read was plausible, 0 when the tree was seen in change (retry), -1
 * out of memory. Without the tree lock the result counts only if the version did not move
 * meanwhile (the caller checks).
 *
 * The index holds item offsets, so the items of a range are scattered over the slab pages:
 * a cache (and TLB) miss each, which is where a scan's time goes. So the walk runs in two
 * phases per chunk of entries: (A) collect the chunk's entries from the leaves (sequential
 * 1 KiB nodes, the next one prefetched), then (B) copy the items, with the item SCAN_AHEAD2
 * entries ahead asked for (its header line) and the one SCAN_AHEAD1 ahead, whose header has
 * arrived by then, asked for whole (an item of a 16 B key and a 100 B value spans 3-4 lines):
 * the misses overlap instead of queueing, and none is left to the copy. */
#define SCAN_CHUNK 256u
#define SCAN_AHEAD 16u
typedef struct {
    uint32_t off;
    uint32_t klen;
} scan_ent_t;

/* Asks for the lines of the item at `off` whose key is `klen` bytes, guessing its value's
 * length (`vguess`: the last item's; values of a range are often alike) -- the header is not
 * read for it, so the whole item's misses start at once. */
static inline void prefetch_item(store_t *st, uint32_t off, uint32_t klen, uint32_t vguess) {
    uint64_t b = (uint64_t)off * SHMKV_UNIT;
    uint64_t len = SHMKV_ITEM_HDR + (uint64_t)klen + vguess;
    if (len > 1024) len = 1024; /* longer values: the copy streams them */
    if (b < st->hdr->off_pages || b + len > st->hdr->total_size) return;
    const char *p = st->base + b;
    for (uintptr_t l = (uintptr_t)p & ~(uintptr_t)63u; l < (uintptr_t)p + len; l += 64) __builtin_prefetch((const char *)l);
}

/* The leaves a scan chunk read and the versions they had (leaf-latch writers change a
 * leaf's entries without the tree-wide version: btree.h `ver`). Within a chunk of
 * SCAN_CHUNK entries a sound tree has no empty leaf but the root, so SCAN_CHUNK + 2 is
 * room for every leaf one visits; more means a torn read (a retry). */
typedef struct {
    uint32_t n;
    uint32_t node[SCAN_CHUNK + 2];
    uint32_t ver[SCAN_CHUNK + 2];
} seen_t;

/* Reads leaf i's version before its entries: 0 when a leaf-latch writer is in it now. */
static inline int seen_add(store_t *st, seen_t *sn, uint32_t i) {
    uint32_t v = __atomic_load_n(&NODE(st, i)->ver, __ATOMIC_ACQUIRE);
    if ((v & 1u) || sn->n >= SCAN_CHUNK + 2) return 0;
    sn->node[sn->n] = i;
    sn->ver[sn->n++] = v;
    return 1;
}

/* After the copy of their entries' items: 1 when no leaf read has changed meanwhile (then
 * no entry read was replaced, so no item copied was freed before the copy ended); leaves
 * the last one listed (the walk goes on in it). */
static inline int seen_same(store_t *st, seen_t *sn) {
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    for (uint32_t j = 0; j < sn->n; j++)
        if (__atomic_load_n(&NODE(st, sn->node[j])->ver, __ATOMIC_RELAXED) != sn->ver[j]) return 0;
    if (sn->n) {
        sn->node[0] = sn->node[sn->n - 1];
        sn->ver[0] = sn->ver[sn->n - 1];
        sn->n = 1;
    }
    return 1;
}

static int range_once(store_t *st, const bkey_t *lo, int lo_incl, const bkey_t *hi, int hi_incl,
                      int reverse, uint32_t max, uint64_t now, shmkv_scanbuf_t *o) {
    header_t *h = st->hdr;
    int ok = 1, eq = 0;
    o->used = 0;
    o->count = 0;
    o->done = 1;
    uint32_t height = __atomic_load_n(&h->tree_height, __ATOMIC_ACQUIRE);
    uint32_t cur = __atomic_load_n(&h->tree_root, __ATOMIC_ACQUIRE);
    if (height == 0 || height > BT_MAX_HEIGHT || !node_ok(h, cur)) return 0;
    const bkey_t *seek = reverse ? hi : lo;
    for (uint32_t d = 0; d + 1 < height; d++) {
        bt_node_t *nd = NODE(st, cur);
        uint32_t n = nd->n;
        if (nd->leaf || n > BT_INNER_CAP) return 0;
        uint32_t idx = seek ? inner_upper(st, nd, seek, &eq, &ok) : (reverse ? n : 0);
        if (!ok) return 0;
        cur = nd->u.in.c[idx];
        if (!node_ok(h, cur)) return 0;
    }
    seen_t seen;
    seen.n = 0;
    if (!seen_add(st, &seen, cur)) return 0;
    bt_node_t *leaf = NODE(st, cur);
    if (!leaf->leaf || leaf->n > BT_LEAF_CAP) return 0;
    int64_t pos;
    if (!reverse) pos = seek ? leaf_bound(st, leaf, seek, !lo_incl, &eq, &ok) : 0;
    else pos = (seek ? (int64_t)leaf_bound(st, leaf, seek, hi_incl, &eq, &ok) : (int64_t)leaf->n) - 1;
    if (!ok) return 0;
    uint64_t hops = 0;
    uint32_t n = leaf->n;
    const bkey_t *bound = reverse ? lo : hi;
    int bound_incl = reverse ? lo_incl : hi_incl, step = reverse ? -1 : 1, walked = 0;
    uint32_t vguess = 64; /* until the first item tells */
    scan_ent_t ents[SCAN_CHUNK];
    {
        uint32_t nx = reverse ? leaf->prev : leaf->next;
        if (node_ok(h, nx)) prefetch_node(NODE(st, nx));
    }
    while (!walked) {
        /* (A) the next entries, up to what the batch still wants */
        uint32_t want = max - o->count, m = 0;
        if (want > SCAN_CHUNK) want = SCAN_CHUNK;
        while (m < want) {
            if (pos >= (int64_t)n || pos < 0) {
                cur = pos < 0 ? leaf->prev : leaf->next;
                if (!cur) {
                    walked = 1;
                    break;
                }
                if (!node_ok(h, cur) || ++hops > node_limit(h) || !seen_add(st, &seen, cur)) return 0;
                leaf = NODE(st, cur);
                n = leaf->n;
                if (!leaf->leaf || n > BT_LEAF_CAP) return 0;
                pos = pos < 0 ? (int64_t)n - 1 : 0;
                uint32_t nx = reverse ? leaf->prev : leaf->next; /* one leaf ahead */
                if (node_ok(h, nx)) prefetch_node(NODE(st, nx));
                continue;
            }
            bt_entry_t *e = &leaf->u.e[pos];
            pos += step;
            if (bound) {
                int c = cmp_entry(st, bound, e, &ok);
                if (!ok) return 0;
                if (reverse ? (c > 0 || (c == 0 && !bound_incl)) : (c < 0 || (c == 0 && !bound_incl))) {
                    walked = 1;
                    break;
                }
            }
            ents[m].off = e->off;
            ents[m].klen = e->klen;
            if (m < SCAN_AHEAD) prefetch_item(st, e->off, e->klen, vguess);
            m++;
        }
        /* (B) the items, their misses in flight ahead of the copy */
        for (uint32_t i = 0; i < m; i++) {
            if (i + SCAN_AHEAD < m) prefetch_item(st, ents[i + SCAN_AHEAD].off, ents[i + SCAN_AHEAD].klen, vguess);
            uint64_t byte = (uint64_t)ents[i].off * SHMKV_UNIT;
            if (byte < h->off_pages || byte + SHMKV_ITEM_HDR > h->total_size) return 0;
            item_t *it = shmkv_item(st, ents[i].off);
            uint32_t kl = it->klen, vl = it->vlen;
            uint64_t exp = it->expire_ms;
            if (kl != ents[i].klen || vl > h->max_item || byte + SHMKV_ITEM_HDR + kl + vl > h->total_size ||
                __atomic_load_n(&it->state, __ATOMIC_ACQUIRE) != IT_LINKED)
                return 0;
            vguess = vl;
            if (exp && exp <= now) continue; /* expired: a miss, removed by the next get or eviction */
            if (out_push(o, ITEM_KEY(it), kl, ITEM_KEY(it) + kl, vl) < 0) return -1;
            if (o->used >= SHMKV_SCAN_BYTES && (i + 1 < m || !walked)) {
                o->done = 0; /* the byte budget: more may follow */
                return seen_same(st, &seen);
            }
        }
        if (!seen_same(st, &seen)) return 0;
        if (o->count >= max) {
            /* more may follow (even if the next key would be past the bound: the next batch
             * finds that out), unless the walk already met the end */
            o->done = walked;
            return 1;
        }
    }
    return 1;
}

int shmkv_tree_fill(store_t *st, const char *lo, size_t lolen, int lo_incl, const char *hi, size_t hilen,
                    int hi_incl, int reverse, uint32_t max, shmkv_scanbuf_t *o) {
    header_t *h = st->hdr;
    bkey_t klo, khi;
    if (lo) klo = mkkey(lo, lolen);
    if (hi) khi = mkkey(hi, hilen);
    const bkey_t *plo = lo ? &klo : NULL, *phi = hi ? &khi : NULL;
    uint64_t now = shmkv_now_ms();
    int got = 0, rc = 0;
    o->used = 0;
    o->count = 0;
    o->done = 1;
    if (max == 0) return 0;
    /* A batch that a writer disturbed is retried smaller (down to MIN_BATCH): the copy then
     * fits between two writes, so a write-heavy store still serves scans without the lock;
     * the caller resumes after the last key, whatever the batch size was. */
    for (int attempt = 0; attempt < OPTIMISTIC_TRIES && !got; attempt++) {
        uint64_t v1 = __atomic_load_n(&h->tree_version, __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&h->tree_dirty, __ATOMIC_ACQUIRE)) { /* a dead latch holder's leaf */
            attempt = OPTIMISTIC_TRIES;                              /* the locked batch rebuilds */
            break;
        }
        if (v1 & 1u) { /* a writer is in the tree: it holds the lock for a few hundred ns,
                        * unless it was preempted (then let it run: yield) */
            if (attempt < 8) for (int i = 0; i < 64; i++) relax();
            else sched_yield();
            continue;
        }
        rc = range_once(st, plo, lo_incl, phi, hi_incl, reverse, max, now, o);
        if (rc < 0) return SHMKV_ENOMEM;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        got = rc == 1 && __atomic_load_n(&h->tree_version, __ATOMIC_RELAXED) == v1;
        if (!got) {
            STAT(st, ST_SCAN_RETRIES);
            if (max > MIN_BATCH) max = max / 2 > MIN_BATCH ? max / 2 : MIN_BATCH;
        }
    }
    if (!got) { /* a writer storm or a rebuild: one batch under the lock */
        STAT(st, ST_SCAN_LOCKED);
        if (shmkv_tree_lock(st) < 0) return SHMKV_ELOCK;
        rc = range_once(st, plo, lo_incl, phi, hi_incl, reverse, max, now, o);
        if (rc == 0) { /* under the lock: a broken tree, rebuilt from the chains */
            shmkv_tree_rebuild_locked(st);
            STAT(st, ST_REPAIRS);
            rc = range_once(st, plo, lo_incl, phi, hi_incl, reverse, max, now, o);
        }
        shmkv_tree_unlock(st);
        if (rc < 0) return SHMKV_ENOMEM;
        if (rc == 0) return SHMKV_ECORRUPT;
    }
    return 0;
}

/* -- verify -------------------------------------------------------------------------- */

static void report(PyObject *problems, const char *msg) {
    PyObject *s = PyUnicode_FromString(msg);
    if (s) {
        PyList_Append(problems, s);
        Py_DECREF(s);
    }
}

/* Checks the subtree at `ni` (depth d); sets *mn to its smallest entry. 0 when sound. */
static int check_node(store_t *st, uint32_t ni, uint32_t d, bt_entry_t *mn, uint64_t *nodes) {
    header_t *h = st->hdr;
    if (!node_real(st, ni) || ++*nodes > nodes_total(h)) return -1;
    bt_node_t *nd = NODE(st, ni);
    int is_leaf = d + 1 == h->tree_height;
    if (nd->leaf != is_leaf) return -1;
    if (is_leaf) {
        if (nd->n > BT_LEAF_CAP || (nd->n == 0 && d > 0)) return -1;
        if (nd->n) *mn = nd->u.e[0];
        return 0;
    }
    if (nd->n > BT_INNER_CAP || (nd->n == 0 && d == 0)) return -1;
    for (uint32_t c = 0; c <= nd->n; c++) {
        bt_entry_t cm;
        if (check_node(st, nd->u.in.c[c], d + 1, &cm, nodes) < 0) return -1;
        if (c == 0) *mn = cm;
        else if (nd->u.in.k[c - 1].off != cm.off) return -1; /* separator = min of its child */
    }
    return 0;
}

static int in_chain(store_t *st, uint32_t off, const char *k, size_t klen) {
    uint64_t hv = shmkv_hash(k, klen, st->hdr->seed);
    uint64_t steps = 0, limit = st->hdr->total_size / SHMKV_MIN_CHUNK + 1;
    for (uint32_t x = st->buckets[(uint32_t)hv & st->bucket_mask]; x && steps++ < limit;
         x = shmkv_item(st, x)->hnext)
        if (x == off) return 1;
    return 0;
}

/* REQUIRES: tree lock. 0 when the tree is sound and equals the chains, else -1 (with a
 * message in msg). */
static int check_tree_locked(store_t *st, char *msg, size_t msglen) {
    header_t *h = st->hdr;
    uint64_t nodes = 0;
    bt_entry_t mn;
    if (h->tree_height == 0 || h->tree_height > BT_MAX_HEIGHT) {
        snprintf(msg, msglen, "btree: height %u", h->tree_height);
        return -1;
    }
    if (__atomic_load_n(&h->tree_version, __ATOMIC_RELAXED) & 1u) {
        snprintf(msg, msglen, "btree: left mid-change by a dead writer");
        return -1;
    }
    if (check_node(st, h->tree_root, 0, &mn, &nodes) < 0) {
        snprintf(msg, msglen, "btree: a node is malformed (depth, count or separator)");
        return -1;
    }
    uint32_t pages = 0;
    for (uint32_t p = 0; p < h->npages; p++) pages += st->pagemeta[p].cls == SHMKV_PAGE_NODES;
    if (pages != h->tree_pages) {
        snprintf(msg, msglen, "btree: %u node pages, counted %u", pages, h->tree_pages);
        return -1;
    }
    uint64_t nfree = 0;
    for (uint32_t i = h->tree_free; i && nfree <= nodes_total(h); i = NODE(st, i)->next) {
        if (!node_real(st, i)) {
            snprintf(msg, msglen, "btree: the free list names no node (%u)", i);
            return -1;
        }
        nfree++;
    }
    if (nfree != h->tree_nfree || nodes + nfree != nodes_total(h)) {
        snprintf(msg, msglen, "btree: %llu nodes in the tree + %llu free != %llu", (unsigned long long)nodes,
                 (unsigned long long)nfree, (unsigned long long)nodes_total(h));
        return -1;
    }
    /* the leaf chain, left to right: sorted, each entry a chained item */
    uint32_t x = h->tree_root, prev = 0;
    while (!NODE(st, x)->leaf) x = NODE(st, x)->u.in.c[0];
    uint64_t keys = 0;
    bt_entry_t last = {0};
    for (uint64_t hops = 0; x; x = NODE(st, x)->next) {
        bt_node_t *L = NODE(st, x);
        if (++hops > nodes || !node_real(st, x) || L->prev != prev || !L->leaf || (L->ver & 1u)) {
            snprintf(msg, msglen, "btree: the leaf chain is broken");
            return -1;
        }
        for (uint32_t i = 0; i < L->n; i++) {
            bt_entry_t *e = &L->u.e[i];
            int ok = 1;
            item_t *it = shmkv_item(st, e->off);
            const char *k = item_key(st, e->off, e->klen, &ok);
            if (!ok || shmkv_chunk_class(st, e->off) < 0 || it->state != IT_LINKED || it->klen != e->klen ||
                key_pfx(k, e->klen, 0) != e->pfx || key_pfx(k, e->klen, 8) != e->pfx2 ||
                !in_chain(st, e->off, k, e->klen)) {
                snprintf(msg, msglen, "btree: an entry names no chained item (offset %u)", e->off);
                return -1;
            }
            bkey_t bk = {k, e->klen, e->pfx, e->pfx2};
            if (keys && cmp_entry(st, &bk, &last, &ok) <= 0) {
                snprintf(msg, msglen, "btree: keys out of order at offset %u", e->off);
                return -1;
            }
            last = *e;
            keys++;
        }
        prev = x;
    }
    uint64_t chained = 0, limit = h->total_size / SHMKV_MIN_CHUNK + 1;
    for (uint32_t b = 0; b < h->nbuckets; b++) {
        uint64_t steps = 0;
        for (uint32_t off = st->buckets[b]; off && steps++ < limit; off = shmkv_item(st, off)->hnext) chained++;
    }
    if (keys != chained || keys != h->tree_keys) {
        snprintf(msg, msglen, "btree: %llu entries (counted %llu) for %llu chained items",
                 (unsigned long long)keys, (unsigned long long)h->tree_keys, (unsigned long long)chained);
        return -1;
    }
    return 0;
}

/* Under the tree lock alone (the chains are frozen while it is held): checks the tree against
 * its invariants and the chains; rebuilds it from the chains on any problem. */
int shmkv_tree_verify(store_t *st, PyObject *problems) {
    char msg[200];
    if (!shmkv_is_btree(st)) return 0;
    int rc = shmkv_tree_lock(st);
    if (rc < 0) return rc;
    if (check_tree_locked(st, msg, sizeof msg) < 0) {
        report(problems, msg);
        shmkv_tree_rebuild_locked(st);
        if (check_tree_locked(st, msg, sizeof msg) < 0) report(problems, msg);
    }
    shmkv_tree_unlock(st);
    return 0;
}
