/* layout.h -- the shared-memory segment format: the one place it is defined.
 *
 * One POSIX shared-memory object per store (/shmkv.<name>), mapped by every attached
 * process at a different address, so everything inside refers to everything else by
 * OFFSET, never by pointer. Item and list links are u32 counts of 8-byte UNITS from the
 * segment start (0 = none), which caps a segment at 32 GiB and keeps the item header at
 * 36 bytes (memory per item matters: see README "Memory").
 *
 *   +--------------------+ 0
 *   | header  (4 KiB)    |  magic, layout version, geometry, page lock, registry lock,
 *   |                    |  the disk tier: durability and directory (fixed at creation)
 *   +--------------------+ off_slots
 *   | process slots      |  SHMKV_MAX_SLOTS x slot_t: pid, in-flight chunk, per-process stats
 *   +--------------------+ off_classes
 *   | slab class table   |  nclasses x class_t: chunk size, class lock, LRU, free list, counts
 *   +--------------------+ off_stripes
 *   | lock stripes       |  nstripes x stripe_t (robust mutex, one cache line each)
 *   +--------------------+ off_pagemeta
 *   | page table         |  npages x pagemeta_t: owning class, used chunks
 *   +--------------------+ off_buckets
 *   | bucket array       |  nbuckets x u32 unit offset of the first item of a hash chain
 *   +--------------------+ off_nodes (engine "btree" only; 0 bytes for "hash"; 1 KiB aligned)
 *   | B+tree nodes       |  nnodes x 1 KiB bt_node_t (btree.h): the ordered index; when they
 *   |                    |  run out, slab pages become nodes too (SHMKV_PAGE_NODES)
 *   +--------------------+ off_pages (page aligned)
 *   | pages              |  npages x page_size bytes, each cut into one class's chunks
 *   +--------------------+ total_size
 *
 * Item chunk (8-byte aligned, size = its class's chunk size):
 *
 *   0       4       8       12      16              24      28  30 31 32 33 34  36
 *   +-------+-------+-------+-------+---------------+-------+---+--+--+--+--+---+-------
 *   | hnext | prev  | next  | vlen  | expire_ms     |hash32 |kln|st|cl|ac|ls|own| key, value
 *   +-------+-------+-------+-------+---------------+-------+---+--+--+--+--+---+-------
 *
 * Which lock guards which field (memcached's "item_lock() must be held..." rule):
 *   hnext, and the publication of an item into / out of a chain  -> its bucket's stripe lock
 *   key, value, vlen, expire, hash32, klen: written only while the chunk is IN FLIGHT (owned
 *     by one writer, reachable by nobody), read under the stripe lock
 *   prev, next, listed                                            -> its class lock
 *   state: FREE<->IN FLIGHT under the class lock; IN FLIGHT->LINKED->UNLINKED under the stripe
 *   active: set by readers under the stripe lock, cleared by the evictor under the class lock;
 *     a lost update only costs one second chance, so it is a racy byte on purpose
 *   pagemeta.cls                                                  -> page lock (+ class locks;
 *     becoming SHMKV_PAGE_NODES: page lock + tree lock, so the tree lock alone fixes that set)
 *
 * Lock order (never block against it; anything else is taken with trylock):
 *   stripe -> registry -> class -> page -> tree -> leaf latches (in index order)
 * The tree lock and the leaf latches (engine "btree", btree.c) are innermost: "the tree
 * lock" below means the tree lock and then every leaf latch, 0 up (btree.c: shmkv_tree_lock);
 * a put that changes one leaf only takes that leaf's latch alone (stripe -> latch), and a
 * latch holder takes no other lock (nor a second latch). The tree lock's holder takes no other lock, so
 * any holder of any lock may block on it (a put holds its stripe; eviction holds a class
 * lock and the victim's stripe; a page move the page lock too; a page becoming nodes the
 * page lock, shmkv_tree_grow, taken after the put let go of the tree lock). Every publication of an
 * item into a chain, and every unlink from one, happens under it or under the latch of the
 * key's leaf in a btree store, so the ordered index equals the set of chained items whenever
 * neither is held and can be rebuilt from the chains under the tree lock alone, which holds
 * every latch (btree.c says why this and not a lock-free index).
 */
