/* lock.c -- robust, process-shared mutexes with a short spin before sleeping.
 *
 * Every lock in the segment is a PTHREAD_PROCESS_SHARED + PTHREAD_MUTEX_ROBUST mutex: when
 * a process dies holding one, the kernel marks it and the next locker gets EOWNERDEAD --
 * it HOLDS the lock then (also from trylock), repairs what that lock guards (repair.c), and calls
 * shmkv_lock_consistent(). A repairer that dies mid-repair leaves the mark in place, so the
 * next locker repairs again. No lock is ever unlocked while inconsistent (that would make it
 * ENOTRECOVERABLE forever).
 *
 * Waking a sleeping process costs ~50 us on these machines, hundreds of critical sections,
 * so shmkv_lock spins on trylock (test-and-test-and-set, with a pause) before it blocks,
 * and releases the GIL only for the blocking wait: other threads of the process keep
 * running, and the uncontended path pays nothing for the GIL.
 *
 * The attributes are set up in robust_mutex.h (shared with the disk tier's WAL lock), which
 * says why each one.
 */
#include <errno.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include "core.h"

#define SPIN_TRIES 256

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause");
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

int shmkv_trylock(pthread_mutex_t *m) {
    int rc = pthread_mutex_trylock(m);
    if (rc == 0) return 0;
    if (rc == EOWNERDEAD) return 1;
    return rc;
}

/* glibc keeps the owner's tid in the low 30 bits of the first int of the mutex; reading it
 * lets a spinner wait without bouncing the cache line with failed cmpxchgs. Only a hint: the
 * trylock decides. */
static inline int looks_free(pthread_mutex_t *m) {
    return (__atomic_load_n((int *)m, __ATOMIC_RELAXED) & 0x3fffffff) == 0;
}

/* The slow path, after the spin failed: counted (per kind of lock) and timed, so stats()
 * shows who waits and for how long -- a lock holder SIGSTOPped or descheduled shows up
 * here. The uncontended path above pays nothing for it. */
__attribute__((noinline)) static int lock_slow(store_t *st, pthread_mutex_t *m, int kind) {
    struct timespec t0, t1;
    int rc;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (PyGILState_Check()) {
        Py_BEGIN_ALLOW_THREADS
        rc = pthread_mutex_lock(m);
        Py_END_ALLOW_THREADS
    } else {
        rc = pthread_mutex_lock(m);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (st->slot < SHMKV_MAX_SLOTS && kind >= 0 && kind < LK__COUNT) {
        uint64_t *stats = shmkv_me(st)->stats;
        int64_t us = (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000 + (t1.tv_nsec - t0.tv_nsec) / 1000;
        stats[ST_LOCK_WAITS]++;
        stats[ST_WAITS + kind]++;
        if (us > 0 && (uint64_t)us > stats[ST_WAIT_MAX_US + kind]) stats[ST_WAIT_MAX_US + kind] = (uint64_t)us;
    }
    return rc;
}

int shmkv_lock(store_t *st, pthread_mutex_t *m, int kind) {
    int rc;
    for (int i = 0; i < SPIN_TRIES; i++) {
        if (i == 0 || looks_free(m)) {
            rc = pthread_mutex_trylock(m);
            if (rc == 0) return 0;
            if (rc == EOWNERDEAD) return 1;
            if (rc != EBUSY) goto fail;
        }
        cpu_relax();
    }
    rc = lock_slow(st, m, kind);
    if (rc == 0) return 0;
    if (rc == EOWNERDEAD) return 1;
fail:
    st->last_errno = rc;
    return SHMKV_ELOCK;
}

void shmkv_lock_consistent(pthread_mutex_t *m) { pthread_mutex_consistent(m); }

void shmkv_unlock(pthread_mutex_t *m) { pthread_mutex_unlock(m); }

void shmkv_crash_now(store_t *st) {
    if (st->crash_sig == SIGSTOP) {
        st->crash_at = 0;
        kill(getpid(), SIGSTOP);
        return;
    }
    kill(getpid(), SIGKILL);
}

const char *shmkv_crash_point_name(int n) {
    switch (n) {
#define SHMKV_CP_NAME(name, num) case num: return #name;
        SHMKV_CRASH_POINTS(SHMKV_CP_NAME)
#undef SHMKV_CP_NAME
    }
    return NULL;
}

static inline int held_by(pthread_mutex_t *m, uint32_t tid) {
    return (uint32_t)(__atomic_load_n((int *)m, __ATOMIC_RELAXED) & 0x3fffffff) == tid;
}

uint32_t shmkv_locks_held_by(store_t *st, uint32_t tid) {
    header_t *h = st->hdr;
    uint32_t n = held_by(&h->page_lock.m, tid) + held_by(&h->reg_lock.m, tid) + held_by(&h->tree_lock.m, tid);
    for (uint32_t i = 0; i < SHMKV_TREE_LATCHES; i++) n += held_by(&h->tree_latch[i].m, tid);
    for (uint32_t i = 0; i < h->nclasses; i++) n += held_by(&st->classes[i].lock.m, tid);
    for (uint32_t i = 0; i < h->nstripes; i++) n += held_by(&st->stripes[i].m, tid);
    return n;
}
