"""Eviction churn: a store smaller than the key set, so writes keep evicting.

Run::

    python bench/eviction_churn.py
    # the same as:
    shmkv-bench --keys 200000 --value-size 1KiB --capacity 64MiB --mix get=70,put=30 \\
        --dist zipf:0.99 --procs 1,2 --duration 3

200,000 keys of 1 KiB values (~200 MiB) into 64 MiB stores: shmkv's segment, memcached -m 64,
Redis maxmemory 64 MiB (allkeys-lru), diskcache size_limit 64 MiB. 70% get / 30% put, zipfian;
the hits column shows how well each store keeps the hot keys. dict, Manager().dict() and LMDB
cannot bound their memory and are skipped with that reason.

shmkv's puts that were refused with StoreFull are counted, not fatal, in an eviction run: the
report's "counted events" lines give store_full per process count (all runs together). The
promise is 0 (README "Memory pressure"). A smaller store puts more of the hot set at the LRU
tail at once, which is where refusals used to come from (issue 8: 2 processes at 16 MiB failed
with StoreFull before the CLOCK walk was bounded by the list instead of a try budget)::

    python bench/eviction_churn.py --capacity 16MiB --dist zipf:1.2 --backends shmkv
"""

ARGS = ["--keys", "200000", "--value-size", "1KiB", "--capacity", "64MiB", "--mix", "get=70,put=30",
        "--dist", "zipf:0.99", "--procs", "1,2", "--duration", "3"]  # fmt: skip

if __name__ == "__main__":
    from _run import run

    run(ARGS)
