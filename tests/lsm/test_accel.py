"""shmkv.lsm._accel against plain-Python oracles of the stored formats (format.py): the C must
write and read exactly the bytes the format describes, and refuse malformed input cleanly."""

from __future__ import annotations

import heapq
import multiprocessing as mp
import os
import signal
import struct
import time
import types
import zlib
from pathlib import Path

import mmh3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmkv.lsm import _accel
from shmkv.lsm import format as fmt

keys = st.binary(min_size=1, max_size=40)
entries = st.tuples(
    st.sampled_from([fmt.KIND_PUT, fmt.KIND_DELETE]),
    keys,
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
)


# -- oracles: the format written out with struct and zlib --------------------------------------


def oracle_record(payload: bytes) -> bytes:
    lt = fmt.REC_LEN_TYPE.pack(len(payload), fmt.REC_BATCH)
    return fmt.REC_HEAD.pack(len(payload), fmt.REC_BATCH, zlib.crc32(lt), zlib.crc32(payload)) + payload


def oracle_entry(kind: int, key: bytes, value: bytes, expire: int) -> bytes:
    return fmt.ENTRY_HEAD.pack(kind, len(key), len(value), expire) + key + value


def oracle_block(items: list[tuple[bytes, int, bytes, int]]) -> bytes:
    body, offs = b"", []
    for k, kind, v, e in items:
        offs.append(len(body))
        body += oracle_entry(kind, k, v, e)
    return body + b"".join(struct.pack("<I", o) for o in offs) + struct.pack("<I", len(offs))


def oracle_bloom(ks: list[bytes], nbits: int, k: int) -> bytes:
    bits = bytearray(nbits // 8)
    for key in ks:
        h1, h2 = mmh3.hash64(key, 0, False)
        h2 |= 1
        for i in range(k):
            b = ((h1 + i * h2) & ((1 << 64) - 1)) % nbits
            bits[b >> 3] |= 1 << (b & 7)
    return bytes(bits)


# -- WAL ----------------------------------------------------------------------------------------


@given(st.binary(max_size=5000), st.integers(min_value=0, max_value=(1 << 32) - 1))
def test_crc32_is_zlibs(data: bytes, seed: int) -> None:
    assert _accel.crc32(data, seed) == zlib.crc32(data, seed)


def test_layout_constants_agree_with_format() -> None:
    assert fmt.REC_HEAD.size == 13 and fmt.ENTRY_HEAD.size == 17
    assert (fmt.REC_BATCH, fmt.KIND_PUT, fmt.KIND_DELETE) == (1, 1, 2)
    wal = types.SimpleNamespace(fd=-1, gen=1)
    assert _accel.Gen(wal, _accel.Memtable(1)).offset == fmt.WAL_HEADER.size  # WAL_HEADER_SIZE


@given(entries)
def test_encode_put_is_one_framed_entry(e: tuple[int, bytes, bytes, int]) -> None:
    kind, k, v, exp = e
    assert _accel.encode_put(kind, k, v, exp) == oracle_record(
        struct.pack("<I", 1) + oracle_entry(kind, k, v, exp)
    )


@given(st.lists(entries, max_size=30), st.integers(min_value=1, max_value=2000))
def test_encode_batch_splits_into_records_at_the_chunk_size(
    es: list[tuple[int, bytes, bytes, int]], chunk: int
) -> None:
    want, parts, size = b"", [], 0
    for kind, k, v, exp in es:
        parts.append(oracle_entry(kind, k, v, exp))
        size += len(parts[-1])
        if size >= chunk:
            want += oracle_record(struct.pack("<I", len(parts)) + b"".join(parts))
            parts, size = [], 0
    if parts:
        want += oracle_record(struct.pack("<I", len(parts)) + b"".join(parts))
    assert _accel.encode_batch(es, chunk) == want


@given(st.lists(entries, max_size=20))
def test_decode_batch_inverts_encoding(es: list[tuple[int, bytes, bytes, int]]) -> None:
    payload = struct.pack("<I", len(es)) + b"".join(oracle_entry(*e) for e in es)
    assert _accel.decode_batch(payload) == es


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        struct.pack("<I", 1),  # promises an entry, has none
        struct.pack("<I", 1) + fmt.ENTRY_HEAD.pack(1, 100, 0, 0) + b"short",
        struct.pack("<I", 1) + fmt.ENTRY_HEAD.pack(9, 1, 0, 0) + b"k",  # unknown kind
        struct.pack("<I", 0) + b"trailing",
        struct.pack("<I", 1) + fmt.ENTRY_HEAD.pack(1, 0xFFFFFFFF, 0xFFFFFFFF, 0),
    ],
)
def test_decode_batch_refuses_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(ValueError):
        _accel.decode_batch(payload)


