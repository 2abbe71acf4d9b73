"""Core speed report: shmkv get/put ops/s beside a dict and LMDB, batches, bytes per item.

Run (from the repository root, extension built or package installed)::

    python bench/core_ops.py                      # ~2 minutes on 2 cores
    python bench/core_ops.py --repeat 3 --json core.json

100,000 keys of 16 B, values of 100 B and 1 KiB, uniform keys, a plain Python loop:
get and put ops/s for shmkv at 1 and 2 processes beside a dict (1 process) and LMDB
(writemap=True, sync=False, metasync=False) at 1 and 2 processes, in the same run;
get_many/put_many of 100 keys against the loop; bytes of segment per item at the first eviction
of a 64 MiB store, beside LMDB (used pages / items), memcached and Redis (capacity / items).
Prints Markdown. See shmkv/bench/core_report.py for the method.
"""

from shmkv.bench.core_report import main

if __name__ == "__main__":
    main()
