/* hash.c -- the 64-bit key hash of the in-memory index.
 *
 * A wyhash-style multiply-mix hash (public-domain algorithm by Wang Yi): a few cycles for
 * a 16-byte key, good avalanche, seeded per store. The federation ring uses mmh3 instead
 * (a portable, well-known function other hosts can compute); this one never leaves the
 * segment, so speed wins. Invariant: the value depends only on (key, seed), and the seed
 * is fixed in the header at creation, so every process computes the same bucket.
 */
#include <string.h>

#include "core.h"

static const uint64_t P0 = 0xa0761d6478bd642fULL, P1 = 0xe7037ed1a0b428dbULL,
                      P2 = 0x8ebc6af09c88c6e3ULL, P3 = 0x589965cc75374cc3ULL;

static inline uint64_t mix(uint64_t a, uint64_t b) {
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}
static inline uint64_t r8(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint64_t r4(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t r3(const uint8_t *p, size_t k) {
    return ((uint64_t)p[0] << 16) | ((uint64_t)p[k >> 1] << 8) | p[k - 1];
}

uint64_t shmkv_hash(const void *key, size_t len, uint64_t seed) {
    const uint8_t *p = (const uint8_t *)key;
    uint64_t a, b;
    seed ^= mix(seed ^ P0, P1);
    if (len <= 16) {
        if (len >= 4) {
            a = (r4(p) << 32) | r4(p + ((len >> 3) << 2));
            b = (r4(p + len - 4) << 32) | r4(p + len - 4 - ((len >> 3) << 2));
        } else if (len > 0) {
            a = r3(p, len);
            b = 0;
        } else {
            a = b = 0;
        }
    } else {
        size_t i = len;
        if (i > 48) {
            uint64_t s1 = seed, s2 = seed;
            do {
                seed = mix(r8(p) ^ P1, r8(p + 8) ^ seed);
                s1 = mix(r8(p + 16) ^ P2, r8(p + 24) ^ s1);
                s2 = mix(r8(p + 32) ^ P3, r8(p + 40) ^ s2);
                p += 48;
                i -= 48;
            } while (i > 48);
            seed ^= s1 ^ s2;
        }
        while (i > 16) {
            seed = mix(r8(p) ^ P1, r8(p + 8) ^ seed);
            i -= 16;
            p += 16;
        }
        a = r8(p + i - 16);
        b = r8(p + i - 8);
    }
    return mix(P1 ^ len, mix(a ^ P1, b ^ seed));
}
