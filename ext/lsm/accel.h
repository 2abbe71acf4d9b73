/* Small C helpers for the LSM accelerator (ext/_lsm.pyx): CRC-32, little-endian loads and
 * stores, and the atomics of the shared change counter.
 *
 * CRC-32 is the IEEE/zlib one (reflected polynomial 0xEDB88320), so it matches zlib.crc32 bit
 * for bit: crc32_update(crc32_update(0, a), b) == zlib.crc32(a + b). Slice-by-8, the table
 * method of Intel's paper and zlib's braided code: 8 bytes per step, no CPU extensions needed.
 *
 * Every stored integer is little-endian (format.py); this header refuses to build elsewhere
 * rather than writing files another machine would misread.
 */
#ifndef SHMKV_LSM_ACCEL_H
#define SHMKV_LSM_ACCEL_H

#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "shmkv's on-disk format is little-endian; this build assumes a little-endian CPU"
#endif

static uint32_t shmkv_crc_tab[8][256];

static void shmkv_crc32_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int j = 0; j < 8; j++) c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        shmkv_crc_tab[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = shmkv_crc_tab[0][i];
        for (int t = 1; t < 8; t++) {
            c = shmkv_crc_tab[0][c & 0xff] ^ (c >> 8);
            shmkv_crc_tab[t][i] = c;
        }
    }
}

static uint32_t shmkv_crc32(uint32_t crc, const void *data, size_t n) {
    const uint8_t *p = (const uint8_t *)data;
    uint32_t (*T)[256] = shmkv_crc_tab;
    crc = ~crc;
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= crc;
        crc = T[7][lo & 0xff] ^ T[6][(lo >> 8) & 0xff] ^ T[5][(lo >> 16) & 0xff] ^ T[4][lo >> 24] ^
              T[3][hi & 0xff] ^ T[2][(hi >> 8) & 0xff] ^ T[1][(hi >> 16) & 0xff] ^ T[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = T[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static inline uint32_t shmkv_ld32(const void *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t shmkv_ld64(const void *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void shmkv_st32(void *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void shmkv_st64(void *p, uint64_t v) { memcpy(p, &v, 8); }

/* The shared page (<dir>/SHARED, see format.py): the change counter and the WAL append lock
 * live in a MAP_SHARED page every process of a store maps. */
static inline uint64_t shmkv_epoch_load(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline uint64_t shmkv_epoch_bump(uint64_t *p) {
    return __atomic_add_fetch(p, 1, __ATOMIC_SEQ_CST);
}

/* The WAL append lock: a process-shared, robust, error-checking mutex, set up as the segment's
 * locks are (ext/core/robust_mutex.h, which says why each attribute). A locker that gets
 * EOWNERDEAD holds the lock; the WAL needs no repair beyond what every locker does anyway
 * (replay to EOF, which cuts a torn tail), so it is marked consistent at once. */
#include <errno.h>
#include <pthread.h>

#include "core/robust_mutex.h"

_Static_assert(sizeof(pthread_mutex_t) <= 64, "the WAL lock must fit its 64-byte slot of the page");

static int shmkv_page_mutex_init(pthread_mutex_t *m) { return shmkv_robust_mutex_init(m); }

/* 0: locked; 1: locked, and the previous owner had died holding it; else an errno. */
static int shmkv_page_trylock(pthread_mutex_t *m) {
    int rc = pthread_mutex_trylock(m);
    if (rc == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        return 1;
    }
    return rc;
}

static int shmkv_page_lock_blocking(pthread_mutex_t *m) {
    int rc = pthread_mutex_lock(m);
    if (rc == EOWNERDEAD) {
        pthread_mutex_consistent(m);
        return 1;
    }
    return rc;
}

#endif