# -- bloom ----------------------------------------------------------------------------------------


@settings(max_examples=50)
@given(st.lists(keys, max_size=200), st.integers(min_value=1, max_value=30))
def test_bloom_build_sets_the_oracles_bits(ks: list[bytes], k: int) -> None:
    nbits = max(64, len(ks) * 10 + 7) // 8 * 8
    bits = _accel.bloom_build(ks, nbits, k)
    assert bytes(bits) == oracle_bloom(ks, nbits, k)
    for key in ks:
        h1, h2 = mmh3.hash64(key, 0, False)
        assert _accel.bloom_check(bytes(bits), nbits, k, h1, h2 | 1)


class _Bloom:
    def __init__(self, ks: list[bytes]) -> None:
        self.nbits = max(64, len(ks) * 10) // 8 * 8
        self.k = 7
        self.bits = bytes(_accel.bloom_build(ks, self.nbits, self.k))


class _Reader:
    def __init__(self, name: str, ks: list[bytes]) -> None:
        self.name = name
        self.bloom = _Bloom(ks)


def test_probe_returns_tables_that_may_hold_the_key_newest_first() -> None:
    l0_new = _Reader("l0-new", [b"b", b"m"])
    l0_old = _Reader("l0-old", [b"a", b"m", b"z"])
    l1 = [_Reader("l1-a", [b"a", b"c"]), _Reader("l1-d", [b"d", b"m"])]
    l2 = [_Reader("l2", [b"a", b"m", b"q"])]
    probe = _accel.Probe(
        [(b"b", b"m", l0_new), (b"a", b"z", l0_old)],
        [[(b"a", b"c", l1[0]), (b"d", b"m", l1[1])], [], [(b"a", b"q", l2[0])]],
    )
    names = lambda key: [r.name for r in probe.candidates(key)]  # noqa: E731
    assert names(b"m") == ["l0-new", "l0-old", "l1-d", "l2"]
    assert names(b"a") == ["l0-old", "l1-a", "l2"]
    assert names(b"z") == ["l0-old"]
    assert names(b"0") == []  # below every range: not even hashed
    absent = [b"absent-%d" % i for i in range(2000)]
    hits = sum(bool(probe.candidates(k)) for k in absent)
    assert hits < 0.1 * len(absent)
    assert probe.negatives > 0


# -- data blocks ---------------------------------------------------------------------------------


block_items = st.dictionaries(
    keys, st.tuples(st.sampled_from([1, 2]), st.binary(max_size=100), st.integers(0, 2**64 - 1)),
    max_size=60,
).map(lambda d: [(k, *d[k]) for k in sorted(d)])


@given(block_items, keys)
def test_block_search_finds_every_key_and_only_those(
    items: list[tuple[bytes, int, bytes, int]], probe: bytes
) -> None:
    block = oracle_block(items)
    for k, kind, v, e in items:
        assert _accel.block_search(block, k) == (kind, v, e)
    if probe not in {k for k, *_ in items}:
        assert _accel.block_search(block, probe) is None


@given(block_items, st.none() | keys, st.none() | keys)
def test_block_entries_decodes_the_range(
    items: list[tuple[bytes, int, bytes, int]], lo: bytes | None, hi: bytes | None
) -> None:
    got = _accel.block_entries(oracle_block(items), lo, hi)
    assert got == [
        (k, kind, v, e)
        for k, kind, v, e in items
        if (lo is None or k >= lo) and (hi is None or k < hi)
    ]


@pytest.mark.parametrize(
    "block",
    [
        b"",
        b"\x05\x00\x00\x00",  # count 5, no offsets
        struct.pack("<II", 1000, 1),  # an offset outside the block
        fmt.ENTRY_HEAD.pack(1, 50, 0, 0) + b"k" + struct.pack("<II", 0, 1),  # key overruns
        oracle_block([(b"k", 1, b"v", 0)])[:-8] + b"junk" + oracle_block([(b"k", 1, b"v", 0)])[-8:],
    ],
)
def test_malformed_blocks_raise_value_error_not_garbage(block: bytes) -> None:
    with pytest.raises(ValueError):
        _accel.block_search(block, b"k")
        _accel.block_entries(block)
    with pytest.raises(ValueError):
        _accel.block_entries(block)


# -- merge ----------------------------------------------------------------------------------------


def oracle_merge(sources: list[list[tuple[bytes, int, bytes, int]]]) -> list[tuple[bytes, int, bytes, int]]:
    seen: set[bytes] = set()
    out = []
    tagged = heapq.merge(*([(k, i, kind, v, e) for k, kind, v, e in s] for i, s in enumerate(sources)))
    for k, _, kind, v, e in tagged:
        if k not in seen:
            seen.add(k)
            out.append((k, kind, v, e))
    return out


