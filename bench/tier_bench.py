"""Benchmark of the tiered store (memory over the LSM, ``attach(..., path=)``) beside a
memory-only store and LevelDB (plyvel).

Exact command (from the repository root, with shmkv installed: ``pip install -e '.[bench]'``;
~2 min on a 2-core VM; ~4.6 min with ``--spill-gb 1``)::

    python bench/tier_bench.py                                 # default: 0.25 GB spill
    python bench/tier_bench.py --spill-gb 1 --json tier.json   # the run reported below
    python bench/tier_bench.py --only puts,fsync_procs         # phases 2 and 2b (~40 s)

What is measured and how: shmkv/bench/tier.py (the engine); this script only runs it.

Last results (``--spill-gb 1``; 2 vCPU VM; ext4 on virtio; Python 3.11.7, plyvel 1.5.1 /
LevelDB 1.22; ratio = shmkv tiered / the other, median of per-round ratios; treat +-20%: two
other runs this session gave 0.62-0.65x for the non-fsync puts, 0.67-0.87x for on-disk gets,
0.64-0.68x for absent keys)::

    #  op                                        tiered ops/s  p50 us  p99 us | vs            ops/s  p50 us  p99 us  ratio
    1  get, resident in memory (100k keys)          2,461,684    0.41    0.80 | memory-only 2,391,175   0.42    0.83  1.03x
    2  put fsync                                        3,905  250.60  474.52 | ldb sync        4,001  239.50  453.96  0.96x
    2  put interval                                   134,892    6.69   18.55 | ldb nosync    225,913    4.06   11.56  0.62x
    2  put none                                       153,902    5.21   17.83 | ldb nosync    269,950    3.51   11.27  0.61x
    3  get, on disk only (200k keys, 8 MiB memory)    108,691    9.61   20.83 | ldb           128,389    9.89   17.25  0.84x
    3  get, absent key                                488,856    2.02    5.48 | ldb           694,595    0.85   11.00  0.69x
    4  scan keys/s (1000-key ranges; us = 1 range)  2,719,379     381     693 | ldb iter    2,151,428     489     903  1.28x

    5  spill 1M x 1 KiB (1.04 GB), random order, durability none / sync=False, 64 MiB memory:
       engine   puts/s p50  min  p50 us  p99 us  load s  settle s  elapsed s  WA own  WA wchar  disk GB  files/level
       tiered      126,055 1,148    6.1    19.2    44.1       2.5       50.3    5.33      5.34     0.55  [2,5,58,216]
       leveldb     188,870   871    4.5 1,117.7    43.2       7.5       55.1     n/a      5.28     0.58  [0,7,55,227]

Reading: a memory hit costs the same with or without the disk tier (same C path). fsync puts
are bound by the disk for both engines. The disk tier's hot paths are C (ext/_lsm.pyx): a put
under an unchanged view is one write(2) under a robust mutex in a shared page; a get is one C
call through memtables, bloom filters, block index and block. Flushes and compactions run in a
helper child process, on the other core (as LevelDB's background thread does), so the 1 GB
load takes LevelDB's time (44 s against 43 s). What is left of the gap on single ops is the
Python between those C calls. Write amplification at 1 GB: 5.34 against LevelDB's 5.28
(both by wchar, which counts the helper's writes once it has exited and been reaped).
"""

from shmkv.bench.tier import main

if __name__ == "__main__":
    main()
