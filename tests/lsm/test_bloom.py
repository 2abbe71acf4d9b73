"""Bloom filter: no false negatives, ~1% false positives at 10 bits/key, stable stored bits."""

from __future__ import annotations

import hashlib

import pytest

from shmkv.lsm.bloom import BloomFilter


def test_no_false_negatives() -> None:
    keys = [b"key-%d" % i for i in range(5000)]
    f = BloomFilter.build(keys, len(keys))
    assert all(f.may_contain(k) for k in keys)


def test_false_positive_rate_is_about_one_percent_at_ten_bits_per_key() -> None:
    keys = [b"key-%d" % i for i in range(10000)]
    f = BloomFilter.build(keys, len(keys))
    probes = 50000
    fp = sum(f.may_contain(b"absent-%d" % i) for i in range(probes))
    assert f.k == 7 and f.nbits == 100000
    assert 0.002 < fp / probes < 0.02, fp / probes


def test_encode_decode_round_trip() -> None:
    keys = [b"a", b"b", b"c"]
    f = BloomFilter.build(keys, 3)
    g = BloomFilter.decode(f.encode())
    assert (g.nbits, g.k, bytes(g.bits)) == (f.nbits, f.k, bytes(f.bits))
    assert all(g.may_contain(k) for k in keys)


def test_stored_bits_never_change() -> None:
    """The hash, seed and probe sequence are stored layout: this digest must never change."""
    f = BloomFilter.build([b"key-%d" % i for i in range(1000)], 1000)
    assert hashlib.sha256(f.encode()).hexdigest()[:16] == GOLDEN


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x00\x00\x07", b"\x40\x00\x00\x00\x07" + bytes(7)])
def test_malformed_filter_is_rejected(data: bytes) -> None:
    with pytest.raises(ValueError):
        BloomFilter.decode(data)


GOLDEN = "c721ee736ccbbc6b"
