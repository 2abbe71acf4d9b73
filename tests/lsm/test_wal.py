"""WAL framing and recovery: whole records replay, torn tails are dropped, corruption is reported."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from shmkv.errors import Corruption
from shmkv.lsm import LSM
from shmkv.lsm import format as fmt
from shmkv.lsm._accel import SharedPage
from shmkv.lsm.verify import verify_store
from shmkv.lsm.wal import WalFile, decode_batch, encode_batch, encode_record, parse, salvage

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


def test_bit_flip_in_the_last_complete_record_is_corruption_not_a_torn_tail() -> None:
    buf, ends = _records(2)
    for i in range(ends[0] + fmt.REC_HEAD.size, ends[1]):  # every payload byte of the last one
        bad = bytearray(buf)
        bad[i] ^= 0x10  # every byte is there: this record was written whole, then damaged
        rep = parse(bytes(bad), 0)
        assert not rep.torn and rep.corrupt is not None, i
        assert "bad record checksum" in rep.corrupt and rep.end == ends[0]


def test_seal_naming_its_own_or_an_earlier_generation_is_corruption() -> None:
    for nxt in (4, 5):
        buf = _records(1)[0] + encode_record(fmt.REC_SEAL, fmt.U64.pack(nxt))
        rep = parse(buf, 0, gen=5)
        assert rep.corrupt is not None and "names generation" in rep.corrupt
        assert rep.sealed_to is None  # a reader following it would go round in a cycle
    assert parse(buf, 0, gen=3).sealed_to == 5


def test_salvage_skips_a_bad_payload_by_its_length_and_resyncs_after_a_bad_header() -> None:
    buf, ends = _records(6)
    bad = bytearray(buf)
    bad[ends[0] + fmt.REC_HEAD.size + 2] ^= 0x01  # record 1: payload (head intact)
    bad[ends[2] + 1] ^= 0x80  # record 3: length field (head crc fails: length untrusted)
    sv = salvage(bytes(bad), 0)
    kept = [decode_batch(parse(r, 0).records[0][1])[0][1] for r in sv.records]
    assert kept == [b"key0", b"key2", b"key4", b"key5"]
    assert sv.dropped == [(ends[0], ends[1] - ends[0]), (ends[2], ends[3] - ends[2])]


def test_salvage_drops_a_torn_tail_and_everything_after_a_seal() -> None:
    buf, ends = _records(2)
    sealed = buf + encode_record(fmt.REC_SEAL, fmt.U64.pack(9))
    sv = salvage(sealed + _records(1)[0], 0, gen=8)
    assert sv.sealed_to == 9 and len(sv.records) == 3 and sv.dropped[0][0] == len(sealed)
    sv = salvage(buf[:-3], 0)
    assert len(sv.records) == 1 and sv.dropped == [(ends[0], ends[1] - 3 - ends[0])]


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
            assert w.append_wal_locked(encode_batch([(PUT, b"k", b"v", 0)])) == before + 2
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
    problems = db.verify()  # ... and reported, with the bytes kept aside
    assert len(problems) == 1 and "lost/" in problems[0]
    for name in os.listdir(os.path.join(db_path, "lost")):
        os.unlink(os.path.join(db_path, "lost", name))
    assert db.verify() == []


# -- recovery modes, bit flips and cuts -------------------------------------------------------------


def _flip(path: str, offset: int, mask: int = 0x04) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def _record_spans(path: str) -> list[tuple[int, int]]:
    """(start, end) of every record of a clean WAL file."""
    with open(path, "rb") as f:
        data = f.read()
    rep = parse(data[fmt.WAL_HEADER.size :], fmt.WAL_HEADER.size)
    assert rep.corrupt is None and not rep.torn
    spans, pos = [], fmt.WAL_HEADER.size
    for _, payload in rep.records:
        spans.append((pos, pos + fmt.REC_HEAD.size + len(payload)))
        pos = spans[-1][1]
    return spans


def _fill(open_db: Callable[..., LSM], n: int) -> str:
    db = open_db(memtable_bytes=1 << 20, durability="fsync")
    for i in range(n):
        db.put(b"k%d" % i, b"v%d" % i)  # each put returned: fsynced, acknowledged
    db.close()
    return db.path


def test_bit_flip_in_the_last_acknowledged_put_is_reported_not_cut_silently(
    open_db: Callable[..., LSM], db_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    _fill(open_db, 5)
    wal = _current_wal(db_path)
    start, end = _record_spans(wal)[-1]
    _flip(wal, end - 1)  # last byte of the value of the last (complete, fsynced) record
    with pytest.raises(Corruption, match=r"wal-0+1\.log: bad record checksum at offset"):
        open_db(memtable_bytes=1 << 20)
    assert os.path.getsize(wal) == end  # strict dropped nothing
    with caplog.at_level("WARNING", logger="shmkv.lsm"):
        db = open_db(memtable_bytes=1 << 20, wal_recovery="skip")
    assert [db.get(b"k%d" % i) for i in range(4)] == [b"v%d" % i for i in range(4)]
    assert db.get(b"k4") is None
    assert any(r.name == "shmkv.lsm" and wal in r.getMessage() for r in caplog.records)
    problems = db.verify()
    assert len(problems) == 1 and "lost/" in problems[0]
    (kept,) = os.listdir(os.path.join(db_path, "lost"))
    with open(os.path.join(db_path, "lost", kept), "rb") as f:
        assert len(f.read()) == end - start  # the damaged record itself, kept aside
    db.close()
    db = open_db(memtable_bytes=1 << 20)  # the log is clean now: strict opens it
    assert db.get(b"k3") == b"v3"


def test_skip_keeps_every_intact_record_after_a_bad_one_truncate_drops_them(
    open_db: Callable[..., LSM], db_path: str
) -> None:
    _fill(open_db, 10)
    wal = _current_wal(db_path)
    start, _ = _record_spans(wal)[3]
    _flip(wal, start + fmt.REC_HEAD.size + 1)
    import shutil

    copy = db_path + "-copy"
    shutil.copytree(db_path, copy)
    db = open_db(memtable_bytes=1 << 20, wal_recovery="skip")
    assert [db.get(b"k%d" % i) for i in range(10)] == [
        None if i == 3 else b"v%d" % i for i in range(10)
    ]
    assert db.stats()["wal_corrupt_records_dropped"] == 1
    db.put(b"after", b"x")
    db.close()
    db = LSM(copy, durability="none", background=False, wal_recovery="truncate")
    try:
        assert [db.get(b"k%d" % i) for i in range(10)] == [
            b"v%d" % i if i < 3 else None for i in range(10)
        ]
        assert db.verify() != []
    finally:
        db.close()
    db = open_db(memtable_bytes=1 << 20)
    assert db.get(b"after") == b"x" and db.get(b"k9") == b"v9"


def test_recovery_keeps_the_seal_so_the_next_generation_stays_in_the_chain(
    open_db: Callable[..., LSM], db_path: str
) -> None:
    """A bad record in a sealed log: truncating it must not cut the chain to the next log."""
    db = open_db(memtable_bytes=1 << 20, auto_maintenance=False)
    for i in range(5):
        db.put(b"k%d" % i, b"v%d" % i)
    wal1 = _current_wal(db_path)
    # Seal by hand the way a flush does (next WAL first, then the SEAL), then write to it.
    WalFile.create(db_path, 2, db._page).close()
    w = WalFile.open(db_path, 1, db._page)
    with w.locked():
        w.append_wal_locked(encode_record(fmt.REC_SEAL, fmt.U64.pack(2)))
    w.close()
    db.put(b"in-gen-2", b"y")
    assert db.stats()["wal_generations"] == [1, 2]
    db.close()
    import shutil

    pristine = db_path + "-pristine"
    shutil.copytree(db_path, pristine)
    spans = _record_spans(wal1)
    # A bad record before the seal; then the SEAL itself damaged (it must be written anew).
    for victim, lost in ((1, [b"k1"]), (len(spans) - 1, [])):
        for mode in ("truncate", "skip"):
            shutil.rmtree(db_path)
            shutil.copytree(pristine, db_path)
            _flip(wal1, spans[victim][0] + fmt.REC_HEAD.size + 2)
            db = open_db(memtable_bytes=1 << 20, wal_recovery=mode)
            assert db.get(b"in-gen-2") == b"y" and db.get(b"k0") == b"v0"
            kept = [k for k in (b"k1", b"k4") if db.get(k) is not None]
            assert kept == ([b"k4"] if mode == "skip" and lost else [] if lost else [b"k1", b"k4"])
            assert db.stats()["wal_generations"] == [1, 2], (victim, mode)
            db.put(b"later", b"z")  # goes to generation 2, after the seal
            db.close()
            db = open_db(memtable_bytes=1 << 20)  # strict: the chain is whole again
            assert db.get(b"later") == b"z" and db.get(b"in-gen-2") == b"y"
            db.close()


@pytest.mark.timeout(30)
def test_wal_sealed_to_a_log_that_does_not_exist_raises_instead_of_spinning(
    open_db: Callable[..., LSM], db_path: str
) -> None:
    _fill(open_db, 3)
    with open(_current_wal(db_path), "ab") as f:  # the state the relative-path bug left
        f.write(encode_record(fmt.REC_SEAL, fmt.U64.pack(2)))
    with pytest.raises(Corruption, match=r"wal-0+2\.log: missing, but .*wal-0+1\.log is sealed"):
        open_db()
    assert "live WAL is missing" in " ".join(verify_store(db_path))


@pytest.mark.timeout(30)
def test_wal_sealed_to_itself_raises_instead_of_looping(
    open_db: Callable[..., LSM], db_path: str
) -> None:
    _fill(open_db, 3)
    with open(_current_wal(db_path), "ab") as f:
        f.write(encode_record(fmt.REC_SEAL, fmt.U64.pack(1)))
    with pytest.raises(Corruption, match="names generation 1"):
        open_db()
    assert any("names generation 1" in p for p in verify_store(db_path))


def test_random_bit_flips_in_complete_records_are_recovered_or_reported(
    open_db: Callable[..., LSM], db_path: str, tmp_path: os.PathLike[str]
) -> None:
    """Seeded: a flip anywhere in any acknowledged record is either harmless (all keys read
    back) or reported (strict raises; skip drops only the records it names, and verify()
    says so). Never a silent loss."""
    import random
    import shutil

    rnd = random.Random(8)
    _fill(open_db, 40)
    wal = _current_wal(db_path)
    spans = _record_spans(wal)
    pristine = str(tmp_path) + "/pristine"
    shutil.copytree(db_path, pristine)
    for trial in range(30):
        shutil.rmtree(db_path)
        shutil.copytree(pristine, db_path)
        victim = rnd.randrange(len(spans))
        off = rnd.randrange(*spans[victim])
        _flip(wal, off, 1 << rnd.randrange(8))
        with pytest.raises(Corruption, match="wal-"):
            LSM(db_path, durability="none", background=False).close()
        db = LSM(db_path, durability="none", background=False, wal_recovery="skip")
        try:
            got = [db.get(b"k%d" % i) for i in range(40)]
            lost = [i for i in range(40) if got[i] is None]
            assert all(got[i] == b"v%d" % i for i in range(40) if i not in lost), trial
            assert lost == [victim], (trial, off, lost)  # only the flipped record's put
            assert any("lost/" in p for p in db.verify()), trial
        finally:
            db.close()


def test_random_cuts_keep_every_record_before_the_cut(
    open_db: Callable[..., LSM], db_path: str, tmp_path: os.PathLike[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A file cut short anywhere (a writer died inside write(2)) loses only the cut record,
    in every mode, and says so in the log."""
    import random
    import shutil

    rnd = random.Random(9)
    _fill(open_db, 40)
    wal = _current_wal(db_path)
    spans = _record_spans(wal)
    pristine = str(tmp_path) + "/pristine"
    shutil.copytree(db_path, pristine)
    for trial in range(30):
        shutil.rmtree(db_path)
        shutil.copytree(pristine, db_path)
        cut = rnd.randrange(fmt.WAL_HEADER.size, spans[-1][1])
        os.truncate(wal, cut)
        whole = sum(1 for _, e in spans if e <= cut)
        caplog.clear()
        with caplog.at_level("WARNING", logger="shmkv.lsm"):
            db = LSM(db_path, durability="none", background=False)
        try:
            got = [db.get(b"k%d" % i) for i in range(40)]
            assert got == [b"v%d" % i if i < whole else None for i in range(40)], trial
            torn = any(s < cut < e for s, e in spans)
            assert torn == any("torn tail" in r.getMessage() for r in caplog.records), trial
        finally:
            db.close()
