"""Bloom filter: one per SSTable, so a get for an absent key skips the table without a block read.

With ``bits_per_key`` = 10 and k = round(10 * ln 2) = 7 probes the false-positive rate is ~0.8%
(theory: (1 - e^(-k/b))^k); tests/lsm/test_bloom.py measures it.

Probes use double hashing (Kirsch & Mitzenmacher): ``h1 + i * h2 mod nbits`` from the two 64-bit
halves of MurmurHash3-x64-128 (``mmh3.hash64``, seed 0).

# DO NOT CHANGE: stored layout -- the hash function, its seed and the probe sequence are baked
into every stored filter; changing any of them turns every filter into garbage (false negatives).

The loops run in C (``_accel.bloom_build`` / ``bloom_check``; ``_accel.Probe`` checks a key
against every table of a version at once); tests/lsm/test_accel.py holds them to a plain-Python
oracle of this probe sequence.

Rejected: LevelDB's per-2-KiB-block filters (one filter per table is one read and one object,
and our tables are small); blocked/cache-line filters (a new stored layout for a gain that
matters only once the probes are not the bottleneck).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import mmh3

from . import _accel
from . import format as fmt


def key_hashes(key: bytes) -> tuple[int, int]:
    """The probe seeds of ``key``: compute once per lookup, test against every table's filter."""
    h1, h2 = mmh3.hash64(key, 0, False)
    return h1, h2 | 1  # odd step: the probe sequence cannot collapse onto one bit


_hashes = key_hashes


class BloomFilter:
    __slots__ = ("nbits", "k", "bits")

    def __init__(self, nbits: int, k: int, bits: bytearray | bytes) -> None:
        self.nbits = nbits
        self.k = k
        self.bits = bits

    @classmethod
    def build(
        cls, keys: Iterable[bytes], count: int, bits_per_key: int = fmt.BLOOM_BITS_PER_KEY
    ) -> BloomFilter:
        k = max(1, min(30, round(bits_per_key * math.log(2))))
        nbits = max(64, count * bits_per_key)
        nbits = (nbits + 7) // 8 * 8
        return cls(nbits, k, _accel.bloom_build(keys, nbits, k))

    def may_contain(self, key: bytes, hashes: tuple[int, int] | None = None) -> bool:
        """False means the key is certainly absent; True means "read the table".

        ``hashes``: :func:`key_hashes` of ``key``, if the caller already has them."""
        h1, h2 = hashes or _hashes(key)
        return _accel.bloom_check(self.bits, self.nbits, self.k, h1, h2)

    def encode(self) -> bytes:
        return fmt.FILTER_HEAD.pack(self.nbits, self.k) + bytes(self.bits)

    @classmethod
    def decode(cls, data: bytes) -> BloomFilter:
        """Raises ValueError if ``data`` is not a filter (the caller wraps it in Corruption)."""
        if len(data) < fmt.FILTER_HEAD.size:
            raise ValueError("filter block too short")
        nbits, k = fmt.FILTER_HEAD.unpack_from(data, 0)
        bits = data[fmt.FILTER_HEAD.size :]
        if nbits == 0 or nbits != len(bits) * 8 or not 1 <= k <= 30:
            raise ValueError(f"filter block inconsistent (nbits={nbits}, k={k}, {len(bits)} bytes)")
        return cls(nbits, k, bits)
