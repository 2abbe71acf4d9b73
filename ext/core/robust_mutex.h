/* robust_mutex.h -- the one set-up of a robust, process-shared mutex, for every mutex that
 * lives in shared memory: the segment's locks (ext/core/lock.c) and the disk tier's WAL lock
 * in its SHARED page (ext/lsm/accel.h).
 *
 *   PTHREAD_PROCESS_SHARED   the mutex lives in a MAP_SHARED mapping every process uses;
 *   PTHREAD_MUTEX_ROBUST     a process that dies holding it does not wedge the others: the
 *                            next locker gets EOWNERDEAD, holds the lock, repairs what it
 *                            guards and calls pthread_mutex_consistent (lock.c says more);
 *   PTHREAD_MUTEX_ERRORCHECK a thread relocking a lock it holds gets EDEADLK (an error), not
 *                            a hang -- a finalizer or a disk-tier callback re-entering a store.
 *
 * Rejected: `#ifdef PTHREAD_MUTEX_ROBUST` feature tests -- on glibc it is an enum, so the
 * test is false and robustness silently disappears. setrobust is called unconditionally.
 */
#ifndef SHMKV_ROBUST_MUTEX_H
#define SHMKV_ROBUST_MUTEX_H

#include <pthread.h>

/* 0, or the errno of the pthread call that failed (nothing initialised then). */
static inline int shmkv_robust_mutex_init(pthread_mutex_t *m) {
    pthread_mutexattr_t a;
    int rc = pthread_mutexattr_init(&a);
    if (rc) return rc;
    if ((rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED)) == 0 &&
        (rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST)) == 0 &&
        (rc = pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK)) == 0)
        rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return rc;
}

#endif
