"""Read-heavy session cache: web workers look up sessions far more often than they write them.

Run::

    python bench/session_cache.py
    # the same as:
    shmkv-bench --keys 100000 --key-size 32 --value-size 200-2KiB --mix get=95,put=5 \\
        --dist zipf:0.99 --procs 1,2 --duration 3

100,000 sessions with 32 B ids and 200 B - 2 KiB payloads, 95% get / 5% put, zipfian (a few
sessions are hot), every key filled first. Extra arguments override (e.g. ``--repeat 3``).
"""

ARGS = ["--keys", "100000", "--key-size", "32", "--value-size", "200-2KiB", "--mix", "get=95,put=5",
        "--dist", "zipf:0.99", "--procs", "1,2", "--duration", "3"]  # fmt: skip

if __name__ == "__main__":
    from _run import run

    run(ARGS)