#ifndef SHMKV_LAYOUT_H
#define SHMKV_LAYOUT_H

#include <pthread.h>
#include <stdint.h>

/* DO NOT CHANGE: stored layout. Bump SHMKV_LAYOUT_VERSION for any change below. */
#define SHMKV_MAGIC 0x31764B4D48537F00ULL /* "\0\x7fSHMKv1" */
#define SHMKV_LAYOUT_VERSION 7u /* 2: the disk tier in the header; 3: 24 stat counters (lock waits); 4: engine + B+tree;
                                  * 5: B+tree node pages taken from the slab (SHMKV_PAGE_NODES, tree_pages);
                                  * 6: B+tree leaf latches (tree_latch), leaf versions, tree_dirty;
                                  * 7: slot.kept (a process's kept chunk, IN FLIGHT, instead of UNLINKED);
                                  *    shlock_t.seq (stripes: lock-free gets) */
#define SHMKV_UNIT 8u
#define SHMKV_HEADER_SIZE 4096u
#define SHMKV_MAX_SLOTS 256u
#define SHMKV_MAX_CLASSES 200u
#define SHMKV_MIN_CHUNK 48u
#define SHMKV_PAGE_UNASSIGNED 0xFFFFu
#define SHMKV_PAGE_MOVING 0xFFFEu
#define SHMKV_PAGE_NODES 0xFFFDu /* engine "btree": a page of index nodes (btree.c); never given back */
#define SHMKV_MAX_SEGMENT (32ULL << 30)
#define SHMKV_TIER_PATH_MAX 2048u /* bytes of the disk tier's absolute directory path */
#define SHMKV_TREE_LATCHES 16u   /* engine "btree": leaf latches (btree.c), a power of two */

/* item.state -- DO NOT CHANGE: stored values. 0 is a chunk never written (a fresh page). */
enum {
    IT_NONE = 0,
    IT_FREE = 1,     /* on its class's free list */
    IT_INFLIGHT = 2, /* taken by writer `owner`, being filled, reachable by nobody */
    IT_LINKED = 3,   /* published in a hash chain (or about to be: see table.c put) */
    IT_UNLINKED = 4, /* replaced or deleted, out of its chain, waiting to be freed */
};

/* header.tier -- DO NOT CHANGE: stored values. The durability of a persistent store's
 * writes (shmkv/store.py); 0 = memory only, no disk tier. */
enum { TIER_NONE = 0, TIER_DUR_NONE = 1, TIER_DUR_INTERVAL = 2, TIER_DUR_FSYNC = 3 };

/* item.listed: which class list the chunk is on. DO NOT CHANGE: stored values. */
enum { LS_NONE = 0, LS_LRU = 1, LS_FREE = 2 };

typedef struct {
    uint32_t hnext;
    uint32_t prev;
    uint32_t next;
    uint32_t vlen;
    uint64_t expire_ms; /* CLOCK_REALTIME ms; 0 = never */
    uint32_t hash32;    /* high half of the 64-bit key hash: cheap compare before memcmp */
    uint16_t klen;
    uint8_t state;
    uint8_t cls;
    uint8_t active; /* read since it last passed the LRU tail: earns a second chance */
    uint8_t listed;
    uint16_t owner; /* slot + 1 of the writer while IN FLIGHT */
} item_t;

#define SHMKV_ITEM_HDR 36u /* offsetof(item_t, owner) + 2: key starts right after */
#define ITEM_KEY(it) ((char *)(it) + SHMKV_ITEM_HDR)
#define ITEM_VAL(it) (ITEM_KEY(it) + (it)->klen)

/* A robust, process-shared mutex alone on its cache line (no false sharing). `seq` is used
 * by the stripes only: odd while a holder may be changing the stripe's chains, bumped on
 * every take and release, so a get can read without the lock and check afterwards that no
 * holder came in between (table.c: a seqlock; 0 in every other lock). */
typedef struct {
    pthread_mutex_t m;
    uint32_t seq;
    char pad[64 - (sizeof(pthread_mutex_t) + 4) % 64];
} shlock_t;
_Static_assert(sizeof(shlock_t) == 64, "a lock fills one cache line");

/* Kinds of lock, for the wait statistics. DO NOT CHANGE: they index stored counters. */
enum { LK_STRIPE = 0, LK_CLASS = 1, LK_PAGE = 2, LK_REGISTRY = 3, LK__COUNT = 4 };
#define LK_TREE LK_PAGE /* the tree lock's waits are counted with the page lock's (stored counters) */

/* header.engine -- DO NOT CHANGE: stored values. */
enum { ENGINE_HASH = 0, ENGINE_BTREE = 1 };

/* Per-process statistics, written only by the owning process (under its GIL), so plain
 * increments; a reused slot folds its counts into the header's retired totals first (sums,
 * except the ST_WAIT_MAX_US maxima). ST_WAITS + kind counts acquisitions of that kind of
 * lock that had to wait (the spin failed); ST_WAIT_MAX_US + kind is the longest such wait
 * in microseconds. DO NOT CHANGE the order: stored counters. */
enum {
    ST_GETS, ST_HITS, ST_MISSES, ST_PUTS, ST_DELETES, ST_EVICTIONS, ST_EXPIRED,
    ST_RECLAIMED, ST_AUTOMOVES, ST_REPAIRS, ST_LOCK_WAITS, ST_FULL,
    ST_WAITS = 12,         /* .. 15: per LK_ kind */
    ST_WAIT_MAX_US = 16,   /* .. 19: per LK_ kind */
    ST_SCAN_RETRIES = 20,  /* btree: optimistic scan batches that saw the tree change */
    ST_SCAN_LOCKED = 21,   /* btree: scan batches read under the tree lock after the retries */
    ST_TREE_LATCHED = 22,  /* btree: index writes (puts, deletes) done under a leaf latch alone */
    ST_TREE_LOCKED = 23,   /* btree: index writes done under the tree lock (shape changes, fallbacks) */
    ST__COUNT = 24
};

typedef struct {
    uint32_t pid;      /* 0 = free; liveness is the fcntl lock on byte `index` of the lock file */
    uint32_t gen;
    uint32_t inflight; /* unit offset of the chunk this process has IN FLIGHT, 0 = none */
    /* unit offset of the chunk this process keeps for its next put of that class (the last
     * version it replaced, out of every chain), 0 = none. IN FLIGHT and owned by this slot:
     * its next put takes it with no class lock (table.c), by swapping this field to 0; an
     * eviction or page move that meets the chunk takes it back by the same swap (slab.c
     * shmkv_steal_kept_locked), so an idle process pins nothing. Freed with the class lock
     * when a put of another class replaces it, at close, or by whoever reclaims a dead slot. */
    uint32_t kept;
    uint64_t stats[ST__COUNT];
    char pad2[64 - (16 + 8 * ST__COUNT) % 64];
} slot_t;

typedef struct {
    shlock_t lock;
    uint32_t size;     /* chunk size in bytes (multiple of 8) */
    uint32_t per_page; /* chunks per page */
    uint32_t lru_head; /* most recently used */
    uint32_t lru_tail;
    uint32_t free_head;
    uint32_t pad;
    uint64_t free_count;
    uint64_t used; /* chunks not free: IN FLIGHT + LINKED + UNLINKED */
    uint64_t pages;
    uint64_t evictions;
    uint64_t allocs;
    uint64_t recent_allocs; /* decays at each automove check: the class's recent demand */
    uint64_t reclaimed;     /* orphans of dead writers returned to the free list */
    char pad2[64 - (24 + 7 * 8) % 64];
} class_t;

typedef struct {
    uint16_t cls;
    uint16_t pad;
    uint32_t used;
} pagemeta_t;

typedef struct {
    uint64_t magic;
    uint32_t layout_version;
    uint32_t header_size;
    uint64_t total_size;
    uint64_t page_size;
    uint32_t npages;
    uint32_t nclasses;
    uint32_t nbuckets; /* power of two */
    uint32_t nstripes; /* power of two, <= nbuckets */
    uint32_t max_key;
    uint32_t max_item; /* largest chunk: header + key + value */
    uint64_t seed;
    uint32_t growth_x1000;
    uint32_t codec;       /* 0 = raw bytes; 1 = pickle */
    uint32_t codec_arg;   /* pickle protocol, pinned at creation */
    uint32_t pad0;
    uint64_t created_ms;
    uint64_t off_slots, off_classes, off_stripes, off_pagemeta, off_buckets, off_pages;
    uint64_t next_page_hint;
    uint64_t retired[ST__COUNT]; /* stats of processes whose slots were reused */
    uint64_t init_done;          /* == magic once creation finished: written last */
    char pad1[64];
    /* Live items, on a cache line of its own: changed by inserts and removals (not by
     * replacements or reads), with an atomic add. */
    int64_t nitems;
    char pad2[56];
    shlock_t page_lock; /* page assignment (pagemeta.cls) */
    shlock_t reg_lock;  /* process slot table */
    /* The disk tier, fixed at creation like the codec and written before init_done, so a
     * finished segment always says whether it is persistent: an attach without path= then
     * opens this directory itself instead of silently editing memory only, and an attach
     * with another directory is refused (shmkv/segment.py). */
    uint32_t tier;             /* TIER_*: 0 = memory only, else the durability of writes */
    uint32_t tier_interval_ms; /* fsync period of TIER_DUR_INTERVAL */
    uint32_t tier_path_len;    /* bytes of tier_path: absolute, resolved once at creation */
    uint32_t pad3;
    char tier_path[SHMKV_TIER_PATH_MAX]; /* not NUL-terminated: tier_path_len says */
    /* The engine (ENGINE_*), fixed at creation. For ENGINE_BTREE the ordered index (btree.c):
     * a node region of nnodes nodes at off_nodes (node 0 unused: 0 = none), guarded by
     * tree_lock (with every tree_latch) or, for one leaf's entries, that leaf's latch;
     * tree_version is the seqlock of its shape (odd while the tree lock's holder changes it). */
    uint32_t engine;
    uint32_t nnodes;
    uint64_t off_nodes;
    uint32_t tree_root;   /* node index of the root (a leaf when tree_height == 1) */
    uint32_t tree_height; /* levels, >= 1 */
    uint32_t tree_free;   /* head of the free-node list (linked through bt_node_t.next) */
    uint32_t tree_nfree;  /* nodes on it */
    uint64_t tree_keys;   /* entries in the leaves */
    uint64_t tree_rebuilds;
    uint32_t tree_pages; /* slab pages turned into nodes (pagemeta.cls SHMKV_PAGE_NODES) */
    uint32_t pad4a;
    char pad4[8];
    uint64_t tree_version; /* seqlock of the tree's SHAPE: odd while the tree lock's holder changes it */
    uint32_t tree_dirty;   /* 1: a writer died holding a leaf latch; the next tree locker rebuilds */
    char pad5[52];
    shlock_t tree_lock;
    /* Leaf latches: a put that changes one leaf only (btree.c) holds the latch of that leaf
     * (leaf index hashed to one of these), not the tree lock; the tree lock's holder holds
     * all of them too. */
    shlock_t tree_latch[SHMKV_TREE_LATCHES];
} header_t;

_Static_assert(sizeof(header_t) <= SHMKV_HEADER_SIZE, "the header must fit its 4 KiB");

#endif
