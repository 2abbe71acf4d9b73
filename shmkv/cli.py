"""`shmkv`: inspect and manage the stores on this host (ls, stats, check, rm, get, put, del,
repair).

Persistent stores: a segment records its disk tier, so every command that attaches a store
opens the tier too -- a `put` goes to disk, a `get` reads through. `--path DIR` attaches (and,
after a reboot, re-creates) the store over that directory, with the shape the directory records.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import psutil

from . import segment
from .errors import Error, InvalidArgument
from .sizes import format_size, parse_size
from .store import Store, attach, restore_counted


def _open(name: str, path: str | None = None) -> Store:
    """Attach an existing store; with `path`, create-or-attach over that directory (the disk
    holds the store: a segment lost in a reboot is re-created, shaped as the directory records)."""
    if path is not None:
        return attach(name, path=path)
    return attach(name, create=False)


def _path_option(f: Any) -> Any:
    return click.option(
        "--path", default=None, type=click.Path(file_okay=False),
        help="Disk tier directory of a persistent store (needed only when its segment is gone, "
             "e.g. after a reboot: a live segment records it).",
    )(f)


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
        if "codec" in info:
            info["codec"] = segment.CODEC_NAMES.get(info["codec"], f"unknown ({info['codec']})")
        rows.append(info)
    for name in segment.stale_lock_names():
        rows.append({"name": name, "initialized": False, "lock_file_only": True})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no stores")
        return
    click.echo(f"{'NAME':24} {'SIZE':>10} {'LAYOUT':>6} {'CODEC':>6}  DISK TIER")
    for r in rows:
        if r.get("lock_file_only"):
            click.echo(f"{r['name']:24} {'-':>10} {'-':>6} {'-':>6}  (a lock file without a segment: `shmkv rm {r['name']}` removes it)")
            continue
        if "error" in r:
            click.echo(f"{r['name']:24} {'?':>10} {'-':>6} {'-':>6}  ({r['error']})")
            continue
        if not r.get("initialized"):
            click.echo(f"{r['name']:24} {'?':>10} {'-':>6} {'-':>6}  (unfinished: a creator died; attach re-creates it)")
            continue
        tier = f"{r['path']} ({r['durability']})" if r.get("path") else "- (memory only)"
        click.echo(f"{r['name']:24} {format_size(r['size']):>10} {r['layout_version']:>6} {r['codec']:>6}  {tier}")


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_path_option
def stats(name: str, as_json: bool, path: str | None) -> None:
    """Show the counters and memory use of store NAME."""
    with _errors_as_messages(), _open(name, path) as kv:
        s = kv.stats()
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return
    classes = s.pop("classes")
    procs = s.pop("processes")
    lock_wait = s.pop("lock_wait")
    for k, v in s.items():
        click.echo(f"{k:16} {v}")
    click.echo(f"{'lock':>8} {'waits':>9} {'longest ms':>11}")
    for kind, w in lock_wait.items():
        click.echo(f"{kind:>8} {w['waits']:>9} {w['longest_ms']:>11.3f}")
    click.echo(f"{'processes':16} {len(procs)} attached")
    for pid in procs:
        click.echo(f"  {pid:>8}  {_describe(pid)}")
    click.echo(f"{'chunk':>8} {'pages':>6} {'used':>9} {'free':>9} {'evictions':>10}")
    for c in classes:
        click.echo(f"{c['chunk_size']:>8} {c['pages']:>6} {c['used']:>9} {c['free']:>9} {c['evictions']:>10}")


@main.command()
@click.argument("name")
@_path_option
def check(name: str, path: str | None) -> None:
    """Verify every structure of store NAME (exit 1 if a problem is found)."""
    with _errors_as_messages(), _open(name, path) as kv:
        problems = kv.verify()
    for p in problems:
        click.echo(p)
    if problems:
        sys.exit(1)
    click.echo(f"{name}: ok")


@main.command()
@click.argument("names", nargs=-1, required=True)
def rm(names: tuple[str, ...]) -> None:
    """Remove stores (attached processes keep their mapping until they close). Every name
    is tried; exit 1 if any could not be removed."""
    failed = False
    for name in names:
        try:
            if name in segment.stale_lock_names():
                if segment.remove_stale_lock(name):
                    click.echo(f"removed {name} (a lock file without a segment)")
                    continue
            segment.unlink(name)
        except Error as e:
            click.echo(f"Error: {e}", err=True)
            failed = True
            continue
        click.echo(f"removed {name}")
    if failed:
        sys.exit(1)


@main.command()
@click.argument("name")
@click.option("--size", default="64MiB", show_default=True, help="Segment size.")
@click.option("--codec", type=click.Choice(["raw", "pickle"]), default=None,
              help="Value codec (default: raw, or what --path's directory records).")
@_path_option
@click.option("--durability", type=click.Choice(["fsync", "interval", "none"]), default=None,
              help="With --path: when a write returns (default fsync).")
def create(name: str, size: str, codec: str | None, path: str | None, durability: str | None) -> None:
    """Create store NAME (or check that it exists with this size); with --path, a persistent
    store over that directory."""
    with _errors_as_messages(), attach(name, size=size, codec=codec, path=path, durability=durability) as kv:
        click.echo(f"{name}: {format_size(kv.stats()['segment_bytes'])}")


@main.command()
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@_path_option
def dump(name: str, file: str, path: str | None) -> None:
    """Snapshot the memory tier of store NAME to FILE (for a warm restart)."""
    with _errors_as_messages(), _open(name, path) as kv:
        n = kv.dump(file)
    click.echo(f"{name}: {n} items written to {file}")


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.argument("name")
@click.option("--size", default=None, help="Segment size when the store must be created.")
@_path_option
def restore(file: str, name: str, size: str | None, path: str | None) -> None:
    """Load the snapshot FILE into store NAME (created if needed, with the snapshot's codec
    and limits). A snapshot that does not fit the store loads nothing."""
    with _errors_as_messages():
        kv, n = restore_counted(file, name, size, path=path)
        kv.close()
    click.echo(f"{name}: {n} items restored from {file}")


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def repair(path: str, as_json: bool) -> None:
    """Rebuild the disk tier at PATH (a store's `path=` directory) from its files when its
    MANIFEST is lost or damaged: tables are kept at their levels, logs newer than them are
    converted to a table, damaged files are moved into PATH/lost/. Refuses while any process
    has the store open; on a consistent store it changes nothing."""
    from dataclasses import asdict

    from .lsm.repair import repair as run_repair

    with _errors_as_messages():
        report = run_repair(path)
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2, default=repr))
    else:
        click.echo(str(report))


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
@_path_option
def get(name: str, key: str, path: str | None) -> None:
    """Print the value of KEY (exit 1 when absent)."""
    missing = object()  # not None: a pickle store may hold None
    with _errors_as_messages(), _open(name, path) as kv:
        value = kv.get(key, missing)
    if value is missing:
        click.echo(f"{key}: not found", err=True)
        sys.exit(1)
    click.echo(_show(value))


@main.command()
@click.argument("name")
@click.argument("key")
@click.argument("value")
@click.option("--ttl", type=float, default=None, help="Seconds until the item expires.")
@_path_option
def put(name: str, key: str, value: str, ttl: float | None, path: str | None) -> None:
    """Store VALUE (UTF-8) under KEY."""
    with _errors_as_messages(), _open(name, path) as kv:
        kv.put(key, value if kv.codec == "pickle" else value.encode(), ttl=ttl)


@main.command("del")
@click.argument("name")
@click.argument("key")
@_path_option
def delete(name: str, key: str, path: str | None) -> None:
    """Delete KEY (exit 1 when absent)."""
    with _errors_as_messages(), _open(name, path) as kv:
        found = kv.delete(key)
    if not found:
        click.echo(f"{key}: not found", err=True)
        sys.exit(1)


# -- the federation ---------------------------------------------------------------------------


def _level(value: str) -> int | str:
    """--w/--r: a count, or a consistency level name (checked with the other flags)."""
    return int(value) if value.strip().lstrip("-").isdigit() else value.strip()


def _addrs(value: str) -> list[str]:
    return [a.strip() for a in value.split(",") if a.strip()]


def _bounds(value: str) -> tuple[float, float]:
    """--balance-bounds LOW:HIGH. :raises ConfigError: not two numbers."""
    from .cluster.errors import ConfigError

    try:
        low, high = (float(x) for x in value.split(":"))
    except ValueError:
        raise ConfigError(f"--balance-bounds must be LOW:HIGH (e.g. 0.5:2), got {value!r}") from None
    return low, high


def _key_rate(value: str) -> float:
    """--ae-rate: keys per second, a plain number. :raises ConfigError: not one -- and a size
    ("8MB") is pointed at --ae-bytes-rate, the limit that counts bytes."""
    from .cluster.errors import ConfigError

    try:
        return float(value)
    except ValueError:
        pass
    try:
        parse_size(value, "--ae-rate")
    except Error:
        raise ConfigError(f"--ae-rate is keys per second (a number, 0: no limit), got {value!r}") from None
    raise ConfigError(f"--ae-rate counts keys per second, not bytes: for a limit in bytes per second "
                      f"use --ae-bytes-rate {value}")


def _bytes_rate(value: str) -> float:
    """--ae-bytes-rate: bytes per second as a size ("8MB", "512KiB", "1000000"), or 0: no limit.
    :raises InvalidArgument: not a size."""
    if value.strip() in ("0", "0.0", "none"):
        return 0.0
    return float(parse_size(value, "--ae-bytes-rate"))


@main.command()
@click.option("--listen", required=True, help="host:port this node serves on (one of --seeds).")
@click.option("--seeds", default="", help="Every founding node's host:port, comma-separated: the epoch-1 ring.")
@click.option("--size", default="256MiB", show_default=True, help="Size of the node's shared-memory store.")
@click.option("--path", default=None, type=click.Path(file_okay=False), help="Disk tier (LSM) directory: copies survive a restart.")
@click.option("--durability", type=click.Choice(["fsync", "interval", "none"]), default="fsync", show_default=True)
@click.option("--weight", type=float, default=1.0, show_default=True, help="Share of the ring relative to weight-1 nodes.")
@click.option("--name", default=None, help="Node name (default node-PORT); unique in the cluster.")
@click.option("--n", "n", type=int, default=None, help="Replicas per key (the same on every node; default 3, or the sum of --n-per-dc).")
@click.option("--w", "w", default="2", show_default=True, help="Default write acks: a count or a level (one, quorum, all, local_quorum, each_quorum).")
@click.option("--r", "r", default="2", show_default=True, help="Default read answers: a count or a level.")
@click.option("--timeout", type=float, default=1.0, show_default=True, help="Seconds to wait for a replica.")
@click.option("--join-timeout", type=float, default=30.0, show_default=True, help="Seconds to wait for every seed at start.")
@click.option("--store", "store_name", default=None, help="Local store name (default cluster.NAME.PORT).")
@click.option("--resp", default=None, help="host:port of a Redis-protocol (RESP2) front.")
@click.option("--metrics", default=None, help="host:port of a Prometheus endpoint (GET /metrics).")
@click.option("--workers", type=int, default=None, help="Worker processes on the one port, sharing the store (default: one per core).")
@click.option("--gossip-interval", type=float, default=1.0, show_default=True,
              help="Seconds between gossip rounds (failure detection).")
@click.option("--strict/--sloppy", default=False, show_default=True,
              help="Strict quorums: hinted fallbacks do not count toward W (default: sloppy).")
@click.option("--max-hints", type=int, default=1_000_000, show_default=True,
              help="Bound on the hints this node keeps for down nodes (per worker).")
@click.option("--raft-dir", default=None, type=click.Path(file_okay=False),
              help="Run the configuration group (Raft): a voter keeps its log here.")
@click.option("--config-voters", default=None, help="Names of the group's voters (default: the first 3 seeds by name).")
@click.option("--join", default=None, help="host:port of a member: join the running cluster (configuration group).")
@click.option("--await-add", is_flag=True, help="With --join or --config: wait for `shmkv cluster add` instead of adding itself.")
@click.option("--config", "config_url", default=None,
              help="etcd://HOST:PORT[,HOST:PORT...][/PREFIX]: keep the cluster configuration in etcd instead of the built-in Raft group.")
@click.option("--dc", default=None, help="This node's data centre (carried in the ring).")
@click.option("--n-per-dc", default=None, help="Replicas per key in each data centre, e.g. dc1:2,dc2:1 (the same on every node).")
@click.option("--ae-interval", type=float, default=10.0, show_default=True, help="Seconds between anti-entropy rounds (0: none).")
@click.option("--tombstone-grace", type=float, default=86400.0, show_default=True,
              help="Seconds a delete's tombstone is kept before it is collected.")
@click.option("--ae-rebuild", type=float, default=3600.0, show_default=True,
              help="Seconds between rebuilds of the anti-entropy trees from the store (0: at start only).")
@click.option("--auto-balance", is_flag=True,
              help="With --raft-dir: the configuration leader re-weights nodes whose load stays uneven.")
@click.option("--balance-threshold", type=float, default=0.25, show_default=True,
              help="Uneven: a node's load per configured weight beyond (1+T)x or 1/(1+T)x its fair share.")
@click.option("--balance-window", type=float, default=60.0, show_default=True,
              help="Seconds the imbalance must last before a change.")
@click.option("--balance-cooldown", type=float, default=120.0, show_default=True,
              help="Seconds between two auto-balance changes (>= the window).")
@click.option("--balance-bounds", default="0.5:2", show_default=True,
              help="LOW:HIGH factors of each node's configured weight its weight stays within.")
@click.option("--balance-metric", type=click.Choice(["ops", "bytes"]), default="ops", show_default=True,
              help="What load is: store operations per second, or bytes stored in memory.")
@click.option("--balance-interval", type=float, default=1.0, show_default=True,
              help="Seconds between the leader's load samples.")
@click.option("--ae-rate", default="10000", show_default=True,
              help="Keys per second this node merges from anti-entropy repairs (0: no limit).")
@click.option("--ae-bytes-rate", default="8MB", show_default=True,
              help="Bytes per second of the copies it merges from repairs, a size (8MB = 8,000,000; 0: no limit).")
@click.option("--stream-rate", default="20M", show_default=True,
              help="Bytes per second this node pushes to new owners after a ring change (K/M/G: x1000).")
def serve(
    listen: str, seeds: str, size: str, path: str | None, durability: str, weight: float,
    name: str | None, n: int | None, w: str, r: str, timeout: float, join_timeout: float, store_name: str | None,
    resp: str | None, metrics: str | None, workers: int | None,
    gossip_interval: float, strict: bool, max_hints: int, raft_dir: str | None,
    config_voters: str | None, join: str | None, await_add: bool, config_url: str | None, dc: str | None, n_per_dc: str | None,
    ae_interval: float, tombstone_grace: float, ae_rebuild: float, ae_rate: str, ae_bytes_rate: str,
    auto_balance: bool, balance_threshold: float, balance_window: float, balance_cooldown: float,
    balance_bounds: str, balance_metric: str, balance_interval: float, stream_rate: str,
) -> None:
    """Run one node of a shmkv cluster until SIGTERM (asyncio; uvloop when installed)."""
    from .cluster.daemon import Options
    from .cluster.ring import parse_n_per_dc
    from .cluster.workers import serve as run_node

    try:
        per_dc = parse_n_per_dc(n_per_dc) if n_per_dc is not None else None
        bounds = _bounds(balance_bounds)
        key_rate, byte_rate = _key_rate(ae_rate), _bytes_rate(ae_bytes_rate)
        from .cluster.rebalance import parse_rate

        rate = parse_rate(stream_rate)
    except Error as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    if n is None:
        n = sum(per_dc.values()) if per_dc else 3
    opts = Options(
        listen=listen, seeds=_addrs(seeds), size=size, path=path, durability=durability, name=name,
        weight=weight, n=n, w=_level(w), r=_level(r), timeout=timeout, join_timeout=join_timeout, store=store_name,
        resp=resp, metrics=metrics,
        workers=workers,
        gossip_interval=gossip_interval, strict=strict, max_hints=max_hints,
        raft_dir=raft_dir, config_voters=_addrs(config_voters) if config_voters else None,
        join=join, await_add=await_add, config=config_url, dc=dc, n_per_dc=per_dc,
        ae_interval=ae_interval, tombstone_grace=tombstone_grace, ae_rebuild=ae_rebuild, ae_rate=key_rate,
        ae_bytes_rate=byte_rate,
        auto_balance=auto_balance, balance_threshold=balance_threshold, balance_window=balance_window,
        balance_cooldown=balance_cooldown, balance_bounds=bounds, balance_metric=balance_metric,
        balance_interval=balance_interval, stream_rate=rate,
    )
    if not opts.seeds and not join and not config_url:
        click.echo("error: give --seeds (a founding node), --join (a node joining a running cluster) "
                   "or --config etcd://... (the configuration kept in etcd)", err=True)
        sys.exit(2)
    try:
        rc = run_node(opts)
    except (Error, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    sys.exit(rc)


@main.group()
def cluster() -> None:
    """Inspect a shmkv cluster."""


@cluster.command("status")
@click.option("--seeds", required=True, help="Any members' host:port, comma-separated.")
@click.option("--timeout", type=float, default=1.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def cluster_status(seeds: str, timeout: float, as_json: bool) -> None:
    """Members, weights, ring share %, keys and health of the cluster SEEDS belong to."""
    from .cluster.client import Client

    with _errors_as_messages():
        c = Client(_addrs(seeds), n=None, w=1, r=1, timeout=timeout)
    with c:
        ring = c.ring
        assert ring is not None
        shares = ring.shares()
        rows = []
        defaults: dict[str, Any] = {}  # the cluster's default W and R, as the first node that answers has them
        for st in c.status():
            name = st["name"]
            if not defaults and "error" not in st and "w" in st:
                defaults = {"w": st["w"], "r": st["r"]}
            member = ring.members[name]
            healthy = "error" not in st and st.get("ready") and not st.get("draining")
            rows.append({
                "name": name,
                "addr": member.addr,
                "weight": member.weight,
                "share": shares[name],
                "keys": st.get("keys"),
                "health": "up" if healthy else ("down" if "error" in st else "not ready"),
                "suspects": st.get("suspects", []),
                "view": {peer: v.get("state") for peer, v in sorted((st.get("members") or {}).items())
                         if isinstance(v, dict)},
                "hints": (st.get("hints") or {}).get("pending"),
                "hints_by_owner": (st.get("hints") or {}).get("by_owner", {}),
                "hints_refused": (st.get("hints") or {}).get("refused"),
                "error": st.get("error"),
                "epoch": st.get("epoch"),
            })
    summary = {"epoch": ring.epoch, "n": c.n, **defaults, "members": rows,
               "up": sum(r_["health"] == "up" for r_ in rows)}
    with _errors_as_messages():
        summary["config"] = _config_status(_addrs(seeds) + [m.addr for m in ring.members.values()], timeout)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    wr = f", W={summary['w']}, R={summary['r']}" if "w" in summary else ""
    click.echo(f"ring epoch {ring.epoch}, N={c.n}{wr}, {summary['up']}/{len(rows)} members up")
    cs = summary["config"]
    if cs is not None and cs.get("source") == "etcd":
        down = sorted(n for n, v in cs["nodes"].items() if not v.get("connected"))
        click.echo(f"configuration: {cs['endpoint']} key {cs['key']} revision {cs['revision']} "
                   f"epoch {cs['epoch']}" + (f"; etcd not answering {', '.join(down)}" if down else ""))
    elif cs is not None:
        lead = cs.get("leader") or {}
        click.echo(f"configuration group: voters {', '.join(cs['voters'])}; leader "
                   f"{lead.get('name') or 'none'} {lead.get('addr') or ''} term {cs.get('term')} "
                   f"commit {cs.get('commit')} epoch {cs.get('epoch')}")
    if cs is not None:  # the move and the transfers: the same with Raft and with etcd
        bal = cs.get("balance") or {}
        if bal.get("enabled"):
            last = bal.get("last")
            click.echo(f"auto-balance ({bal.get('metric')}): {bal.get('state')}; {bal.get('adjustments', 0)} "
                       "changes by this leader" + (f", last {last['name']} {last['from']:g} -> {last['to']:g} "
                                                  f"at {last['load']:.2f}x its share" if last else "")
                       + ("; loads " + " ".join(f"{n}:{v:.2f}x" for n, v in bal["loads"].items())
                          if bal.get("loads") else ""))
        mv = cs.get("moving")
        if mv:
            click.echo(f"moving: the change of epoch {mv['epoch']} (from epoch {mv['from_epoch']}); waiting for "
                       f"{', '.join(mv['waiting'])} to finish streaming (reads of moving keys go to the old owners)")
        for nm, v in sorted((cs.get("nodes") or {}).items()):
            rb = v.get("rebalance") or {}
            if rb and (mv or rb.get("state") != "idle"):
                click.echo(f"  {nm:14} transfer {rb.get('state')}: {rb.get('keys_sent', 0)} keys / "
                           f"{rb.get('bytes_sent', 0) / 1e6:.1f} MB sent, {rb.get('scanned', 0)}/"
                           f"{rb.get('to_scan', 0)} keys scanned, {rb.get('ranges_moving', 0)} ranges moving, "
                           f"report {rb.get('report', '-')}")
    click.echo(f"{'NAME':16} {'ADDR':22} {'WEIGHT':>6} {'SHARE':>7} {'KEYS':>9} {'HINTS':>7}  HEALTH  VIEW")
    for r_ in rows:
        keys = "-" if r_["keys"] is None else str(r_["keys"])
        hints = "-" if r_["hints"] is None else str(r_["hints"])
        view = " ".join(f"{peer}:{state}" for peer, state in r_["view"].items())
        note = f"  ({r_['error']})" if r_["error"] else (f"  (suspects {', '.join(r_['suspects'])})" if r_["suspects"] else "")
        click.echo(f"{r_['name']:16} {r_['addr']:22} {r_['weight']:>6g} {r_['share']:>7.1%} {keys:>9} {hints:>7}  "
                   f"{r_['health']:6}  {view}{note}")
        if r_["hints_by_owner"]:
            click.echo(f"{'':16} hints pending for: " + ", ".join(f"{o} {c}" for o, c in r_["hints_by_owner"].items()))


def _config_status(addrs: list[str], timeout: float) -> dict[str, Any] | None:
    from .cluster.config_client import group_status

    return group_status(addrs, timeout)


def _change(seeds: str, cmd: dict[str, Any], timeout: float, wait: float = 0.0) -> None:
    """Commit ``cmd``; with ``wait`` > 0, then wait up to that many seconds for its move to end
    (exit status 1 if it did not: the copies are still being pushed)."""
    from .cluster.config_client import propose, wait_moved

    with _errors_as_messages():
        cfg = propose(_addrs(seeds), cmd, timeout)
    click.echo(f"committed: ring epoch {cfg.epoch}, members {', '.join(sorted(cfg.ring.members))}")
    if wait > 0 and cfg.moving is not None:
        with _errors_as_messages():
            left = wait_moved(_addrs(seeds) + [m.addr for m in cfg.ring.members.values()], cfg.moving.epoch, wait)
        if left is not None:
            click.echo(f"error: the copies of epoch {cfg.moving.epoch} are still moving after {wait:g} s; waiting "
                       f"for {', '.join(left.get('waiting') or [])} (see `shmkv cluster status`)", err=True)
            sys.exit(1)
        click.echo("moved: every old owner pushed its copies to the new owners")


@cluster.command("add")
@click.option("--seeds", required=True, help="Any members' host:port, comma-separated.")
@click.option("--weight", type=float, default=None, help="Share relative to weight-1 nodes (default: the node's --weight).")
@click.option("--dc", default=None, help="The node's data centre.")
@click.option("--timeout", type=float, default=15.0, show_default=True)
@click.option("--wait", type=float, default=0.0, show_default=True,
              help="Seconds to wait for the copies to reach the new node (0: return once committed).")
@click.argument("addr")
def cluster_add(seeds: str, weight: float | None, dc: str | None, timeout: float, wait: float, addr: str) -> None:
    """Add the running node at ADDR (started with --join ... --await-add) to the ring."""
    from .cluster.config_client import node_identity

    with _errors_as_messages():
        ident = node_identity(addr, timeout)
    cmd = {"op": "add", "name": ident["name"], "addr": addr,
           "weight": float(weight if weight is not None else ident.get("weight", 1.0)), "dc": dc}
    _change(seeds, cmd, timeout, wait)


@cluster.command("remove")
@click.option("--seeds", required=True, help="Any members' host:port, comma-separated.")
@click.option("--timeout", type=float, default=15.0, show_default=True)
@click.option("--wait", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the copies to reach their new owners (0: do not wait).")
@click.argument("name")
def cluster_remove(seeds: str, timeout: float, wait: float, name: str) -> None:
    """Remove the member NAME from the ring (its keys are streamed to their new owners); stop
    the node once this has returned 0."""
    _change(seeds, {"op": "remove", "name": name}, timeout, wait)


@cluster.command("voter")
@click.option("--seeds", required=True, help="Any members' host:port, comma-separated.")
@click.option("--timeout", type=float, default=15.0, show_default=True)
@click.argument("action", type=click.Choice(["add", "remove"]))
@click.argument("name")
def cluster_voter(seeds: str, timeout: float, action: str, name: str) -> None:
    """Add the member NAME to the configuration group's voters (it must run with a fresh
    --raft-dir), or remove it from them (one at a time; at least 2 stay)."""
    from .cluster.config_client import group_status, propose

    with _errors_as_messages():
        cfg = propose(_addrs(seeds), {"op": "voter", "action": action, "name": name}, timeout)
        st = group_status(_addrs(seeds) + [m.addr for m in cfg.ring.members.values()], 1.0)  # the leader's word
    click.echo(f"committed: voters {', '.join((st or {}).get('voters') or [])}")


@cluster.command("finish-move")
@click.option("--seeds", required=True, help="Any members' host:port, comma-separated.")
@click.option("--timeout", type=float, default=15.0, show_default=True)
@click.option("--force", is_flag=True, required=True, help="Required: this ends the move unfinished.")
def cluster_finish_move(seeds: str, timeout: float, force: bool) -> None:
    """End the move under way without waiting for every old owner (one is gone for good):
    reads of the keys it held go to their new owners at once, which may not have every copy
    yet (read repair and anti-entropy then bring them)."""
    from .cluster.config_client import group_status

    with _errors_as_messages():
        st = group_status(_addrs(seeds), timeout)
    mv = (st or {}).get("moving")
    if not mv:
        click.echo("error: no move is under way", err=True)
        sys.exit(2)
    _change(seeds, {"op": "streamed", "force": True, "move": mv["epoch"]}, timeout)


@cluster.command("weight")
@click.option("--seeds", required=True, help="Any members' host:port, comma-separated.")
@click.option("--timeout", type=float, default=15.0, show_default=True)
@click.argument("name")
@click.argument("weight", type=float)
def cluster_weight(seeds: str, timeout: float, name: str, weight: float) -> None:
    """Give member NAME the ring weight WEIGHT."""
    _change(seeds, {"op": "weight", "name": name, "weight": float(weight)}, timeout)


@main.command()
@click.option("--time", "duration", type=float, default=None,
              help="Seconds of workload (virtual seconds with --simulate).  [default: 10; 6 with --simulate]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the nemesis schedule and the workers.")
@click.option("--nemesis", default=None,
              help="Faults, comma-separated, or none. Real clusters: kill,pause,partition,loss,skew,"
                   "delay,hold,reset,scale (partition/loss/delay/hold/reset: --cluster local in a private "
                   "network namespace; skew: libfaketime; scale: --cluster local, a node added then removed). --simulate: kill,partition,loss,delay (the default: all four), crash.  [default: kill,pause]")
@click.option("--workload", type=click.Choice(["register", "set", "counter"]), default="register", show_default=True)
@click.option("--clients", type=int, default=4, show_default=True, help="Concurrent client workers.")
@click.option("--keys", type=int, default=None, help="Keys (register, counter workloads).  [default: 4; 3 with --simulate]")
@click.option("--nodes", type=int, default=3, show_default=True)
@click.option("--cluster", "cluster_kind", type=click.Choice(["inprocess", "local"]), default="inprocess", show_default=True,
              help="inprocess: the reference cluster in this process; local: shmkv serve daemons on this machine.")
@click.option("--simulate", is_flag=True,
              help="Deterministic simulation: the cluster's protocol code on a seeded network in virtual time; "
                   "the same --seed replays the same run bit for bit.")
@click.option("--runs", type=int, default=1, show_default=True,
              help="With --simulate: run this many seeds from --seed on, stop at the first failing one.")
@click.option("--seeds", "seed_range", default=None, metavar="A-B",
              help="With --simulate: run every seed A..B (inclusive), print one line per seed and a summary "
                   "with the first failing seed's replay command.")
@click.option("--converge", type=click.Choice(["ae", "hints"]), default="ae", show_default=True,
              help="With --simulate: what heals the replicas: anti-entropy, or hinted handoff alone (no kill).")
@click.option("--grace", type=float, default=None,
              help="With --simulate: tombstone grace, virtual seconds.  [default: --time + 0.5]")
@click.option("--raft", is_flag=True,
              help="With --cluster local: run the daemons' configuration group and check it (raft-group); "
                   "always on with --nemesis scale.")
@click.option("--op-timeout", type=float, default=0.5, show_default=True, help="Seconds before an op is 'unknown'.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Directory for history.jsonl, report.txt/json, timeline.png.")
@click.option("--check", "check_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Re-check a saved history instead of running.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--check-time", type=float, default=10.0, show_default=True,
              help="Seconds of linearizability search per key (then: unknown).")
@click.option("--bug", type=click.Choice(["ack-one", "stale-read", "lww-repair", "ack-before-w", "repair-overwrites",
                                         "hint-early-delete", "tombstone-early-gc", "raft-no-majority"]),
              default=None, hidden=True,
              help="Break the cluster on purpose (to see the checkers catch it): ack-one, stale-read, lww-repair "
                   "for the in-process cluster; ack-before-w, repair-overwrites, hint-early-delete, "
                   "tombstone-early-gc, raft-no-majority with --simulate.")
def torture(duration: float | None, seed: int, nemesis: str | None, workload: str, clients: int, keys: int | None,
            nodes: int, cluster_kind: str, simulate: bool, runs: int, seed_range: str | None, converge: str,
            grace: float | None, raft: bool, op_timeout: float, out: str | None,
            check_file: str | None, as_json: bool, check_time: float, bug: str | None) -> None:
    """Run clients against a cluster under faults and check the history (exit 0 only if every checker passes)."""
    from .torture import report
    from .torture.history import History
    from .torture.nemesis import parse_kinds
    from .torture.runner import RunConfig, make_cluster, run, write_outputs

    with _errors_as_messages():
        if check_file is not None:
            h = History.load(check_file)
            verdicts, skipped = report.check_history(h, time_limit=check_time)
            text = report.render_text(h, verdicts, skipped)
            if out is not None:
                from pathlib import Path

                write_outputs(Path(out), h, verdicts, skipped, text)
            click.echo(json.dumps(report.to_json(h, verdicts, skipped), indent=1) if as_json else text)
            sys.exit(0 if report.passed(verdicts) else 1)
        if simulate:
            seeds = _seed_list(seed, runs, seed_range)
            _simulate(seeds, seed_range is not None, duration, nemesis, workload, clients, keys, nodes, op_timeout,
                      out, as_json, bug, converge, grace)
            return
        if seed_range is not None:
            raise InvalidArgument("--seeds needs --simulate (a real run takes one --seed)")
        if bug in ("ack-before-w", "repair-overwrites", "hint-early-delete", "tombstone-early-gc",
                   "raft-no-majority"):
            raise InvalidArgument(f"--bug {bug} needs --simulate")
        cfg = RunConfig(time=10.0 if duration is None else duration, seed=seed,
                        nemesis=parse_kinds("kill,pause" if nemesis is None else nemesis), workload=workload,
                        clients=clients, keys=4 if keys is None else keys, op_timeout=op_timeout,
                        cluster=cluster_kind, nodes=nodes, raft=raft)
        from .torture.netns import needs_netns, reexec_in_netns

        if needs_netns(cfg):
            sys.exit(reexec_in_netns(_own_args(click.get_current_context())))
        result = run(make_cluster(cfg, bug=bug), cfg, out, time_limit=check_time)
    if as_json:
        click.echo(json.dumps(report.to_json(result.history, result.verdicts, result.skipped), indent=1))
    else:
        click.echo(result.text)
    sys.exit(0 if result.passed else 1)


def _own_args(ctx: click.Context) -> list[str]:
    """This command's arguments rebuilt from its parsed parameters (to run it again elsewhere)."""
    args = [ctx.command.name or ""]
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name is None:
            continue
        v = ctx.params.get(p.name)
        if v is None or v is False:
            continue
        args += [p.opts[0]] if p.is_flag else [p.opts[0], str(v)]
    return args


