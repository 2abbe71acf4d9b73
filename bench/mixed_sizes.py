"""Mixed value sizes up to 10 KiB: a general-purpose cache of rendered fragments and objects.

Run::

    python bench/mixed_sizes.py
    # the same as:
    shmkv-bench --keys 20000 --value-size 100:60,1KiB:30,10KiB:10 --mix get=80,put=20 \\
        --dist zipf:0.9 --procs 1,2 --duration 3

20,000 keys, values 60% 100 B, 30% 1 KiB, 10% 10 KiB; 80% get / 20% put, zipfian.
"""

ARGS = ["--keys", "20000", "--value-size", "100:60,1KiB:30,10KiB:10", "--mix", "get=80,put=20",
        "--dist", "zipf:0.9", "--procs", "1,2", "--duration", "3"]  # fmt: skip

if __name__ == "__main__":
    from _run import run

    run(ARGS)
