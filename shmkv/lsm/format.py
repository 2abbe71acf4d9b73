"""On-disk layouts of the spill tier: WAL records, SSTables, manifest. One place, one version.

Every multi-byte integer is little-endian. Every checksum is ``zlib.crc32``. A reader checks the
magic and :data:`FORMAT_VERSION` of each file it opens and refuses a mismatch with
:class:`~shmkv.errors.Corruption` naming the file.

Directory
---------
::

    <dir>/MANIFEST            current manifest (replaced by rename, never edited in place)
    <dir>/LOCK                flock()ed exclusively by whoever flushes or compacts
    <dir>/SHARED              one page every process maps: change counter + WAL lock (below)
    <dir>/STORE               a persistent store's codec and limits (storemeta.py), written once
    <dir>/wal-<gen>.log       write-ahead logs; gen is a 16-digit decimal, oldest live = manifest.wal_gen
    <dir>/<number>.sst        SSTables; number is a 16-digit decimal from manifest.next_file
    <dir>/*.tmp               leftovers of an interrupted write; removed by the next maintenance
    <dir>/lost/               what WAL recovery and repair took out of the store (lost.py);
                              never read by the store, reported by verify() until removed

WAL file
--------
::

    +--------+---------+----------+----------+   then records, back to back, until EOF
    | magic  | version | reserved | gen      |
    | 8 B    | u32     | u32      | u64      |   = 24 bytes (WAL_HEADER)
    +--------+---------+----------+----------+

    record:                                            (REC_HEAD = 13 bytes)
    +--------+------+-----------+-----------+---------------------+
    | length | type | head_crc  | data_crc  | payload             |   head_crc: crc32(length, type)
    | u32    | u8   | u32       | u32       | `length` bytes      |   data_crc: crc32(payload)
    +--------+------+-----------+-----------+---------------------+

    Why two checksums: a crash can only leave a *prefix* of the last record (or zeros, after a
    host crash on some file systems). With the head checked on its own, "head intact but the
    payload runs past EOF" is a torn tail, while "head fails its crc" with data after it is
    corruption; one crc over everything could not tell a torn tail from a corrupted length.

    type BATCH payload:  count u32, then `count` entries:
    +------+---------+---------+-----------+-----+-------+
    | kind | key_len | val_len | expire_ms | key | value |   kind: KIND_PUT / KIND_DELETE
    | u8   | u32     | u32     | u64       |     |       |   (ENTRY_HEAD = 17 bytes)
    +------+---------+---------+-----------+-----+-------+

    type SEAL payload:   next_gen u64. Last record of a WAL that was rotated: writers that find it
                         move on to wal-<next_gen>.log; nothing is ever appended after it.

SSTable file
------------
::

    +--------------+---------------+-----+---------------+-------------+-------------+--------+
    | data block 0 | data block 1  | ... | data block n  | filter blk  | index blk   | footer |
    +--------------+---------------+-----+---------------+-------------+-------------+--------+

    every block (data, filter, index) is stored as
    +-----------------------------+-------------+--------+
    | contents (maybe compressed) | compression | crc32  |   crc32 covers contents + compression
    |                             | u8          | u32    |   (BLOCK_TRAILER = 5 bytes)
    +-----------------------------+-------------+--------+

    data block contents, uncompressed: entries sorted by key, then their offsets
    +---------+---------+-----+---------------+---------------+-----+-------+
    | entry 0 | entry 1 | ... | offset 0 (u32)| offset 1 (u32)| ... | count |
    +---------+---------+-----+---------------+---------------+-----+-------+
    entry = the same 17-byte head + key + value as a WAL BATCH entry (binary search by offsets)

    A data block is closed once it holds >= BLOCK_SIZE bytes, so a block holds at least one
    entry: a 64 MiB value is simply a 64 MiB block of its own (no separate value log).

    filter block contents: bloom filter, see bloom.py
    +-----------+--------+---------+
    | nbits u32 | k u8   | bits    |
    +-----------+--------+---------+

    index block contents: one entry per data block, in order
    +-------------+------------------+--------------+-----------------------+
    | key_len u32 | last key of block| offset u64   | size u32 (w/ trailer) |
    +-------------+------------------+--------------+-----------------------+

    footer (FOOTER = 56 bytes, at EOF):
    +------------+------------+-----------+-----------+-------------+---------+--------+-------+
    | filter_off | filter_len | index_off | index_len | entry_count | version | origin | magic |
    | u64        | u64        | u64       | u64       | u64         | u32     | u32    | 8 B   |
    +------------+------------+-----------+-----------+-------------+---------+--------+-------+

    origin (was zero padding; 0 still means "unknown", so older tables read the same):
    bits 0-3 level + 1 the table was written at; bits 4-31 its WAL stamp, the manifest wal_gen
    it was written for (its entries all come from older WAL generations), 0 if it does not fit.
    Only ``shmkv repair`` reads it: with the manifest gone, it orders tables by level (then
    number, newest first) and knows which WALs are already in tables.

SHARED page
-----------
::

    +--------+---------+---------+---------+--------------+------------------+-------------+
    | magic  | version | boot id | inode   | (zeros)      | counter u64      | WAL lock     |
    | 8 B    | u32     | 36 B    | u64     | to offset 64 | at offset 64     | at 128: a    |
    +--------+---------+---------+---------+--------------+------------------+ robust mutex |
                                                                              +-------------+
    at 192, group commit (ext/lsm/group_commit.h): appended u64 | syncing u64 | synced u64 |
    seq u32 (futex) | pad u32 | sync_ns u64; each position = WAL generation mod 2^20 << 44 |
    offset in that WAL.

    A 4096-byte file every process of the store maps MAP_SHARED (``_accel.SharedPage``).
    The counter is bumped (atomic add) before and after every WAL append or seal, after
    every manifest replacement, and by whoever takes the WAL lock from a dead owner; only equality matters: a process that loads the value it saw
    at its last full look skips stat/fstat. The WAL lock serialises appends and replays (and
    is never held across an fsync). The group-commit words say how far the WAL is written
    (whole records) and known durable, so a writer whose record another process's fdatasync
    covered returns without one of its own. All zeros is a valid start (nothing is believed
    durable that the files do not show), so the words were added without a version bump. The
    page is never fsynced; it is reinitialised (under flock of the file, magic written last)
    when its boot id and inode are not this boot's and this file's -- after a reboot or a copy
    nobody can hold the lock.

Manifest file
-------------
::

    +--------+---------+--------+-------+-------------------------+
    | magic  | version | length | crc32 | body: msgpack map       |   crc32 covers body
    | 8 B    | u32     | u32    | u32   | `length` bytes          |   (MANIFEST_HEADER = 20)
    +--------+---------+--------+-------+-------------------------+

    body: {"generation": int, "wal_gen": int, "next_file": int,
           "tables": [[number, level, size, entries, smallest, largest], ...],
           "counters": {name: int}}

Store record (STORE)
--------------------
::

    +--------+---------+--------+-------+-------------------------+
    | magic  | version | length | crc32 | body: msgpack map       |   crc32 covers body
    | 8 B    | u32     | u32    | u32   | `length` bytes          |   (STORE_HEADER = 20)
    +--------+---------+--------+-------+-------------------------+

    body: {"name": str, "codec": int (the segment's codec code), "codec_arg": int,
           "max_key": int, "max_item": int, "size": int (segment bytes at creation: the default
           when the segment is re-created), "created_ms": int}
    Written by the store façade, never by the engine (see storemeta.py); its version is its own,
    so a change to the engine's files does not invalidate it.
"""

