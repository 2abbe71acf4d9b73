/* btree.h -- the stored layout of a B+tree node (engine "btree"; btree.c has the design).
 *
 * Nodes live in the node region of the segment (layout.h: off_nodes), addressed by INDEX
 * (node i is at off_nodes + i * BT_NODE_SIZE; 0 = none), never by pointer.
 *
 *   0    2    3    4        8        12       16
 *   +----+----+----+--------+--------+--------+------------------------------------------
 *   | n  |leaf|lvl | next   | prev   | ver    | leaf:  n x entry (42 at most)
 *   +----+----+----+--------+--------+--------+ inner: n x entry (keys), n+1 x u32 children
 *
 *   entry (24 bytes): | pfx: key bytes 0-7 | pfx2: key bytes 8-15 | off | klen | pad |
 *                       (each big-endian, zero padded)
 *
 * An entry names an item by its chunk's unit offset (`off`, as hash chains do) and carries
 * the key's first 16 bytes as two integers, so comparisons of keys of up to 16 bytes, and of
 * longer keys that differ in their first 16, never touch the item (a cache miss each: an
 * 8-byte prefix made "key:000000012345"-style keys compare in the items at every step and
 * puts 5x slower); ties compare the rest of the key in the item. Leaves are doubly linked (next/prev) for scans in both
 * directions. Inner key i separates children i and i+1: it is the smallest key of child
 * i+1's subtree, always the entry of a live item (btree.c keeps that on every delete).
 * Free nodes are listed through `next`. `ver` is a leaf's own seqlock (btree.c): odd while
 * the holder of its leaf latch changes it; only those changes move it (the tree lock's
 * holder moves the tree-wide version instead).
 */
#ifndef SHMKV_BTREE_H
#define SHMKV_BTREE_H

#include <stdint.h>

/* DO NOT CHANGE: stored layout (SHMKV_LAYOUT_VERSION). */
#define BT_NODE_SIZE 1024u
#define BT_LEAF_CAP 42u  /* (1024 - 16) / 24 */
#define BT_INNER_CAP 35u /* 16 + 35 * 24 + 36 * 4 <= 1024 */
#define BT_MAX_HEIGHT 16u

typedef struct {
    uint64_t pfx;
    uint64_t pfx2;
    uint32_t off;
    uint16_t klen;
    uint16_t pad;
} bt_entry_t;

typedef struct {
    uint16_t n;
    uint8_t leaf;
    uint8_t level;
    uint32_t next;
    uint32_t prev;
    uint32_t ver; /* leaf: seqlock of its leaf-latch writers (odd while one writes) */
    union {
        bt_entry_t e[BT_LEAF_CAP];
        struct {
            bt_entry_t k[BT_INNER_CAP];
            uint32_t c[BT_INNER_CAP + 1];
        } in;
    } u;
} bt_node_t;

_Static_assert(sizeof(bt_node_t) <= BT_NODE_SIZE, "a node must fit its 1 KiB");

#endif