@given(st.lists(block_items, max_size=6), st.integers(0, 2**64 - 1))
def test_merge_keeps_the_newest_version_of_each_key(
    sources: list[list[tuple[bytes, int, bytes, int]]], now: int
) -> None:
    want = oracle_merge(sources)
    assert list(_accel.Merge([iter(s) for s in sources])) == want
    live = [(k, v) for k, kind, v, e in want if kind == fmt.KIND_PUT and (e == 0 or e > now)]
    assert list(_accel.Merge(sources, now)) == live


def test_merge_refuses_sources_of_the_wrong_shape() -> None:
    with pytest.raises(TypeError):
        list(_accel.Merge([[("str-key", 1, b"", 0)]]))


# -- the shared page ------------------------------------------------------------------------------


def _bump_many(path: str, n: int) -> None:
    page = _accel.SharedPage(path)
    for _ in range(n):
        page.bump()


def test_counter_is_shared_between_processes_and_atomic(tmp_path: Path) -> None:
    path = str(tmp_path / "SHARED")
    page = _accel.SharedPage(path)
    start = page.load()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_bump_many, args=(path, 20000)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert page.load() == start + 60000
    assert _accel.SharedPage(path).load() == page.load()


def test_relocking_by_the_owner_raises_instead_of_hanging(tmp_path: Path) -> None:
    path = str(tmp_path / "SHARED")
    page = _accel.SharedPage(path)
    page.lock()
    with pytest.raises(OSError) as ei:
        page.lock()
    assert ei.value.errno == 35  # EDEADLK
    page.unlock()


def _append_worker(path: str, wal: str, n: int) -> None:
    page = _accel.SharedPage(path)
    fd = os.open(wal, os.O_RDWR | os.O_APPEND)
    i = 0
    while i < n:
        page.lock()
        end, seen = os.fstat(fd).st_size, page.load()
        page.unlock()
        if page.append(fd, struct.pack("<II", os.getpid(), i), end, seen):
            i += 1  # 0: another process appended in between; look again
    os.close(fd)


def test_appends_from_many_processes_land_whole_and_in_order(tmp_path: Path) -> None:
    path, wal = str(tmp_path / "SHARED"), str(tmp_path / "wal")
    open(wal, "wb").close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_worker, args=(path, wal, 3000)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    data = Path(wal).read_bytes()
    assert len(data) == 3 * 3000 * 8
    last: dict[int, int] = {}
    for off in range(0, len(data), 8):
        pid, seq = struct.unpack_from("<II", data, off)
        assert seq == last.get(pid, -1) + 1  # whole records, each writer's in order
        last[pid] = seq


def _die_holding_the_lock(path: str) -> None:
    page = _accel.SharedPage(path)  # kept mapped: the kernel marks the lock at our death
    page.lock()
    os.kill(os.getpid(), 9)


def test_a_lock_whose_owner_was_killed_passes_to_the_next_locker(tmp_path: Path) -> None:
    path = str(tmp_path / "SHARED")
    page = _accel.SharedPage(path)
    p = mp.get_context("spawn").Process(target=_die_holding_the_lock, args=(path,))
    p.start()
    p.join(60)
    assert p.exitcode == -9
    page.lock()  # does not hang: EOWNERDEAD makes us the owner
    page.unlock()
    assert page.owner_deaths == 1
    page.lock()
    page.unlock()
    assert page.owner_deaths == 1


def _snapshot_while_locked(path: str) -> None:
    page = _accel.SharedPage(path)
    page.lock()
    Path(path + ".snap").write_bytes(Path(path).read_bytes())  # the mutex says: locked by us
    page.unlock()


def _die_mid_append(path: str, wal: str) -> None:
    page = _accel.SharedPage(path)
    fd = os.open(wal, os.O_RDWR | os.O_APPEND)
    page.lock()
    page.bump()  # what append does before writing
    os.write(fd, b"half a rec")
    os.kill(os.getpid(), 9)


