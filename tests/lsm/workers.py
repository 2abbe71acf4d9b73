"""Subprocess workers for the crash and multi-process tests: ``python workers.py ROLE DIR ...``.

Protocol (crash writer): before each operation the worker prints ``I <op> <key>`` (intent),
after the call returned ``A <op> <key>`` (acknowledged), each line flushed. The parent SIGKILLs it
at a random moment, so at most one operation is in flight: the last ``I`` without its ``A``.

Values are derived from keys (:func:`value_for`), so the parent can check a value it never saw.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def value_for(key: bytes, size: int = 0) -> bytes:
    h = hashlib.blake2b(key, digest_size=16).digest()
    n = size or 20 + h[0] % 200
    return (h * (n // 16 + 1))[:n]


def _open(path: str, durability: str, memtable: int):  # noqa: ANN202
    from shmkv.lsm import LSM, LevelOptions

    return LSM(
        path,
        durability=durability,
        memtable_bytes=memtable,
        levels=LevelOptions(
            l0_trigger=2, l1_bytes=24 << 10, multiplier=4, target_file_bytes=8 << 10
        ),
        helper=os.environ.get("SHMKV_TEST_HELPER") == "1",  # in-process: the kill hooks see it
    )


def crash_writer(path: str, durability: str, tag: str, seed: str, memtable: str = "8192") -> None:
    """Writes unique keys forever (puts, some batches, deletes of its own acknowledged keys)."""
    rnd = random.Random(int(seed))
    db = _open(path, durability, int(memtable))
    out = sys.stdout
    acked: list[bytes] = []
    i = 0
    while True:
        r = rnd.random()
        if r < 0.15 and acked:
            k = acked.pop(rnd.randrange(len(acked)))
            out.write(f"I D {k.decode()}\n")
            out.flush()
            db.delete(k)
            out.write(f"A D {k.decode()}\n")
            out.flush()
        elif r < 0.25:
            keys = [f"{tag}-{i + j:07d}".encode() for j in range(rnd.randrange(2, 20))]
            i += len(keys)
            for k in keys:
                out.write(f"I P {k.decode()}\n")
            out.flush()
            db.put_many((k, value_for(k), 0) for k in keys)
            for k in keys:
                out.write(f"A P {k.decode()}\n")
            out.flush()
            acked += keys
        else:
            k = f"{tag}-{i:07d}".encode()
            i += 1
            out.write(f"I P {k.decode()}\n")
            out.flush()
            db.put(k, value_for(k))
            out.write(f"A P {k.decode()}\n")
            out.flush()
            acked.append(k)


def kill_at(path: str, target: str, nth: str) -> None:
    """Write until the ``nth`` call of ``target`` (a step of an append, flush or compaction),
    then SIGKILL ourselves right there: ``pre:`` before the call, ``post:`` after it,
    ``torn:wal_write`` halfway through writing the bytes of a WAL record."""
    import shmkv.lsm.maintenance as maintmod
    import shmkv.lsm.manifest as mfmod
    import shmkv.lsm.sstable as sstmod
    import shmkv.lsm.wal as walmod

    when, name = target.split(":")
    left = [int(nth)]

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if name == "wal_write":  # only the WAL's own writes (create, append), not the manifest's
        from shmkv.lsm import _accel

        # Every WAL append of the LSM is written by SharedPage (C); its test hook dies at the
        # same three places: before the write, half-way through it, after it (lock held).
        _accel.crash_in_append(int(nth), when)
    else:
        owner, attr = {
            "manifest_write": (mfmod, "write"),  # db.py calls mf.write(...)
            "table_finish": (sstmod.TableWriter, "finish"),
            "wal_create": (walmod.WalFile, "create"),
            "unlink": (maintmod, "unlink_quiet"),  # old WALs / compaction inputs, after the manifest
        }[name]
        orig = getattr(owner, attr)

        def hooked(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            left[0] -= 1
            if left[0] == 0 and when == "pre":
                die()
            res = orig(*a, **kw)
            if left[0] == 0 and when == "post":
                die()
            return res

        if name == "wal_create":  # a classmethod: orig is already bound to the class
            setattr(owner, attr, classmethod(lambda cls, *a, **kw: hooked(*a, **kw)))
        else:
            setattr(owner, attr, hooked)
    crash_writer(path, "fsync", "k", "7", "4096")


def reader(path: str, seconds: str) -> None:
    """Reads keys ``r-*`` (values from value_for) and scans, reporting any wrong answer."""
    from shmkv.lsm import LSM

    db = LSM(path, durability="none")
    end = time.monotonic() + float(seconds)
    reads = scans = 0
    bad = 0
    while time.monotonic() < end:
        n = 0
        for k, v in db.scan(b"r-", b"r-\xff"):
            n += 1
            if v != value_for(k):
                bad += 1
        if n != 2000:
            bad += 1
        scans += 1
        for _ in range(50):
            k = f"r-{random.randrange(2000):06d}".encode()
            v = db.get(k)
            reads += 1
            if v != value_for(k):  # every r- key exists for the whole test
                bad += 1
    db.close()
    print(f"reads={reads} scans={scans} bad={bad}", flush=True)


def writer(path: str, tag: str, count: str, memtable: str) -> None:
    """Puts ``count`` keys ``<tag>-<i>`` then exits; prints ``done``."""
    db = _open(path, "none", int(memtable))
    n = int(count)
    for i in range(0, n, 10):
        db.put_many(
            (k, value_for(k), 0)
            for k in (f"{tag}-{j:06d}".encode() for j in range(i, min(n, i + 10)))
        )
    db.close()
    print("done", flush=True)


def echo(path: str) -> None:
    """Line protocol on stdin: ``put K V`` / ``get K`` / ``del K``; answers one line each."""
    from shmkv.lsm import LSM

    db = LSM(path, durability="none")
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "put":
            db.put(parts[1].encode(), parts[2].encode())
            print("ok", flush=True)
        elif parts[0] == "get":
            v = db.get(parts[1].encode())
            print("None" if v is None else v.decode(), flush=True)
        elif parts[0] == "del":
            db.delete(parts[1].encode())
            print("ok", flush=True)
        elif parts[0] == "flush":
            db.flush()
            print("ok", flush=True)
        elif parts[0] == "quit":
            break
    db.close()


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    {
        "crash_writer": crash_writer,
        "kill_at": kill_at,
        "reader": reader,
        "writer": writer,
        "echo": echo,
    }[role](*args)
