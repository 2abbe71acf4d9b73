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
    <dir>/wal-<gen>.log       write-ahead logs; gen is a 16-digit decimal, oldest live = manifest.wal_gen
    <dir>/<number>.sst        SSTables; number is a 16-digit decimal from manifest.next_file
    <dir>/*.tmp               leftovers of an interrupted write; removed by the next maintenance

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
    +------------+------------+-----------+-----------+-------------+---------+-------+
    | filter_off | filter_len | index_off | index_len | entry_count | version | magic |
    | u64        | u64        | u64       | u64       | u64         | u32 +4  | 8 B   |
    +------------+------------+-----------+-----------+-------------+---------+-------+

SHARED page
-----------
::

    +--------+---------+---------+---------+--------------+------------------+-------------+
    | magic  | version | boot id | inode   | (zeros)      | counter u64      | WAL lock     |
    | 8 B    | u32     | 36 B    | u64     | to offset 64 | at offset 64     | at 128: a    |
    +--------+---------+---------+---------+--------------+------------------+ robust mutex |
                                                                              +-------------+
    A 4096-byte file every process of the store maps MAP_SHARED (``_accel.SharedPage``).
    The counter is bumped (atomic add) before and after every WAL append or seal and after
    every manifest replacement; only equality matters: a process that loads the value it saw
    at its last full look skips stat/fstat. The WAL lock serialises appends and replays. The
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
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
BLOCK_TRAILER = struct.Struct("<BI")  # compression, crc32
INDEX_ENTRY_TAIL = struct.Struct("<QI")  # offset, size
FILTER_HEAD = struct.Struct("<IB")  # nbits, k
FOOTER = struct.Struct(
    "<QQQQQII8s"
)  # filter_off, filter_len, index_off, index_len, count, version, pad, magic
MANIFEST_HEADER = struct.Struct("<8sIII")  # magic, version, length, crc32

# Tunables that are *not* stored layout (a reader accepts any block size).
BLOCK_SIZE = 4096
BLOOM_BITS_PER_KEY = 10

# Limits. Values are bounded by the u32 length fields and by lz4.block (< 2 GiB); the cap is
# lower so a single put cannot balloon every process's memtable past reason.
MAX_KEY = 64 * 1024
MAX_VALUE = 512 * 1024 * 1024
# A WAL record bigger than this is treated as a corrupted length, not an allocation request.
MAX_RECORD = MAX_VALUE + MAX_KEY + 1024 * 1024 * 64


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