def test_a_writer_killed_mid_append_stops_every_fast_path(tmp_path: Path) -> None:
    """A reader may have loaded the counter after the dead writer's pre-write bump and looked
    at the file before its bytes landed: its view says "current" while a torn tail now ends
    the file. The next locker must bump, so that append() refuses that stale view instead of
    writing after the garbage."""
    path, wal = str(tmp_path / "SHARED"), str(tmp_path / "wal")
    Path(wal).write_bytes(b"")
    page = _accel.SharedPage(path)
    seen = page.load() + 1  # the reader's view: loaded after the writer's first bump
    p = mp.get_context("spawn").Process(target=_die_mid_append, args=(path, wal))
    p.start()
    p.join(60)
    assert p.exitcode == -9 and page.load() == seen
    fd = os.open(wal, os.O_RDWR | os.O_APPEND)
    try:
        assert page.append(fd, b"record", 0, seen) == 0  # refused: look again first
        assert Path(wal).read_bytes() == b"half a rec"
        assert page.owner_deaths == 1
    finally:
        os.close(fd)


def test_a_page_from_another_boot_is_reinitialised(tmp_path: Path) -> None:
    """A page whose lock was held when the host went down: the owner's thread id is in the
    mutex and no kernel will ever mark it dead. Opening it on the next boot must not hang."""
    path = str(tmp_path / "SHARED")
    _accel.SharedPage(path).close()
    p = mp.get_context("spawn").Process(target=_snapshot_while_locked, args=(path,))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    raw = bytearray(Path(path + ".snap").read_bytes())
    raw[12:48] = b"x" * 36  # another boot id, same file (same inode)
    Path(path).write_bytes(bytes(raw))
    page = _accel.SharedPage(path)
    page.lock()  # without the reinitialisation this would wait forever
    page.unlock()


def test_closing_a_page_releases_a_lock_held_through_it(tmp_path: Path) -> None:
    path = str(tmp_path / "SHARED")
    page = _accel.SharedPage(path)
    page.lock()
    page.close()
    again = _accel.SharedPage(path)
    again.lock()
    again.unlock()


def test_shared_page_refuses_a_foreign_file(tmp_path: Path) -> None:
    p = tmp_path / "SHARED"
    p.write_bytes(b"not a shared page".ljust(4096, b"\0"))
    with pytest.raises(ValueError, match="not a shmkv shared page"):
        _accel.SharedPage(str(p))
    assert p.read_bytes().startswith(b"not a shared page")


def test_a_sync_another_fsync_covered_is_skipped(tmp_path: Path) -> None:
    """Group commit (ext/lsm/group_commit.h): one fdatasync makes every record published as
    appended before it durable; a later sync_to for such a record runs no fdatasync."""
    page = _accel.SharedPage(str(tmp_path / "SHARED"))
    fd = os.open(tmp_path / "wal", os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        page.lock()
        try:
            page.append_locked(fd, b"first record", 0, 7)
            page.append_locked(fd, b"second record", 12, 7)
        finally:
            page.unlock()
        (appended, _, synced), _ = page.group_state()
        assert appended == (7, 25) and synced == (0, 0)
        assert page.sync_to(fd, 7, 25) is True  # nothing covered it yet: this call syncs
        assert page.sync_to(fd, 7, 12) is False  # covered by that fsync
        assert page.sync_to(fd, 8, 12) is True  # another generation's record: never covered
        assert page.group_state()[0][2] == (8, 12)
    finally:
        os.close(fd)
        page.close()


def _lead_and_stop(path: str, wal: str, end: int) -> None:
    page = _accel.SharedPage(path)
    fd = os.open(wal, os.O_RDWR | os.O_APPEND)
    _accel.stop_in_sync(1)  # stop after claiming the sync, before its fdatasync
    page.sync_to(fd, 7, end)
    os._exit(0)


def test_a_sync_in_flight_that_covers_a_record_is_trusted_only_until_a_deadline(
    tmp_path: Path,
) -> None:
    """A leader that claimed a sync covering our record, then stopped (SIGSTOP), holds no
    lock: we wait for it at most ~2 fsyncs + 2 ms (capped at 100 ms), then sync ourselves."""
    path, wal = str(tmp_path / "SHARED"), str(tmp_path / "wal")
    page = _accel.SharedPage(path)
    fd = os.open(wal, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    child = mp.get_context("fork").Process(target=_lead_and_stop, args=(path, wal, 12))
    try:
        page.lock()
        try:
            page.append_locked(fd, b"first record", 0, 7)
        finally:
            page.unlock()
        child.start()
        for _ in range(3000):  # wait until it has claimed and stopped
            if page.group_state()[0][1] == (7, 12):
                break
            time.sleep(0.01)
        assert page.group_state()[0][1] == (7, 12), "the leader never claimed its sync"
        t0 = time.monotonic()
        assert page.sync_to(fd, 7, 12) is True  # waited out the stopped leader, then synced
        assert time.monotonic() - t0 < 30  # bounded (a real stall would last until SIGCONT)
        assert page.group_state()[0][2] == (7, 12)
    finally:
        if child.pid is not None:
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)
        os.close(fd)
        page.close()
