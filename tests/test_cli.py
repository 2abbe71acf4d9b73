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


def test_commands_write_through_to_a_persistent_store(name, tmp_path):
    path = tmp_path / "db"
    shmkv.attach(name, size="8MiB", path=path, durability="none").close()
    with shmkv.attach(name) as kv:
        kv.put("doomed", b"x")
    assert run("put", name, "greeting", "hello").exit_code == 0  # no --path: the segment records it
    assert run("del", name, "doomed").exit_code == 0
    shmkv.unlink(name)  # a reboot
    with shmkv.attach(name, path=path) as kv:
        assert kv.get("greeting") == b"hello"
        assert kv.get("doomed") is None


def test_path_reopens_a_persistent_store_after_a_reboot(name, tmp_path):
    path = str(tmp_path / "db")
    r = run("create", name, "--size", "8MiB", "--codec", "pickle", "--path", path, "--durability", "none")
    assert r.exit_code == 0, r.output
    assert run("put", name, "k", "v").exit_code == 0
    r = run("ls")
    assert path in r.output and "(none)" in r.output
    rows = {row["name"]: row for row in json.loads(run("ls", "--json").output)}
    assert rows[name]["path"] == path and rows[name]["durability"] == "none"
    shmkv.unlink(name)
    assert run("get", name, "k").exit_code == 1  # no segment, no path: not found
    r = run("get", name, "k", "--path", path)
    assert r.exit_code == 0 and r.output.strip() == "'v'"  # a pickled str: the directory's codec
    s = json.loads(run("stats", name, "--json", "--path", path).output)
    assert s["path"] == path and s["codec"] == "pickle" and "disk" in s
    assert run("check", name, "--path", path).exit_code == 0
    assert run("del", name, "k", "--path", path).exit_code == 0
    r = run("get", name, "k", "--path", str(tmp_path / "other"))
    assert r.exit_code == 1 and path in r.output  # another directory: refused, naming both


def test_dump_to_a_missing_directory_is_a_message_not_a_traceback(name, tmp_path):
    assert run("create", name, "--size", "8MiB").exit_code == 0
    r = run("dump", name, str(tmp_path / "missing" / "s.snap"))
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert "does not exist" in r.output and "Traceback" not in r.output


def test_restore_reports_a_snapshot_that_does_not_fit(name, tmp_path):
    snap = str(tmp_path / "s.snap")
    with shmkv.attach(name, size="8MiB", codec="pickle") as kv:
        kv["k"] = [1]
        kv.dump(snap)
    shmkv.unlink(name)
    assert run("create", name, "--size", "8MiB").exit_code == 0  # raw
    r = run("restore", snap, name)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit) and "pickle" in r.output


def test_repair_rebuilds_a_lost_manifest_and_refuses_an_open_store(name, tmp_path):
    db = tmp_path / "db"
    with shmkv.attach(name, size="8MiB", path=db, durability="fsync") as kv:
        kv.put_many({f"k{i}": b"v%d" % i for i in range(50)})
        r = run("repair", str(db))
        assert r.exit_code == 1 and "open in another process" in r.output
    shmkv.unlink(name)
    os.unlink(db / "MANIFEST")
    r = run("repair", str(db))
    assert r.exit_code == 0 and "MANIFEST rebuilt" in r.output and "50 entries" in r.output
    r = run("repair", str(db))
    assert r.exit_code == 0 and "nothing changed" in r.output
    assert json.loads(run("repair", str(db), "--json").output)["changed"] is False
    with shmkv.attach(name, size="8MiB", path=db) as kv:
        assert kv["k49"] == b"v49" and kv.verify() == []


def test_rm_tries_every_name(name):
    a, b, missing = name + "-a", name + "-b", name + "-missing"
    for n in (a, b):
        shmkv.attach(n, size="8MiB").close()
    try:
        r = CliRunner().invoke(main, ["rm", a, missing, b])
        assert r.exit_code == 1
        assert f"removed {a}" in r.output and f"removed {b}" in r.output
        assert "no store named" in r.output
        assert a not in shmkv.list_stores() and b not in shmkv.list_stores()
    finally:
        for n in (a, b):
            if n in shmkv.list_stores():
                shmkv.unlink(n)


def test_get_prints_a_stored_none_of_a_pickle_store(name):
    with shmkv.attach(name, size="8MiB", codec="pickle") as kv:
        kv.put("nothing", None)
        r = run("get", name, "nothing")
        assert r.exit_code == 0 and r.output.strip() == "None"
        assert run("get", name, "absent").exit_code == 1


def test_ls_json_names_the_codec(name):
    with shmkv.attach(name, size="8MiB", codec="pickle"):
        rows = json.loads(run("ls", "--json").output)
        assert [r["codec"] for r in rows if r["name"] == name] == ["pickle"]
        assert name in run("ls").output


def test_ls_shows_and_rm_removes_a_lock_file_without_a_segment(name):
    from shmkv import segment

    open(segment.lock_path(name), "w").close()  # what a failed attach of an older shmkv left
    r = run("ls")
    assert name in r.output and "lock file" in r.output
    rows = json.loads(run("ls", "--json").output)
    assert any(row["name"] == name and row.get("lock_file_only") for row in rows)
    r = run("rm", name)
    assert r.exit_code == 0 and "removed" in r.output
    assert not os.path.exists(segment.lock_path(name))
