/* lock.c -- robust, process-shared mutexes with a short spin before sleeping.
 *
 * Every lock in the segment is a PTHREAD_PROCESS_SHARED + PTHREAD_MUTEX_ROBUST mutex: when
 * a process dies holding one, the kernel marks it and the next locker gets EOWNERDEAD --
 * it HOLDS the lock then (also from trylock), repairs what that lock guards, and calls
 * shmkv_lock_consistent(). A repairer that dies mid-repair leaves the mark in place, so the
 * next locker repairs again. No lock is ever unlocked while inconsistent (that would make it
 * ENOTRECOVERABLE forever).
 *
 * Waking a sleeping process costs ~50 us on these machines, hundreds of critical sections,
 * so shmkv_lock spins on trylock (test-and-test-and-set, with a pause) before it blocks,
 * and releases the GIL only for the blocking wait: other threads of the process keep
 * running, and the uncontended path pays nothing for the GIL.
 *
 * Rejected: `#ifdef PTHREAD_MUTEX_ROBUST` feature tests -- on glibc it is an enum, so the
 * test is false and robustness silently disappears. We call setrobust unconditionally.
 */
#include <errno.h>
#include <signal.h>
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

int shmkv_init_mutex(pthread_mutex_t *m) {
    pthread_mutexattr_t a;
    int rc = pthread_mutexattr_init(&a);
    if (rc) return rc;
    if ((rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED)) == 0 &&
        (rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST)) == 0 &&
        /* a thread relocking a lock it holds gets EDEADLK (an error), not a hang */
        (rc = pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK)) == 0)
        rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return rc;
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

int shmkv_lock(store_t *st, pthread_mutex_t *m) {
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
    STAT(st, ST_LOCK_WAITS);
    if (PyGILState_Check()) {
        Py_BEGIN_ALLOW_THREADS
        rc = pthread_mutex_lock(m);
        Py_END_ALLOW_THREADS
    } else {
        rc = pthread_mutex_lock(m);
    }
    if (rc == 0) return 0;
    if (rc == EOWNERDEAD) return 1;
fail:
    st->last_errno = rc;
    return SHMKV_ELOCK;
}

void shmkv_lock_consistent(pthread_mutex_t *m) { pthread_mutex_consistent(m); }

void shmkv_unlock(pthread_mutex_t *m) { pthread_mutex_unlock(m); }

void shmkv_crash_now(void) { kill(getpid(), SIGKILL); }
