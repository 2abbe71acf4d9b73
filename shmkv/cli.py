"""`shmkv`: inspect and manage the stores on this host (ls, stats, check, rm, get, put, del)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import psutil

from . import segment
from .errors import Error
from .sizes import format_size
from .store import Store, attach


def _open(name: str) -> Store:
    return attach(name, create=False)


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e))


@contextmanager
def _errors_as_messages() -> Iterator[None]:
    """shmkv errors end the command with their message (exit 1), not a traceback."""
    try:
        yield
    except Error as e:
        _fail(e)


@click.group()
@click.version_option(package_name="shmkv")
def main() -> None:
    """Manage shmkv shared-memory stores on this host."""


@main.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def ls_cmd(as_json: bool) -> None:
    """List the stores on this host."""
    rows = []
    for name in segment.list_stores():
        try:
            info = segment.segment_info(name)
        except Error as e:
            info = {"name": name, "error": str(e)}
        rows.append(info)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no stores")
        return
    click.echo(f"{'NAME':24} {'SIZE':>10} {'LAYOUT':>6} {'CODEC':>6}")
    for r in rows:
        if not r.get("initialized"):
            click.echo(f"{r['name']:24} {'?':>10} {'-':>6} {'-':>6}  (unfinished: a creator died; attach re-creates it)")
            continue
        codec = {segment.CODEC_RAW: "raw", segment.CODEC_PICKLE: "pickle"}.get(r["codec"], "?")
        click.echo(f"{r['name']:24} {format_size(r['size']):>10} {r['layout_version']:>6} {codec:>6}")


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(name: str, as_json: bool) -> None:
    """Show the counters and memory use of store NAME."""
    with _errors_as_messages(), _open(name) as kv:
        s = kv.stats()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    classes = s.pop("classes")
    procs = s.pop("processes")
    for k, v in s.items():
        click.echo(f"{k:16} {v}")
    click.echo(f"{'processes':16} {len(procs)} attached")
    for pid in procs:
        click.echo(f"  {pid:>8}  {_describe(pid)}")
    click.echo(f"{'chunk':>8} {'pages':>6} {'used':>9} {'free':>9} {'evictions':>10}")
    for c in classes:
        click.echo(f"{c['chunk_size']:>8} {c['pages']:>6} {c['used']:>9} {c['free']:>9} {c['evictions']:>10}")


@main.command()
@click.argument("name")
def check(name: str) -> None:
    """Verify every structure of store NAME (exit 1 if a problem is found)."""
    with _errors_as_messages(), _open(name) as kv:
        problems = kv.verify()
    for p in problems:
        click.echo(p)
    if problems:
        sys.exit(1)
    click.echo(f"{name}: ok")


@main.command()
@click.argument("names", nargs=-1, required=True)
def rm(names: tuple[str, ...]) -> None:
    """Remove stores (attached processes keep their mapping until they close)."""
    for name in names:
        with _errors_as_messages():
            segment.unlink(name)
        click.echo(f"removed {name}")


@main.command()
@click.argument("name")
@click.option("--size", default="64MiB", show_default=True, help="Segment size.")
@click.option("--codec", type=click.Choice(["raw", "pickle"]), default="raw", show_default=True)
def create(name: str, size: str, codec: str) -> None:
    """Create store NAME (or check that it exists with this size)."""
    with _errors_as_messages(), attach(name, size=size, codec=codec) as kv:
        click.echo(f"{name}: {format_size(kv.stats()['segment_bytes'])}")


@main.command()
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
def dump(name: str, file: str) -> None:
    """Snapshot the memory tier of store NAME to FILE (for a warm restart)."""
    with _errors_as_messages(), _open(name) as kv:
        n = kv.dump(file)
    click.echo(f"{name}: {n} items written to {file}")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.argument("name")
@click.option("--size", default=None, help="Segment size when the store must be created.")
def restore(file: str, name: str, size: str | None) -> None:
    """Load the snapshot FILE into store NAME (created if needed)."""
    with _errors_as_messages(), attach(name, size=size) as kv:
        n = kv.load(file)
    click.echo(f"{name}: {n} items restored from {file}")


def _describe(pid: int) -> str:
    """A process's command line, for humans (psutil: portable process facts)."""
    try:
        p = psutil.Process(pid)
        return " ".join(p.cmdline())[:100] or p.name()
    except (psutil.Error, OSError):
        return "?"


def _show(value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return repr(value)
    return repr(value)


@main.command()
@click.argument("name")
@click.argument("key")
def get(name: str, key: str) -> None:
    """Print the value of KEY (exit 1 when absent)."""
    with _errors_as_messages(), _open(name) as kv:
        value = kv.get(key)
    if value is None:
        click.echo(f"{key}: not found", err=True)
        sys.exit(1)
    click.echo(_show(value))


@main.command()
@click.argument("name")
@click.argument("key")
@click.argument("value")
@click.option("--ttl", type=float, default=None, help="Seconds until the item expires.")
def put(name: str, key: str, value: str, ttl: float | None) -> None:
    """Store VALUE (UTF-8) under KEY."""
    with _errors_as_messages(), _open(name) as kv:
        kv.put(key, value if kv.codec == "pickle" else value.encode(), ttl=ttl)


@main.command("del")
@click.argument("name")
@click.argument("key")
def delete(name: str, key: str) -> None:
    """Delete KEY (exit 1 when absent)."""
    with _errors_as_messages(), _open(name) as kv:
        found = kv.delete(key)
    if not found:
        click.echo(f"{key}: not found", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
