"""The `shmkv` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner

import shmkv
from shmkv.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_create_put_get_del_rm(name):
    assert run("create", name, "--size", "8MiB").exit_code == 0
    assert run("put", name, "greeting", "hello", "--ttl", "60").exit_code == 0
    r = run("get", name, "greeting")
    assert r.exit_code == 0 and r.output.strip() == "hello"
    assert run("del", name, "greeting").exit_code == 0
    r = run("get", name, "greeting")
    assert r.exit_code == 1
    assert run("del", name, "greeting").exit_code == 1
    assert run("rm", name).exit_code == 0
    assert name not in shmkv.list_stores()


def test_ls_stats_check(name):
    with shmkv.attach(name, size="8MiB") as kv:
        kv.put("a", b"1")
        r = run("ls")
        assert r.exit_code == 0 and name in r.output
        rows = json.loads(run("ls", "--json").output)
        assert any(row["name"] == name and row["size"] == 8 << 20 for row in rows)
        r = run("stats", name)
        assert r.exit_code == 0 and "items" in r.output and "attached" in r.output
        s = json.loads(run("stats", name, "--json").output)
        assert s["items"] == 1
        r = run("check", name)
        assert r.exit_code == 0 and "ok" in r.output


def test_dump_and_restore(name, tmp_path):
    snap = str(tmp_path / "s.snap")
    with shmkv.attach(name, size="8MiB") as kv:
        kv.put_many({f"k{i}": b"v%d" % i for i in range(100)})
    r = run("dump", name, snap)
    assert r.exit_code == 0 and "100 items" in r.output
    shmkv.unlink(name)
    r = run("restore", snap, name, "--size", "8MiB")
    assert r.exit_code == 0 and "100 items" in r.output
    with shmkv.attach(name) as kv:
        assert kv["k42"] == b"v42"


def test_missing_store_is_a_clear_error(name):
    for args in (("get", name, "k"), ("stats", name), ("check", name), ("rm", name)):
        r = run(*args)
        assert r.exit_code != 0
        assert "no store named" in r.output


def test_size_mismatch_on_create(name):
    assert run("create", name, "--size", "8MiB").exit_code == 0
    r = run("create", name, "--size", "16MiB")
    assert r.exit_code != 0 and "SegmentMismatch" not in r.output and "size" in r.output


def test_entry_point_runs_as_a_program(name, tmp_path):
    # run the shmkv this test imported (installed, or built in place), from elsewhere
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(shmkv.__file__))}
    out = subprocess.run([sys.executable, "-m", "shmkv.cli", "create", name, "--size", "8MiB"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert name in shmkv.list_stores()
