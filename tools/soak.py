"""A bounded SIGKILL soak of a persistent store on this host: is anything acknowledged lost?

    python tools/soak.py                              # 3 writers, 6 rounds (~5 s), as CI's test
    python tools/soak.py --writers 4 --rounds 200 --max-round 2 --seed 11 --json soak.json

Writers put and delete self-checking values with ``durability="fsync"``; each round SIGKILLs
every writer at a random moment, and every ``--unlink-every`` rounds the shared-memory segment
is unlinked too (a reboot: only the disk is left). Then the store is opened from its directory
alone and held to the writers' logs (shmkv/torture/soak.py says exactly how). The exit status
is 0 only when no acknowledged write is lost, no value is wrong or torn, and ``verify()`` finds
nothing; the store and its directory are removed unless ``--keep``.

The cluster's fault harness is ``shmkv torture`` (README, "Proof: torture and checkers").
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

import shmkv
from shmkv.torture import soak


def _remove(base: Path, within: float = 10.0) -> None:
    """Remove the soak's directory. A SIGKILLed writer's maintenance helper (shmkv/lsm/helper.py)
    ends on its parent's death a moment later; until then it may hold the store's SHARED and
    LOCK files open (it never creates a store: LSM(create=False)), so one rmtree can leave a
    file behind: try again until the directory is gone (bounded)."""
    deadline = time.monotonic() + within
    while True:
        shutil.rmtree(base, ignore_errors=True)
        if not base.exists():
            return
        if time.monotonic() >= deadline:
            click.echo(f"could not remove {base} within {within:g} s", err=True)
            return
        time.sleep(0.1)


@click.command(help=__doc__.split("\n")[0])
@click.option("--writers", default=3, show_default=True, type=click.IntRange(1, 64))
@click.option("--rounds", default=6, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--min-round", default=0.3, show_default=True, type=click.FloatRange(0.01, 60),
              help="Seconds a round runs at least before the kill.")
@click.option("--max-round", default=1.0, show_default=True, type=click.FloatRange(0.01, 60),
              help="Seconds a round runs at most before the kill.")
@click.option("--keys", default=400, show_default=True, type=click.IntRange(1, 10_000_000),
              help="Keys per writer.")
@click.option("--size", default="4MiB", show_default=True, help="The memory tier's size.")
@click.option("--unlink-every", default=2, show_default=True, type=click.IntRange(1, 100_000),
              help="Unlink the segment after every this many rounds.")
@click.option("--seed", default=7, show_default=True, type=int)
@click.option("--dir", "where", default=None, type=click.Path(file_okay=False),
              help="Where the store's directory goes (default: a new temporary directory).")
@click.option("--keep", is_flag=True, help="Keep the store's directory and the writers' logs.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Write the result here.")
def main(writers: int, rounds: int, min_round: float, max_round: float, keys: int, size: str,
         unlink_every: int, seed: int, where: str | None, keep: bool, json_out: str | None) -> None:
    if max_round < min_round:
        raise click.BadParameter(f"--max-round {max_round} is below --min-round {min_round}")
    base = Path(where) if where else Path(tempfile.mkdtemp(prefix="shmkv-soak."))
    base.mkdir(parents=True, exist_ok=True)
    name = f"soak{os.getpid()}"
    try:
        got = soak.run(name, base / "db", writers=writers, rounds=rounds, size=size, keys=keys,
                       min_round=min_round, max_round=max_round, unlink_every=unlink_every, seed=seed)
    finally:
        if name in shmkv.list_stores():
            shmkv.unlink(name)
    verdict = "PASS" if got.ok else "FAIL"
    click.echo(f"{verdict}: {got.rounds} rounds, {got.kills} SIGKILLs, {got.acknowledged} keys checked; "
               f"lost {len(got.lost)}, wrong {len(got.wrong)}, verify() problems {len(got.problems)}")
    for what, items in (("lost", got.lost), ("wrong", got.wrong), ("verify", got.problems)):
        for item in items[:10]:
            click.echo(f"  {what}: {item}")
    if json_out:
        Path(json_out).write_text(json.dumps({
            "ok": got.ok, "rounds": got.rounds, "kills": got.kills, "acknowledged": got.acknowledged,
            "lost": got.lost, "wrong": got.wrong, "problems": got.problems, "seed": seed,
            "writers": writers}, indent=2) + "\n")
    if keep:
        click.echo(f"kept: {base}")
    else:
        _remove(base)
    sys.exit(0 if got.ok else 1)


if __name__ == "__main__":
    main()
