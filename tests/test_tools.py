"""tools/dump.py, the inspector, run as a user runs it (a subprocess) on each kind of file of a
small persistent store: 50 keys flushed to a table, 5 puts and a delete left in the WAL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import shmkv
from shmkv.lsm import LSM

DUMP = Path(__file__).resolve().parents[1] / "tools" / "dump.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DUMP), *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def store_dir(tmp_path: Path, name: str) -> Path:
    d = tmp_path / "store"
    kv = shmkv.attach(name, size="8MiB", path=str(d))
    for i in range(50):
        kv[b"a%03d" % i] = b"v" * (i * 10)
    kv.close()
    shmkv.unlink(name)
    db = LSM(str(d))
    db.flush()  # the 50 keys into table 1; a new WAL for what follows
    for i in range(5):
        db.put(b"b%d" % i, b"x%d" % i)
    db.delete(b"a003")
    db.close()
    return d


def test_wal_lists_its_records_and_entries(store_dir: Path) -> None:
    (wal,) = store_dir.glob("wal-*.log")
    r = _run("wal", str(wal), "--values")
    assert r.returncode == 0, r.stderr
    for i in range(5):
        assert f"put b'b{i}' value 2 B b'x{i}'" in r.stdout
    assert "delete b'a003'" in r.stdout
    assert "records 6, entries 6 (puts 5, deletes 1)" in r.stdout
    assert "end: clean" in r.stdout
    assert "b'a000'" not in r.stdout  # flushed: in the table, not in this WAL


def test_sst_lists_blocks_keys_footer_and_bloom(store_dir: Path) -> None:
    (sst,) = store_dir.glob("*.sst")
    r = _run("sst", str(sst))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "50 entries" in out.splitlines()[0] and "footer: filter @" in out
    for i in range(50):
        assert f"put b'a{i:03d}' value {i * 10} B" in out
    blocks = [ln for ln in out.splitlines() if ln.strip().startswith("block ")]
    assert blocks and sum(int(ln.split(": ")[1].split()[0]) for ln in blocks) == 50
    assert "bits/key" in out and "verify: ok" in out
    assert "put b'a" not in _run("sst", str(sst), "--no-keys").stdout


def test_manifest_names_the_table_and_generations(store_dir: Path) -> None:
    r = _run("manifest", str(store_dir))
    assert r.returncode == 0, r.stderr
    assert "oldest live WAL generation 2" in r.stdout
    assert "level 0: 1 tables" in r.stdout
    assert "0000000000000001.sst" in r.stdout and "50 entries, b'a000' .. b'a049'" in r.stdout
    assert "flushes 1" in r.stdout


def test_dir_dumps_every_file(store_dir: Path) -> None:
    r = _run("dir", str(store_dir), "--no-keys")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("manifest ") == 1 and r.stdout.count("\nwal ") == 1
    assert r.stdout.count("\nsst ") == 1


def test_segment_lists_slab_classes_of_a_live_store(name: str) -> None:
    kv = shmkv.attach(name, size="8MiB")
    try:
        for i in range(100):
            kv[b"k%d" % i] = b"v" * (i * 10)
        r = _run("segment", name)
        assert r.returncode == 0, r.stderr
        assert f"segment {name}: 8388608 bytes" in r.stdout and "100 items" in r.stdout
        rows = r.stdout.split("evictions\n", 2)[-1].splitlines()
        assert sum(int(ln.split()[2]) for ln in rows) == 100  # "used" chunks = items
        assert kv[b"k99"] == b"v" * 990 and len(kv) == 100  # read-only: nothing changed
    finally:
        kv.close()


def test_damage_and_missing_stores_are_reported_with_status_1(
    tmp_path: Path, store_dir: Path
) -> None:
    (wal,) = store_dir.glob("wal-*.log")
    data = bytearray(wal.read_bytes())
    data[40] ^= 0xFF  # inside the first record's payload: a checksum mismatch
    bad = tmp_path / "wal-0000000000000002.log"
    bad.write_bytes(bytes(data))
    r = _run("wal", str(bad))
    assert r.returncode == 1 and "corrupt at offset 24" in r.stdout and "error:" in r.stderr
    r = _run("segment", "no-such-store-for-dump-test")
    assert r.returncode == 1 and "no store named" in r.stderr


def test_results_regenerator_covers_every_bench_command_the_readme_quotes() -> None:
    import re

    root = DUMP.parents[1]
    r = subprocess.run(
        [sys.executable, str(root / "tools" / "results.py"), "--list"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    listed = [ln.split(None, 1)[-1].removeprefix("runs: ").split() for ln in r.stdout.splitlines()]
    quoted = re.findall(r"`(python bench/[^`]+)`", (root / "README.md").read_text())
    assert len(quoted) >= 5
    for cmd in quoted:  # every argument of the README's command is in one listed command
        assert any(set(cmd.split()) <= set(ln) for ln in listed), cmd


SOAK = DUMP.parent / "soak.py"


def test_the_soak_tool_kills_writers_and_reports_what_it_checked(tmp_path: Path) -> None:
    # tools/soak.py as a user runs it: 2 rounds of 2 fsync writers, SIGKILLed; its verdict on
    # stdout and in --json, exit 0 (the checker's catching a loss: tests/test_tiered.py)
    out = tmp_path / "soak.json"
    r = subprocess.run(
        [sys.executable, str(SOAK), "--writers", "2", "--rounds", "2", "--min-round", "0.2",
         "--max-round", "0.4", "--dir", str(tmp_path / "s"), "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("PASS: 2 rounds, 4 SIGKILLs")
    got = json.loads(out.read_text())
    assert got["ok"] and got["kills"] == 4 and got["acknowledged"] > 0 and got["lost"] == []
    assert not (tmp_path / "s").exists()  # removed without --keep
    bad = subprocess.run([sys.executable, str(SOAK), "--min-round", "2", "--max-round", "1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--max-round 1.0 is below --min-round 2.0" in bad.stderr
