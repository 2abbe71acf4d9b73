"""shmkv-bench: measure shmkv against the stores a Python user would pick instead.

One module per job:

- ``workload``  -- what to run: the spec (keys, sizes, mix, distribution) and the op streams.
- ``adapters/`` -- one small class per backend (shmkv, dict, Manager dict, LMDB, diskcache,
  Redis, memcached), all with the same get/put/delete/get_many/put_many/delete_many/incr.
- ``servers``   -- start and always stop a private redis-server / memcached on 127.0.0.1.
- ``runner``    -- fill, then N spawned worker processes behind a start barrier, timed.
- ``stats``     -- percentiles of sampled latencies (nearest rank; never averages).
- ``report``    -- the table, the ratios to shmkv, ``--json`` and ``--plot``.
- ``memory``    -- bytes of store per item at a fill (shmkv, LMDB, memcached, Redis).
- ``core_report`` -- the fixed core speed report (``bench/core_ops.py``).
- ``tier``      -- the tiered store beside a memory-only store and LevelDB (``bench/tier_bench.py``).
- ``lsm``       -- the LSM engine alone beside LevelDB/RocksDB (``bench/lsm_bench.py``).
- ``cli``       -- the ``shmkv-bench`` command.

Nothing here imports the compiled extension or a peer library at import time: a peer that is
missing is skipped with a one-line reason.
"""

from __future__ import annotations
