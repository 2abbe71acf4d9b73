"""Write-heavy counters: rate limits and hit counters, incremented from every worker.

Run::

    python bench/counters.py
    # the same as:
    shmkv-bench --keys 10000 --mix incr=80,get=20 --dist zipf:0.99 --procs 1,2 --duration 3

10,000 counters, 80% incr / 20% get, zipfian. Each backend's atomic increment where it has
one (shmkv ``incr``, Redis INCR, memcached incr, LMDB read-modify-write in a write transaction,
diskcache get+set in ``transact()``); ``Manager().dict()`` does get then set, which is *not*
atomic across processes, as a user of it would write it.
"""

ARGS = ["--keys", "10000", "--mix", "incr=80,get=20", "--dist", "zipf:0.99", "--procs", "1,2",
        "--duration", "3"]  # fmt: skip

if __name__ == "__main__":
    from _run import run

    run(ARGS)