from __future__ import annotations

import struct

# DO NOT CHANGE: stored layout. Bump FORMAT_VERSION (and teach the readers) instead.
FORMAT_VERSION = 1

# DO NOT CHANGE: stored layout
WAL_MAGIC = b"SHMKVWAL"
SST_MAGIC = b"SHMKVSST"
MANIFEST_MAGIC = b"SHMKVMAN"

# DO NOT CHANGE: stored layout (WAL record types)
REC_BATCH = 1
REC_SEAL = 2

# DO NOT CHANGE: stored layout (entry kinds, in WAL batches and SSTable blocks)
KIND_PUT = 1
KIND_DELETE = 2

# DO NOT CHANGE: stored layout (block compression codes)
COMP_NONE = 0
COMP_LZ4 = 1
COMP_ZSTD = 2

# DO NOT CHANGE: stored layout
WAL_HEADER = struct.Struct("<8sIIQ")  # magic, version, reserved, gen
REC_HEAD = struct.Struct("<IBII")  # length, type, head_crc, data_crc
REC_LEN_TYPE = struct.Struct("<IB")  # the part of REC_HEAD that head_crc covers
ENTRY_HEAD = struct.Struct("<BIIQ")  # kind, key_len, val_len, expire_at_ms
# expire_at_ms is that u64: a later time cannot be encoded (0 = never expires)
MAX_EXPIRE_MS = (1 << 64) - 1
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
BLOCK_TRAILER = struct.Struct("<BI")  # compression, crc32
INDEX_ENTRY_TAIL = struct.Struct("<QI")  # offset, size
FILTER_HEAD = struct.Struct("<IB")  # nbits, k
FOOTER = struct.Struct(
    "<QQQQQII8s"
)  # filter_off, filter_len, index_off, index_len, count, version, origin, magic
MANIFEST_HEADER = struct.Struct("<8sIII")  # magic, version, length, crc32
STORE_HEADER = struct.Struct("<8sIII")  # magic, version, length, crc32
STORE_MAGIC = b"SHMKVSTO"
STORE_VERSION = 1

# Tunables that are *not* stored layout (a reader accepts any block size).
BLOCK_SIZE = 4096
BLOOM_BITS_PER_KEY = 10

# Limits. Values are bounded by the u32 length fields and by lz4.block (< 2 GiB); the cap is
# lower so a single put cannot balloon every process's memtable past reason.
MAX_KEY = 64 * 1024
MAX_VALUE = 512 * 1024 * 1024
# A WAL record bigger than this is treated as a corrupted length, not an allocation request.
MAX_RECORD = MAX_VALUE + MAX_KEY + 1024 * 1024 * 64


def pack_origin(level: int, wal_stamp: int) -> int:
    """The footer's origin word (see the SSTable layout above)."""
    lv = level + 1 if 0 <= level < 15 else 0
    stamp = wal_stamp if 0 < wal_stamp < 1 << 28 else 0
    return lv | stamp << 4


def unpack_origin(word: int) -> tuple[int | None, int | None]:
    """(level, wal_stamp) from a footer's origin word; None for what it does not record."""
    lv = word & 0xF
    stamp = word >> 4
    return (lv - 1 if lv else None), (stamp or None)


def wal_name(gen: int) -> str:
    return f"wal-{gen:016d}.log"


def sst_name(number: int) -> str:
    return f"{number:016d}.sst"


def parse_wal_name(name: str) -> int | None:
    if name.startswith("wal-") and name.endswith(".log") and name[4:-4].isdigit():
        return int(name[4:-4])
    return None


def parse_sst_name(name: str) -> int | None:
    if name.endswith(".sst") and name[:-4].isdigit():
        return int(name[:-4])
    return None


MANIFEST = "MANIFEST"
LOCKFILE = "LOCK"
SHARED = "SHARED"
STORE = "STORE"
