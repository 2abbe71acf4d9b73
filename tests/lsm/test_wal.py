"""WAL framing and recovery: whole records replay, torn tails are dropped, corruption is reported."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from shmkv.errors import Corruption
from shmkv.lsm import LSM
from shmkv.lsm import format as fmt
from shmkv.lsm._accel import SharedPage
from shmkv.lsm.wal import WalFile, decode_batch, encode_batch, encode_record, parse

PUT, DEL = fmt.KIND_PUT, fmt.KIND_DELETE


def _records(n: int) -> tuple[bytes, list[int]]:
    """n one-entry batch records back to back, and the end offset of each."""
    buf = b""
    ends = []
    for i in range(n):
        buf += encode_batch([(PUT, b"key%d" % i, b"value-%d" % i * (i + 1), i)])
        ends.append(len(buf))
    return buf, ends


def test_batch_round_trips_through_a_record() -> None:
    entries = [(PUT, b"a", b"1", 0), (DEL, b"b", b"", 0), (PUT, b"c", b"x" * 5000, 123)]
    rep = parse(encode_batch(entries), 0)
    assert not rep.torn and rep.corrupt is None
    assert [list(decode_batch(p)) for _, p in rep.records] == [entries]


def test_huge_batch_is_split_into_several_whole_records() -> None:
    import shmkv.lsm.wal as w

    old, w._CHUNK = w._CHUNK, 1000
    try:
        entries = [(PUT, b"k%04d" % i, b"v" * 100, 0) for i in range(50)]
        rep = parse(encode_batch(entries), 0)
    finally:
        w._CHUNK = old
    assert len(rep.records) > 1
    assert [e for _, p in rep.records for e in decode_batch(p)] == entries


def test_torn_wal_tail_is_dropped_at_every_cut_point() -> None:
    buf, ends = _records(3)
    for cut in range(ends[1] + 1, ends[2]):  # every prefix of the last record
        rep = parse(buf[:cut], 0)
        assert rep.torn, cut
        assert rep.corrupt is None
        assert rep.end == ends[1]
        assert len(rep.records) == 2


def test_zero_filled_tail_is_torn_not_corrupt() -> None:
    buf, ends = _records(2)
    rep = parse(buf + bytes(300), 0)
    assert rep.torn and rep.corrupt is None and rep.end == ends[1]


def test_garbled_last_record_payload_is_a_torn_tail() -> None:
    buf, ends = _records(2)
    bad = bytearray(buf)
    bad[-1] ^= 0xFF  # head intact, payload bad, nothing after: a host crash lost the last page
    rep = parse(bytes(bad), 0)
    assert rep.torn and rep.end == ends[0]


def test_corrupted_record_mid_file_is_reported() -> None:
    buf, ends = _records(3)
    bad = bytearray(buf)
    bad[ends[0] + fmt.REC_HEAD.size + 3] ^= 0x01  # payload of record 2, record 3 follows
    rep = parse(bytes(bad), 0)
    assert not rep.torn
    assert rep.corrupt is not None and f"offset {ends[0]}" in rep.corrupt
    assert rep.end == ends[0] and len(rep.records) == 1


def test_corrupted_length_mid_file_is_reported_not_read_as_a_torn_tail() -> None:
    buf, ends = _records(3)
    bad = bytearray(buf)
    bad[ends[0] + 2] ^= 0x40  # the length field: it now claims far more than the file holds
    rep = parse(bytes(bad), 0)
    assert rep.corrupt is not None and not rep.torn


def test_data_after_a_seal_is_corruption() -> None:
    buf, _ = _records(1)
    buf += encode_record(fmt.REC_SEAL, fmt.U64.pack(2))
    rep = parse(buf, 0)
    assert rep.sealed_to == 2 and rep.corrupt is None
    rep = parse(buf + _records(1)[0], 0)
    assert rep.corrupt is not None


def test_wal_file_with_a_bad_header_is_refused(tmp_path: os.PathLike[str]) -> None:
    page = SharedPage(os.path.join(str(tmp_path), fmt.SHARED))
    w = WalFile.create(str(tmp_path), 5, page)
    w.close()
    p = os.path.join(str(tmp_path), fmt.wal_name(5))
    with open(p, "r+b") as f:
        f.write(b"NOTAWAL!")
    with pytest.raises(Corruption, match="bad magic"):
        WalFile.open(str(tmp_path), 5, page)


def test_append_and_read_back_under_the_lock(tmp_path: os.PathLike[str]) -> None:
    w = WalFile.create(str(tmp_path), 1, SharedPage(os.path.join(str(tmp_path), fmt.SHARED)))
    try:
        with w.locked():
            before = w.page.load()
            assert w.append_locked(encode_batch([(PUT, b"k", b"v", 0)])) == before + 2
        assert w.size() == fmt.WAL_HEADER.size + len(encode_batch([(PUT, b"k", b"v", 0)]))
        rep = w.read_from(0)
        assert [list(decode_batch(p)) for _, p in rep.records] == [[(PUT, b"k", b"v", 0)]]
    finally:
        w.close()


# -- through the LSM: what recovery does with those findings --------------------------------------


def _current_wal(path: str) -> str:
    gens = sorted(g for n in os.listdir(path) if (g := fmt.parse_wal_name(n)) is not None)
    return os.path.join(path, fmt.wal_name(gens[-1]))


def test_reopen_drops_torn_tail_and_keeps_every_whole_record(
    open_db: Callable[..., LSM], db_path: str
) -> None:
    db = open_db(memtable_bytes=1 << 20)
    for i in range(10):
        db.put(b"k%d" % i, b"v%d" % i)
    db.close()
    wal = _current_wal(db_path)
    with open(wal, "ab") as f:  # a writer died inside its write(2): half a record
        f.write(encode_batch([(PUT, b"ghost", b"never acknowledged", 0)])[:20])
    db = open_db(memtable_bytes=1 << 20)
    assert [db.get(b"k%d" % i) for i in range(10)] == [b"v%d" % i for i in range(10)]
    assert db.get(b"ghost") is None
    assert db.stats()["wal_torn_tails_dropped"] == 1
    assert db.verify() == []
    db.put(b"after", b"x")  # appended after the cut, not after the garbage
    db.close()
    db = open_db(memtable_bytes=1 << 20)
    assert db.get(b"after") == b"x" and db.verify() == []


def test_reopen_refuses_a_corrupted_record_mid_wal(
    open_db: Callable[..., LSM], db_path: str
) -> None:
    db = open_db(memtable_bytes=1 << 20)
    for i in range(10):
        db.put(b"k%d" % i, b"v%d" % i)
    db.close()
    wal = _current_wal(db_path)
    with open(wal, "r+b") as f:
        f.seek(fmt.WAL_HEADER.size + fmt.REC_HEAD.size + 5)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(Corruption, match="bad record checksum"):
        open_db(memtable_bytes=1 << 20)
    db = open_db(memtable_bytes=1 << 20, wal_recovery="truncate")
    assert db.get(b"k9") is None  # everything from the bad record on was dropped, and counted
    assert db.stats()["wal_dropped_bytes"] > 0
    assert db.verify() == []
