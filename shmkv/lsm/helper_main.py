"""The maintenance helper's program: what runs in the child process a handle starts
(helper.py has the protocol and the parent's side).

It opens the store as any process would, without maintenance of its own, and runs one
:meth:`LSM.maintain` round per "go" line on stdin until EOF. It opens only a store that exists
(``create=False``): a helper started just before its parent's death, whose store was removed
meanwhile, exits instead of leaving a new empty store in its place.
"""

from __future__ import annotations

import json
import sys

from ..errors import StoreNotFound
from .compaction import LevelOptions
from .db import LSM


def main(argv: list[str]) -> int:
    path, raw = argv[0], json.loads(argv[1])
    levels = LevelOptions(**raw.pop("levels"))
    try:  # never create: started as its parent died and the store was removed, it has no work
        db = LSM(path, levels=levels, auto_maintenance=False, background=False, create=False, **raw)
    except StoreNotFound:
        return 0
    try:
        for _ in sys.stdin.buffer:
            try:
                db.maintain()
                reply = "ok"
            except Exception as e:  # reported to the parent, who records it in stats()
                reply = f"error {type(e).__name__}: {e}".replace("\n", " ")
            sys.stdout.write(reply + "\n")
            sys.stdout.flush()
    finally:
        db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
