"""SSTable writer/reader: sorted blocks, index, filter, per-block checksum and compression."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shmkv.errors import Corruption
from shmkv.lsm import format as fmt
from shmkv.lsm.sstable import BlockCache, TableReader, TableWriter

PUT, DEL = fmt.KIND_PUT, fmt.KIND_DELETE


def _entries(n: int) -> list[tuple[bytes, int, bytes, int]]:
    return [
        (
            b"key-%06d" % i,
            DEL if i % 7 == 0 else PUT,
            b"" if i % 7 == 0 else b"value-%d-" % i * 5,
            i % 3,
        )
        for i in range(n)
    ]


def _write(
    path: str, entries: list[tuple[bytes, int, bytes, int]], compression: str = "lz4"
) -> None:
    w = TableWriter(path, compression)
    for k, kind, v, e in entries:
        w.add(k, kind, v, e)
    w.finish(1, 0)


@pytest.fixture
def table(tmp_path: Path) -> tuple[str, list[tuple[bytes, int, bytes, int]]]:
    p = str(tmp_path / "0000000000000001.sst")
    ents = _entries(3000)
    _write(p, ents)
    return p, ents


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
def test_every_key_reads_back_and_absent_keys_do_not(tmp_path: Path, compression: str) -> None:
    p = str(tmp_path / "t.sst")
    ents = _entries(2000)
    _write(p, ents, compression)
    r = TableReader(p, 1, BlockCache())
    try:
        assert len(r.handles) > 10  # ~4 KiB blocks, not one big one
        for k, kind, v, e in ents:
            assert r.get(k) == (kind, v, e)
        for i in range(2000):
            assert r.get(b"key-%06d-x" % i) is None
        assert r.get(b"zzz") is None and r.get(b"a") is None
        assert list(r.iter_from()) == ents
    finally:
        r.unref()


def test_blocks_are_compressed_when_it_pays(tmp_path: Path) -> None:
    ents = _entries(2000)
    _write(str(tmp_path / "a.sst"), ents, "lz4")
    _write(str(tmp_path / "b.sst"), ents, "none")
    assert os.path.getsize(tmp_path / "a.sst") < os.path.getsize(tmp_path / "b.sst") * 0.7


def test_range_iteration_is_half_open(table: tuple[str, list]) -> None:  # type: ignore[type-arg]
    p, ents = table
    r = TableReader(p, 1)
    try:
        got = [e[0] for e in r.iter_from(b"key-000100", b"key-000200")]
        assert got == [b"key-%06d" % i for i in range(100, 200)]
        assert [e[0] for e in r.iter_from(b"key-002998x")] == [b"key-002999"]
        assert list(r.iter_from(b"zz")) == []
    finally:
        r.unref()


def test_big_value_gets_a_block_of_its_own(tmp_path: Path) -> None:
    p = str(tmp_path / "big.sst")
    big = os.urandom(1 << 20) * 8  # 8 MiB, compressible only by repetition
    w = TableWriter(p)
    w.add(b"a", PUT, b"small", 0)
    w.add(b"b", PUT, big, 0)
    w.add(b"c", PUT, b"small", 0)
    w.finish(1, 0)
    r = TableReader(p, 1, BlockCache())
    try:
        assert len(r.handles) == 3
        assert r.get(b"b") == (PUT, big, 0)
        assert r.get(b"a") == (PUT, b"small", 0) and r.get(b"c") == (PUT, b"small", 0)
    finally:
        r.unref()


def test_writer_rejects_keys_out_of_order(tmp_path: Path) -> None:
    w = TableWriter(str(tmp_path / "t.sst"))
    w.add(b"b", PUT, b"", 0)
    with pytest.raises(ValueError):
        w.add(b"a", PUT, b"", 0)
    with pytest.raises(ValueError):
        w.add(b"b", PUT, b"", 0)
    w.abandon()
    assert not (tmp_path / "t.sst").exists()


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_corrupted_block_raises_corruption_naming_the_file(table: tuple[str, list]) -> None:  # type: ignore[type-arg]
    p, ents = table
    r = TableReader(p, 1)
    off, size = r.handles[3]
    r.unref()
    _flip(p, off + size // 2)
    r = TableReader(p, 1)  # footer, index and filter are intact: opening works
    try:
        key_in_block = r.last_keys[3]
        with pytest.raises(
            Corruption, match=rf"0001\.sst: block at offset {off}: checksum mismatch"
        ):
            r.get(key_in_block)
        assert r.get(r.last_keys[0]) is not None  # other blocks still read
        with pytest.raises(Corruption):
            list(r.iter_from())
        problems = r.verify()
        assert len(problems) == 1 and p in problems[0]
    finally:
        r.unref()


def test_corrupted_index_or_footer_is_refused_at_open(table: tuple[str, list]) -> None:  # type: ignore[type-arg]
    p, _ = table
    size = os.path.getsize(p)
    _flip(p, size - fmt.FOOTER.size - 10)  # inside the index block
    with pytest.raises(Corruption, match="checksum mismatch"):
        TableReader(p, 1)
    _flip(p, size - 3)  # the magic
    with pytest.raises(Corruption, match="bad magic"):
        TableReader(p, 1)


def test_truncated_table_is_refused(table: tuple[str, list]) -> None:  # type: ignore[type-arg]
    p, _ = table
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)
    with pytest.raises(Corruption, match=p):
        TableReader(p, 1)


def test_verify_of_a_clean_table_is_empty(table: tuple[str, list]) -> None:  # type: ignore[type-arg]
    r = TableReader(table[0], 1)
    try:
        assert r.verify() == []
    finally:
        r.unref()


def test_reader_stays_readable_after_unlink_while_referenced(table: tuple[str, list]) -> None:  # type: ignore[type-arg]
    p, ents = table
    r = TableReader(p, 1)
    r.ref()  # a running scan
    os.unlink(p)
    r.unref()  # the owner lets go; the scan's reference keeps the fd
    assert r.get(ents[5][0]) == ents[5][1:]
    r.unref()
    assert r.fd == -1