def _seed_list(seed: int, runs: int, seed_range: str | None) -> list[int]:
    if runs < 1:
        raise InvalidArgument(f"--runs must be >= 1, got {runs}")
    if seed_range is None:
        return list(range(seed, seed + runs))
    lo, sep, hi = seed_range.partition("-")
    try:
        first, last = int(lo), int(hi if sep else lo)
    except ValueError:
        raise InvalidArgument(f"--seeds takes A-B (two integers), not {seed_range!r}") from None
    if last < first:
        raise InvalidArgument(f"--seeds {seed_range}: the last seed is before the first")
    return list(range(first, last + 1))


def _simulate(seeds: list[int], sweep: bool, duration: float | None, nemesis: str | None, workload: str,
              clients: int, keys: int | None, nodes: int, op_timeout: float, out: str | None, as_json: bool,
              bug: str | None, converge: str = "ae", grace: float | None = None) -> None:
    """One seed (the full report), several (--runs: stop at the first failure) or a sweep
    (--seeds A-B: every seed, one line each, then a summary with the first failing seed)."""
    import time as _time
    from pathlib import Path

    from .torture import report
    from .torture.nemesis import parse_kinds
    from .torture.runner import write_outputs
    from .torture.simconfig import SIM_NEMESES, SimConfig, replay_command
    from .torture.simulate import run

    kinds = list(SIM_NEMESES) if nemesis is None else parse_kinds(nemesis)
    if converge == "hints" and nemesis is None:
        kinds = [k for k in kinds if k != "kill"]  # hints alone cannot cover a killed coordinator
    failed: list[int] = []
    first_cmd = None
    t0 = _time.monotonic()
    for s in seeds:
        cfg = SimConfig(seed=s, time=6.0 if duration is None else duration, nodes=nodes, clients=clients,
                        keys=3 if keys is None else keys, workload=workload, nemesis=kinds,
                        op_timeout=op_timeout, bug=bug, converge=converge, grace=grace)
        res = run(cfg)
        if out is not None:
            write_outputs(Path(out) / f"seed-{s}" if len(seeds) > 1 else Path(out), res.history, res.verdicts,
                          res.skipped, res.text)
        if as_json:
            click.echo(json.dumps({**report.to_json(res.history, res.verdicts, res.skipped), "hash": res.hash}, indent=1))
        elif len(seeds) == 1 or (not res.passed and not sweep):
            click.echo(res.text)
        elif res.passed:
            click.echo(f"seed {s}: pass ({len(res.history.ops)} ops, history {res.hash[:16]})")
        else:
            bad = ", ".join(v.checker for v in res.verdicts if v.status != "pass")
            click.echo(f"seed {s}: FAIL ({bad}; {len(res.history.ops)} ops, history {res.hash[:16]})")
        if not res.passed:
            failed.append(s)
            if first_cmd is None:
                first_cmd = replay_command(cfg)
            if not sweep:
                sys.exit(1)
    if sweep:
        wall = _time.monotonic() - t0
        click.echo(f"{len(seeds)} seeds, {len(seeds) - len(failed)} passed, {len(failed)} failed "
                   f"in {wall:.1f} s ({len(seeds) / max(wall, 1e-9):.1f} seeds/s)")
        if failed:
            click.echo(f"failing seeds: {' '.join(map(str, failed))}")
            click.echo(f"FAILING SEED {failed[0]}; replay: {first_cmd}")
            sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
