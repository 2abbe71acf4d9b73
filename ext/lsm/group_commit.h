/* Group commit of the shared WAL, across processes, without a lock.
 *
 * Every process of a store appends to one WAL (under the WAL lock of the SHARED page, for a
 * write(2) only) and then, in durability "fsync", must not return before its record is on
 * disk. One fdatasync of the file covers every record written before it started, whoever
 * wrote it. So a writer first looks whether a finished sync already covers its record (done),
 * or a sync in flight will (it sleeps until that one publishes); only otherwise it syncs,
 * claiming a target that covers everything appended so far, so writers behind it can wait for
 * it in turn. LevelDB does this with a queue of writers under its mutex: the leader syncs for
 * all, the others sleep until it is done. Across processes a queue lock held across the fsync
 * would let one paused or slow process (SIGSTOP, page fault, swapped out) stop every other
 * writer for as long as it is paused -- the failure this file exists to remove. So nothing
 * here is a lock: three words in the shared page, updated with atomics, and a futex to sleep
 * on, with a deadline after which a waiter stops trusting the leader and syncs by itself.
 *
 * The words (each a packed (generation, offset) "position", see gc_pack):
 *   appended  end of the last whole record appended to the WAL. Stored under the WAL lock right
 *             after a successful write(2), so it never counts a torn or failed record (which
 *             the next locker cuts back to, at or after this end).
 *   syncing   the target of the sync a leader has claimed (it will fdatasync, then publish).
 *   synced    a position known durable: a leader stores its target here (max wins) after its
 *             fdatasync returned 0.
 *   seq       32-bit futex word, bumped after every publish of `synced`; waiters sleep on it.
 *   sync_ns   recent fdatasync duration (a moving average): sets the waiters' deadline.
 *
 * Invariants:
 *   I1  synced = (g, e) only after an fdatasync of wal-<g> that *started* after every record
 *       ending at or before e was wholly written (e was loaded from `appended`, or is the
 *       syncer's own record's end, before the fdatasync). So a record of wal-<g> ending at or
 *       before e is durable.
 *   I2  Records are appended only at the end of whole records and a torn tail is only ever cut
 *       back to `appended` or beyond, so the bytes a durable position covers never change.
 *   I3  No lock is held across fdatasync or the futex wait. A writer waits for another
 *       process's sync at most `deadline` (2 x sync_ns + 2 ms, at most 100 ms); then it syncs
 *       itself. A paused, slow or dead leader delays the others by that much, never more.
 * Positions of different generations are never compared by offset: a sync of wal-<g+1> says
 * nothing of wal-<g> (a writer of g then syncs its own fd; the flush of g also makes g's
 * records durable in a table before the manifest drops g).
 * The generation is kept modulo 2^20 in a position: the only positions compared are of
 * generations a few apart (the live ones), so the modular "newer" test is exact for them.
 * The page is never fsynced and starts zeroed (generation 0 never exists): after a reboot
 * nothing is believed durable that the files do not show.
 */
#ifndef SHMKV_GROUP_COMMIT_H
#define SHMKV_GROUP_COMMIT_H

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define GC_OFF_BITS 44
#define GC_GEN_MASK ((1ULL << (64 - GC_OFF_BITS)) - 1)
#define GC_OFF_MASK ((1ULL << GC_OFF_BITS) - 1)
#define GC_WAIT_MIN_NS 2000000ULL   /* deadline slack over 2 x sync_ns */
#define GC_WAIT_MAX_NS 100000000ULL /* never trust a leader for longer than this */

/* The group-commit words, at PAGE_GROUP of the shared page (format.py). */
typedef struct {
    uint64_t appended;
    uint64_t syncing;
    uint64_t synced;
    uint32_t seq;
    uint32_t pad;
    uint64_t sync_ns;
} gc_words_t;

static inline uint64_t gc_pack(uint64_t gen, uint64_t off) {
    return ((gen & GC_GEN_MASK) << GC_OFF_BITS) | (off & GC_OFF_MASK);
}
static inline uint64_t gc_gen(uint64_t pos) { return pos >> GC_OFF_BITS; }
static inline uint64_t gc_off(uint64_t pos) { return pos & GC_OFF_MASK; }

/* Is generation a (mod 2^20) later than b? */
static inline int gc_gen_newer(uint64_t a, uint64_t b) {
    uint64_t d = (a - b) & GC_GEN_MASK;
    return d != 0 && d < (GC_GEN_MASK >> 1);
}

/* Does position p cover (gen, end) -- same generation, offset at or past end? */
static inline int gc_covers(uint64_t p, uint64_t gen, uint64_t end) {
    return gc_gen(p) == (gen & GC_GEN_MASK) && gc_off(p) >= end;
}

