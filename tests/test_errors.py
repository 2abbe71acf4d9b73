"""Bad input gets a clear exception deriving from shmkv.Error, and the store stays usable."""

from __future__ import annotations

import mmap
import os
import struct

import posix_ipc
import pytest

import shmkv
from shmkv import segment


@pytest.mark.parametrize("key", [1, 2.5, None, ["k"], bytearray(b"k"), object()])
def test_wrong_key_type_raises_type_error(kv, key):
    with pytest.raises(TypeError) as ei:
        kv.put(key, b"v")
    assert isinstance(ei.value, shmkv.Error)
    assert "key must be bytes or str" in str(ei.value)
    for op in (kv.get, kv.delete, kv.__contains__, kv.incr):
        with pytest.raises(shmkv.InvalidType):
            op(key)
    kv.put("ok", b"v")
    assert kv["ok"] == b"v"


@pytest.mark.parametrize("value", ["text", 1, None, 3.5, {"a": 1}])
def test_wrong_value_type_raises_type_error(kv, value):
    with pytest.raises(shmkv.InvalidType) as ei:
        kv.put("k", value)
    assert isinstance(ei.value, TypeError)
    assert "bytes-like" in str(ei.value)
    assert "k" not in kv


def test_empty_key_is_rejected(kv):
    with pytest.raises(shmkv.KeyTooLarge, match="1 to"):
        kv.put(b"", b"v")
    with pytest.raises(shmkv.KeyTooLarge):
        kv.incr(b"")


def test_oversized_key_names_the_limit(kv):
    kv.put(b"k" * kv.max_key, b"v")
    with pytest.raises(shmkv.KeyTooLarge, match=str(kv.max_key)):
        kv.put(b"k" * (kv.max_key + 1), b"v")
    assert kv[b"k" * kv.max_key] == b"v"


def test_key_limit_is_at_least_250_bytes(kv):
    assert kv.max_key >= 250


def test_oversized_value_names_the_limit(kv):
    with pytest.raises(shmkv.ValueTooLarge, match=str(kv.max_item)) as ei:
        kv.put("k", b"x" * kv.max_item)
    assert isinstance(ei.value, ValueError)
    kv.put("k", b"ok")
    assert kv.verify() == []


def test_default_item_limit_is_one_mib_for_large_stores(name):
    with shmkv.attach(name, size="128MiB") as kv:
        assert kv.max_item == 1 << 20
        kv.put("k", b"x" * ((1 << 20) - 100))


def test_bad_ttl(kv):
    with pytest.raises(shmkv.InvalidArgument):
        kv.put("k", b"v", ttl=-1)
    with pytest.raises(shmkv.InvalidArgument):
        kv.put("k", b"v", ttl=0)
    with pytest.raises(shmkv.InvalidType):
        kv.put("k", b"v", ttl="soon")
    assert "k" not in kv


def test_bad_incr_delta(kv):
    with pytest.raises(shmkv.InvalidType):
        kv.incr("n", 1.5)
    with pytest.raises(shmkv.InvalidArgument):
        kv.incr("n", 2**64)


def test_use_after_close_raises_store_closed(name):
    kv = shmkv.attach(name, size="8MiB")
    kv.put("k", b"v")
    kv.close()
    kv.close()  # idempotent
    for call in (lambda: kv.get("k"), lambda: kv.put("k", b"v"), lambda: kv["k"],
                 lambda: len(kv), lambda: kv.delete("k"), lambda: kv.stats(),
                 lambda: list(kv.keys()), lambda: kv.verify(), lambda: "k" in kv):
        with pytest.raises(shmkv.StoreClosed):
            call()


def test_size_mismatch_names_both_sizes(name):
    with shmkv.attach(name, size="8MiB"):
        with pytest.raises(shmkv.SegmentMismatch) as ei:
            shmkv.attach(name, size="16MiB")
        msg = str(ei.value)
        assert str(8 << 20) in msg and str(16 << 20) in msg


def test_codec_mismatch(name):
    with shmkv.attach(name, size="8MiB", codec="raw"):
        with pytest.raises(shmkv.SegmentMismatch, match="pickle"):
            shmkv.attach(name, codec="pickle")


def test_layout_version_mismatch_names_both_versions(name):
    shmkv.attach(name, size="8MiB").close()
    shm = posix_ipc.SharedMemory(segment.shm_name(name))
    with mmap.mmap(shm.fd, 4096) as m:
        m[8:12] = struct.pack("<I", 99)
    shm.close_fd()
    with pytest.raises(shmkv.SegmentMismatch) as ei:
        shmkv.attach(name)
    assert "99" in str(ei.value) and "layout version 1" in str(ei.value)


def test_unfinished_segment_is_recreated(name):
    shm = posix_ipc.SharedMemory(segment.shm_name(name), posix_ipc.O_CREX, size=1 << 20)
    with mmap.mmap(shm.fd, 4096) as m:
        m[0:8] = b"NOTSHMKV"
        m[4000:4008] = struct.pack("<Q", 0)
    shm.close_fd()
    # init_done is unset, so it reads as a half-made segment and is re-created
    with shmkv.attach(name, size="8MiB") as kv:
        kv.put("k", b"v")
        assert kv["k"] == b"v"


def test_store_too_big_for_dev_shm_fails_at_create(name):
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    with pytest.raises(shmkv.StoreFull, match="/dev/shm"):
        shmkv.attach(name, size=free + (1 << 30))
    assert name not in shmkv.list_stores()


def test_fallocate_failure_is_a_clear_error(name, monkeypatch):
    # Even when statvfs says there is room, a failed reservation is an error at create
    # time, never a SIGBUS later: ask for more than the whole tmpfs while hiding statvfs.
    monkeypatch.setattr(segment, "_free_shm_bytes", lambda: None)
    total = os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize
    if total + (1 << 30) > (32 << 30):
        pytest.skip("tmpfs larger than the 32 GiB segment limit")
    with pytest.raises(shmkv.StoreFull, match="reserve"):
        shmkv.attach(name, size=total + (1 << 30))
    assert name not in shmkv.list_stores()


@pytest.mark.parametrize("size", ["12XB", "-5", "0", "abc", 0, -1])
def test_bad_size_strings(name, size):
    with pytest.raises(shmkv.Error):
        shmkv.attach(name, size=size)


def test_too_small_size_is_explained(name):
    with pytest.raises(shmkv.InvalidArgument, match="too small"):
        shmkv.attach(name, size="64KiB")
    assert name not in shmkv.list_stores()


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 300, "spaces here", None])
def test_bad_store_names(bad):
    with pytest.raises(shmkv.InvalidArgument):
        shmkv.attach(bad, size="8MiB")


def test_bad_attach_arguments(name):
    with pytest.raises(shmkv.InvalidArgument):
        shmkv.attach(name, size="8MiB", codec="json")
    with pytest.raises(shmkv.InvalidArgument):
        shmkv.attach(name, size="8MiB", max_key=0)
    with pytest.raises(shmkv.InvalidArgument):
        shmkv.attach(name, size="8MiB", growth_factor=0.5)
    assert name not in shmkv.list_stores()


def test_store_full_when_items_cannot_fit(name):
    # a store whose every page is held by one class still takes other sizes (pages move)
    with shmkv.attach(name, size="4MiB") as kv:
        for i in range(20000):
            kv.put(f"small{i}", b"s" * 20)
        kv.put("big", b"b" * 30000)
        assert kv["big"] == b"b" * 30000
        assert kv.verify() == []