static inline uint64_t gc_load(const uint64_t *w) { return __atomic_load_n(w, __ATOMIC_ACQUIRE); }

/* REQUIRES: the WAL lock, and (gen, end) is the end of a whole record just written. */
static inline void gc_publish_appended(gc_words_t *w, uint64_t gen, uint64_t end) {
    __atomic_store_n(&w->appended, gc_pack(gen, end), __ATOMIC_RELEASE);
}

/* After a WAL was cut back below records it had published (recovery rewriting a damaged
 * log, version.py recover_wal_locked): I2 no longer holds for the old positions, so believe nothing
 * durable until the next sync says so. */
static inline void gc_forget(gc_words_t *w) {
    __atomic_store_n(&w->appended, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&w->syncing, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&w->synced, 0, __ATOMIC_RELEASE);
}

/* Raise *w to p unless it already holds a later position (a later generation, or the same
 * generation at or past p's offset). */
static void gc_raise(uint64_t *w, uint64_t p) {
    uint64_t cur = gc_load(w);
    for (;;) {
        if (gc_gen(cur) == gc_gen(p) ? gc_off(cur) >= gc_off(p) : gc_gen_newer(gc_gen(cur), gc_gen(p)))
            return;
        if (__atomic_compare_exchange_n(w, &cur, p, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return;
    }
}

static inline uint64_t gc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Test hook (tests/test_group_commit.py): the n-th leader stops itself (SIGSTOP) after
 * claiming its sync and before its fdatasync -- the worst moment for the others. 0 = off. */
static int gc_stop_countdown = 0;

/* Make the record of wal-<gen> ending at `end` durable. Runs without the GIL and holds no lock.
 * *synced_here: 1 if this call ran fdatasync, 0 if another sync covered the record.
 * Returns 0, or the errno of a failed fdatasync (nothing is published then). */
static int gc_sync_to(gc_words_t *w, int fd, uint64_t gen, uint64_t end, int *synced_here) {
    uint64_t deadline = 0;
    *synced_here = 0;
    for (;;) {
        uint32_t seq = __atomic_load_n(&w->seq, __ATOMIC_ACQUIRE);
        uint64_t synced = gc_load(&w->synced);
        if (gc_covers(synced, gen, end)) return 0;
        uint64_t syncing = gc_load(&w->syncing);
        /* A sync in flight that covers our record (claimed, not yet published): wait for it.
         * One that does not cover us is not waited for: we sync at once, concurrently, and the
         * file system joins concurrent fdatasyncs of one file into as few journal commits as
         * it can. Rejected: LevelDB's queue (wait for the running sync, then lead the next one
         * for everyone who queued meanwhile) -- across processes each hand-over costs a futex
         * wake-up, and measured it gave no more puts/s and a worse p99 (bench/RESULTS.md). */
        int inflight = gc_covers(syncing, gen, end);
        uint64_t now = gc_now_ns();
        if (inflight) {
            if (!deadline) {
                uint64_t wait = 2 * gc_load(&w->sync_ns) + GC_WAIT_MIN_NS;
                deadline = now + (wait < GC_WAIT_MAX_NS ? wait : GC_WAIT_MAX_NS);
            }
            if (now < deadline) {
                uint64_t left = deadline - now;
                struct timespec ts = {(time_t)(left / 1000000000ULL), (long)(left % 1000000000ULL)};
                /* shared mapping: a non-private futex. EAGAIN (seq moved), EINTR, ETIMEDOUT:
                 * all mean "look again". */
                syscall(SYS_futex, &w->seq, FUTEX_WAIT, seq, &ts, NULL, 0);
                continue;
            }
            /* The leader is late (paused, slow or dead): stop trusting it, lead ourselves. */
        }
        uint64_t app = gc_load(&w->appended);
        uint64_t target = gc_covers(app, gen, end) ? app : gc_pack(gen, end);
        /* Claim: writers whose records the target covers now wait for us. */
        gc_raise(&w->syncing, target);
        if (gc_stop_countdown && --gc_stop_countdown == 0) kill(getpid(), SIGSTOP);
        uint64_t t0 = gc_now_ns();
        int rc;
        do {
            rc = fdatasync(fd);
        } while (rc < 0 && errno == EINTR);
        if (rc < 0) return errno ? errno : EIO;
        uint64_t dt = gc_now_ns() - t0;
        uint64_t old = gc_load(&w->sync_ns);
        __atomic_store_n(&w->sync_ns, old ? old - old / 8 + dt / 8 : dt, __ATOMIC_RELAXED);
        gc_raise(&w->synced, target);
        __atomic_add_fetch(&w->seq, 1, __ATOMIC_RELEASE);
        syscall(SYS_futex, &w->seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
        *synced_here = 1;
        return 0;
    }
}

#endif
