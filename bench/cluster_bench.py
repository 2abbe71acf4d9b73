"""The federation against Redis, all in one run on 127.0.0.1.

    python bench/cluster_bench.py [--requests 20000] [--clients 50] [--keys 10000]
                                  [--py-ops 20000] [--json bench/results/cluster.json] [--quick]
                                  [--python-only]

In a temp dir the script starts a ``redis-server``, a 3-master Redis Cluster (three
``redis-server --cluster-enabled yes`` joined by ``redis-cli --cluster create ... --cluster-yes``),
a 1-node shmkv (N=W=R=1) and a 3-node shmkv (N=3, W=2, R=2), both with ``--resp`` (through
tools/cluster.py), each node one process (``--workers 1``, tools/cluster.py's default, as
redis-server is one thread), and the same 1-node at ``shmkv serve``'s default ``--workers``
(one process per core: "shmkv-1 workers"); every process is recorded and stopped by PID at the end, whatever happens.

Then, per target, ``redis-benchmark -t set,get -c CLIENTS -n REQUESTS -r KEYS --csv`` without and
with ``-P 16`` (``--cluster`` for the Redis Cluster), and the Python clients on the same op from
one thread: ``shmkv.connect`` (1-node and 3-node) against redis-py (``redis.Redis`` to the
redis-server, ``RedisCluster`` to the cluster), and the zero-hop local read
(``shmkv.connect(seeds, r=1, local=True).get`` on the 1-node shmkv: the node's shared memory)
against redis-py's GET; the clients take turns, 500 calls each, so a load change on a shared
machine falls on all of them alike. Of each turn, half the calls are timed one by one (p50/p99)
and half as a whole (ops/s and the client's CPU per call), as bench/cluster_local.py does.
Then the 1-node pair (redis-py and ``shmkv.connect``, and the raw sockets) once more with the
placement fixed (``placed_ops``): redis-server and the 1-node daemon pinned to CPU 0, the client
on CPU 0 ("same") and then on CPU 1 ("cross"), since on these VMs a call across CPUs costs
~65-75 us more than one within a CPU, whoever the server is, and the scheduler's placement
otherwise decides the ratio. Reports ops/s, p50/p99 and the same-run ratios the targets are
about:

    1-node shmkv GET and SET >= 0.3 x redis-server        (redis-benchmark, 50 clients)
    3-node shmkv W=2 SET p99 < 5 ms at 50 clients          (redis-benchmark, no pipeline)
    shmkv.connect >= 0.5 x redis-py on the same op
    zero-hop local get >= 50 x redis-py GET

``--python-only`` skips redis-benchmark (the Python clients' rows and ratios only).

``--no-python`` leaves the Python clients out (the daemon-side figures only: a shorter run while
working on the daemon). ``--quick`` is a smoke run (tiny sizes) for tests/bench/test_cluster_bench.py. Latencies from
redis-benchmark are its own (per request, pipelined requests counted from the batch's send).
Results in bench/RESULTS.md ("Cluster"). Needs redis-server, redis-cli and redis-benchmark
(Debian: apt-get install redis-server).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _run import cluster_tool

from shmkv.bench.stats import percentile

tc = cluster_tool()  # tools/cluster.py


# -- Redis peers ---------------------------------------------------------------------------------


class RedisPeers:
    """A redis-server and a 3-master Redis Cluster in ``d``; :meth:`stop` kills them by PID."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.procs: list[subprocess.Popen[bytes]] = []
        self.single = tc.free_ports(1)[0]
        self.cluster = _cluster_ports(3)

    def _server(self, port: int, *extra: str) -> None:
        wd = self.d / f"redis-{port}"
        wd.mkdir()
        log = open(wd / "log", "wb")
        try:
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(wd), *extra],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            ))
        finally:
            log.close()

    def start(self) -> None:
        self._server(self.single)
        for p in self.cluster:
            self._server(p, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf")
        for p, proc in zip([self.single, *self.cluster], self.procs, strict=True):
            try:
                _wait(lambda p=p: _cli(p, "PING") == "PONG", f"redis-server on {p}")
            except RuntimeError as e:
                log = (self.d / f"redis-{p}" / "log").read_text(errors="replace")[-600:]
                raise RuntimeError(f"{e} (exit status {proc.poll()}): {log}") from None
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.cluster),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )
        for p in self.cluster:
            _wait(lambda p=p: "cluster_state:ok" in _cli(p, "CLUSTER", "INFO"), f"cluster on {p}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _cluster_ports(count: int) -> list[int]:
    """Ports for Redis Cluster nodes: each node also binds its bus on port + 10000, so the port
    must be <= 55535 and both must be free (checked by binding them, as tc.free_ports does)."""
    import random
    import socket

    out: list[int] = []
    rng = random.Random()
    for _ in range(1000):
        p = rng.randrange(20000, 45000)
        if p in out:
            continue
        try:
            for port in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        out.append(p)
        if len(out) == count:
            return out
    raise RuntimeError("no free port pairs for the Redis Cluster")


def _cli(port: int, *args: str) -> str:
    try:
        p = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return ""
    return p.stdout.strip()


def _wait(ok: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:g} s")
        time.sleep(0.1)


# -- measurements --------------------------------------------------------------------------------


def redis_benchmark(port: int, requests: int, clients: int, keys: int, pipeline: int,
                    cluster: bool = False) -> dict[str, dict[str, float]]:
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get", "-n", str(requests),
           "-c", str(clients), "-r", str(keys), "-P", str(pipeline), "--csv"]
    if cluster:
        cmd.append("--cluster")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr[-500:]}")
    out: dict[str, dict[str, float]] = {}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('"')]
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        out[row["test"]] = {"ops_per_s": float(row["rps"]), "p50_ms": float(row["p50_latency_ms"]),
                            "p99_ms": float(row["p99_latency_ms"])}
    errors = [ln for ln in (p.stdout + p.stderr).splitlines() if "rror" in ln]
    if errors:
        raise RuntimeError(f"redis-benchmark reported errors: {errors[:3]}")
    return out


#: Calls a Python client makes before the next client takes its turn (python_ops).
CHUNK = 500


class RawSocket:
    """The floor under a Python client: one blocking socket, every request encoded before the
    clock starts, one ``sendall`` and the reply read into a reused buffer -- no client library
    at all. Against redis-server (RESP) and a shmkv node (wire.py frames), it shows how much of
    a client's time is the client and how much is the server and the kernel."""

    def __init__(self, port: int, keys: int, value: bytes, shmkv_epoch: int | None = None) -> None:
        import socket

        from shmkv.cluster import wire

        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(1 << 16)
        names = [b"key:%06d" % i for i in range(keys)]
        if shmkv_epoch is None:  # RESP
            self.gets = {k: b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k) for k in names}
            self.puts = {k: b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(value), value)
                         for k in names}
        else:
            f = {"epoch": shmkv_epoch, "timeout_ms": 2000}
            self.gets = {k: wire.encode_parts(wire.GET_VERSIONS, 1, {"key": k, "r": 1, **f}) for k in names}
            self.puts = {k: wire.encode_parts(wire.PUT, 1, {"key": k, "value": value, "w": 1, **f}) for k in names}
        self.framed = shmkv_epoch is not None

    def _call(self, frame: bytes) -> None:
        self.sock.sendall(frame)
        n = self.sock.recv_into(self.buf)
        # a shmkv reply is length-prefixed: read it whole (a RESP reply this small is one read)
        while self.framed and (n < 4 or n < 4 + int.from_bytes(self.buf[:4], "big")):
            n += self.sock.recv_into(memoryview(self.buf)[n:])

    def get(self, k: bytes) -> None:
        self._call(self.gets[k])

    def put(self, k: bytes, _value: bytes) -> None:
        self._call(self.puts[k])

    def close(self) -> None:
        self.sock.close()


def python_ops(clients: dict[str, tuple[Any, Any]], ops: int, keys: int) -> dict[str, dict[str, dict[str, float]]]:
    """One thread: per client ``ops`` puts, then ``ops`` gets of the same keys. The clients take
    turns, CHUNK calls each, so a load change on a shared machine falls on every client alike (one
    client's whole run after another's would compare two different machines). Of each chunk the
    first half is timed call by call (p50/p99), the second half as a whole (ops/s, CPU/call)."""
    names = [b"key:%06d" % (i % keys) for i in range(ops)]
    value = b"x" * 3  # redis-benchmark's default value size
    out: dict[str, dict[str, dict[str, float]]] = {name: {} for name in clients}
    for op in ("SET", "GET"):
        lat: dict[str, list[float]] = {name: [] for name in clients}
        wall = dict.fromkeys(clients, 0.0)
        cpu = dict.fromkeys(clients, 0.0)  # this process's CPU time: the client's own work
        done = dict.fromkeys(clients, 0)  # untimed calls made
        for start in range(0, ops, CHUNK):
            chunk = names[start : start + CHUNK]
            for name, (get, put) in clients.items():
                fn = get if op == "GET" else (lambda k, put=put: put(k, value))
                times = lat[name]
                half = len(chunk) // 2
                for k in chunk[:half]:  # every call timed: the latencies
                    t0 = time.perf_counter()
                    fn(k)
                    times.append(time.perf_counter() - t0)
                # untimed calls: ops/s and CPU (a clock read costs ~0.3 us on a VM, a quarter of
                # a zero-hop read)
                c_start, t_start = time.process_time(), time.perf_counter()
                for k in chunk[half:]:
                    fn(k)
                wall[name] += time.perf_counter() - t_start
                cpu[name] += time.process_time() - c_start
                done[name] += len(chunk) - half
        for name in clients:
            times = sorted(lat[name])
            out[name][op] = {"ops_per_s": done[name] / wall[name], "p50_ms": percentile(times, 50) * 1e3,
                             "p99_ms": percentile(times, 99) * 1e3, "cpu_us": cpu[name] / done[name] * 1e6}
    return out


def placed_ops(clients: dict[str, tuple[Any, Any]], servers: list[int], ops: int,
               keys: int) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """python_ops with every server process in ``servers`` pinned to CPU 0 and this client
    first on CPU 0 too ("same"), then on CPU 1 ("cross"); every affinity is restored after.

    Why: on these VMs a sequential call costs ~65-75 us more when the client and its server
    run on different CPUs (a wake-up across CPUs) than on one, for redis-server as for a
    shmkv daemon, and the scheduler places them as it likes -- a run where redis-server shared
    the client's CPU and the daemon did not compared 7 us with 90 us round trips. Pinned, each
    pair is measured in the same two placements. Empty on a machine of one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {}
    me = os.getpid()
    saved = {pid: os.sched_getaffinity(pid) for pid in [me, *servers]}
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    try:
        for pid in servers:
            os.sched_setaffinity(pid, {cpus[0]})
        for placement, cpu in (("same", cpus[0]), ("cross", cpus[1])):
            os.sched_setaffinity(me, {cpu})
            out[placement] = python_ops(clients, ops, keys)
            print(f"  placed {placement}: {out[placement]}", file=sys.stderr, flush=True)
    finally:
        for pid, mask in saved.items():
            try:
                os.sched_setaffinity(pid, mask)
            except ProcessLookupError:
                pass
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    import shmkv

    d = Path(tempfile.mkdtemp(prefix="shmkv-cluster-bench-"))
    peers = RedisPeers(d)
    report: dict[str, Any] = {"args": vars(a), "load_before": os.getloadavg(), "redis_benchmark": {},
                              "python": {}}
    dirs = [d / "shmkv1", d / "shmkv3", d / "shmkv1w"]
    try:
        peers.start()
        s1 = tc.start(1, dirs[0], n=1, w=1, r=1, size=a.size, resp=True)
        s3 = tc.start(3, dirs[1], n=3, w=2, r=2, size=a.size, resp=True)
        # the same 1-node at `shmkv serve`'s default --workers (one process per core)
        s1w = None if a.python_only else tc.start(1, dirs[2], n=1, w=1, r=1, size=a.size, resp=True,
                                                   workers=os.cpu_count() or 1)
        targets = [
            ("redis-server", peers.single, False),
            ("redis-cluster-3", peers.cluster[0], True),
            ("shmkv-1", int(s1["nodes"][0]["resp"].rsplit(":", 1)[1]), False),
            ("shmkv-3", int(s3["nodes"][0]["resp"].rsplit(":", 1)[1]), False),
        ]
        if s1w is not None:
            targets.append(("shmkv-1 workers", int(s1w["nodes"][0]["resp"].rsplit(":", 1)[1]), False))
        report["workers"] = os.cpu_count() or 1
        for pipeline in () if a.python_only else (1, 16):
            for name, port, cluster in targets:
                key = f"{name} P={pipeline}"
                report["redis_benchmark"][key] = redis_benchmark(
                    port, a.requests, a.clients, a.keys, pipeline, cluster)
                print(f"  {key}: {report['redis_benchmark'][key]}", file=sys.stderr, flush=True)
        r = redis.Redis(port=peers.single, protocol=2)
        rc = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in peers.cluster])
        c1 = shmkv.connect(s1["seeds"], n=1, w=1, r=1, timeout=2.0)
        c3 = shmkv.connect(s3["seeds"], n=3, w=2, r=2, timeout=2.0)
        cl = shmkv.connect(s1["seeds"], n=1, w=1, r=1, timeout=2.0, local=True)
        assert c1.ring is not None
        raw_r = RawSocket(peers.single, a.keys, b"x" * 3)
        raw_s = RawSocket(int(s1["seeds"][0].rsplit(":", 1)[1]), a.keys, b"x" * 3, c1.ring.epoch)
        try:
            report["python"] = python_ops({
                "redis-py -> redis-server": (r.get, r.set),
                "redis-py -> redis-cluster-3": (rc.get, rc.set),
                "shmkv.connect -> shmkv-1": (c1.get, c1.put),
                "shmkv.connect -> shmkv-3": (c3.get, c3.put),
                # its SET goes over the network; its GET is the zero-hop read
                "shmkv.connect(local=True) -> 1": (cl.get, cl.put),
                # the floors: no client library (RawSocket)
                "raw socket -> redis-server": (raw_r.get, raw_r.put),
                "raw socket -> shmkv-1": (raw_s.get, raw_s.put),
            }, a.py_ops, a.keys)
            for name, ops in report["python"].items():
                print(f"  {name}: {ops}", file=sys.stderr, flush=True)
            # The 1-node pair again with the placement fixed (placed_ops): redis-server and
            # the shmkv daemon on one CPU, this client on it or on another.
            report["python_placed"] = placed_ops(
                {"redis-py -> redis-server": (r.get, r.set), "shmkv.connect -> shmkv-1": (c1.get, c1.put),
                 "raw socket -> redis-server": (raw_r.get, raw_r.put),
                 "raw socket -> shmkv-1": (raw_s.get, raw_s.put)},
                [peers.procs[0].pid, int(s1["nodes"][0]["pid"])], a.py_ops, a.keys)
        finally:
            c1.close(), c3.close(), cl.close(), r.close(), rc.close(), raw_r.close(), raw_s.close()
    finally:
        for dd in dirs:
            tc.stop(dd, grace=10)
        peers.stop()
        shutil.rmtree(d, ignore_errors=True)
    report["load_after"] = os.getloadavg()
    return report


def render(rep: dict[str, Any]) -> str:
    rb, py = rep["redis_benchmark"], rep["python"]
    lines = [f"redis-benchmark: -c {rep['args']['clients']} -r {rep['args']['keys']}, "
             f"-n {rep['args']['requests']}; load {rep['load_before'][0]:.2f} at start", "",
             "target              P   op        ops/s   p50 ms   p99 ms",
             "-" * 58]
    for key, ops in rb.items():
        name, p = key.split(" P=")
        for op, m in ops.items():
            lines.append(f"{name:<18} {p:>2}   {op:<4} {m['ops_per_s']:>12,.0f} {m['p50_ms']:>8.3f} {m['p99_ms']:>8.3f}")
    lines += ["", "python client (1 thread)           op        ops/s   p50 ms   p99 ms   us/op  cpu us/op",
              "-" * 87]
    for name, ops in py.items():
        for op, m in ops.items():
            lines.append(f"{name:<32} {op:<4} {m['ops_per_s']:>12,.0f} {m['p50_ms']:>8.3f} {m['p99_ms']:>8.3f}"
                         f" {1e6 / m['ops_per_s']:>7.1f} {m.get('cpu_us', 0.0):>10.1f}")
    lines.append("(us/op: wall time per call; cpu us/op: this process's CPU per call, the client's own work)")
    lines += ["", "ratios (same run)"]

    def ratio(a_: dict[str, float], b_: dict[str, float]) -> float:
        return a_["ops_per_s"] / b_["ops_per_s"]

    checks = []
    for p in ("1", "16") if rb else ():
        for op in ("SET", "GET"):
            x = ratio(rb[f"shmkv-1 P={p}"][op], rb[f"redis-server P={p}"][op])
            y = ratio(rb[f"shmkv-3 P={p}"][op], rb[f"redis-cluster-3 P={p}"][op])
            lines.append(f"  P={p:<2} {op}: shmkv-1 / redis-server {x:.3f}x   shmkv-3 / redis-cluster-3 {y:.3f}x")
            if p == "1":
                checks.append((f"1-node {op} >= 0.3 x redis-server (P=1)", x >= 0.3, f"{x:.3f}x"))
            wk = f"shmkv-1 workers P={p}"
            if wk in rb:  # the 1-node at the default --workers (one per core)
                xw = ratio(rb[wk][op], rb[f"redis-server P={p}"][op])
                lines.append(f"  P={p:<2} {op}: shmkv-1 --workers {rep.get('workers')} / redis-server {xw:.3f}x")
                if p == "1":
                    checks.append((f"1-node --workers {rep.get('workers')} {op} >= 0.3 x redis-server (P=1)",
                                   xw >= 0.3, f"{xw:.3f}x"))
    if rb:
        p99 = rb["shmkv-3 P=1"]["SET"]["p99_ms"]
        checks.append(("3-node W=2 SET p99 < 5 ms at 50 clients (P=1)", p99 < 5.0, f"{p99:.2f} ms"))
    for op in ("SET", "GET"):
        x = ratio(py["shmkv.connect -> shmkv-1"][op], py["redis-py -> redis-server"][op])
        y = ratio(py["shmkv.connect -> shmkv-3"][op], py["redis-py -> redis-cluster-3"][op])
        lines.append(f"  python {op}: shmkv-1 / redis-server {x:.3f}x   shmkv-3 / redis-cluster-3 {y:.3f}x")
        checks.append((f"shmkv.connect {op} >= 0.5 x redis-py (1-node vs redis-server), placed by the scheduler",
                       x >= 0.5, f"{x:.3f}x"))
    placed = rep.get("python_placed") or {}
    if placed:
        lines += ["", "python client, placement fixed (redis-server and the 1-node daemon on CPU 0; the client",
                  "on CPU 0: same, on CPU 1: cross)      op     us/op   p50 ms   p99 ms  cpu us/op"]
        for placement, table in placed.items():
            for name, ops in table.items():
                for op, m in ops.items():
                    lines.append(f"  {placement:<5} {name:<28} {op:<4} {1e6 / m['ops_per_s']:>7.1f} "
                                 f"{m['p50_ms']:>8.3f} {m['p99_ms']:>8.3f} {m['cpu_us']:>10.1f}")
        for op in ("SET", "GET"):
            xs = {pl: ratio(t["shmkv.connect -> shmkv-1"][op], t["redis-py -> redis-server"][op])
                  for pl, t in placed.items()}
            lines.append(f"  python {op}, placed: " + "   ".join(f"{pl} {x:.3f}x" for pl, x in xs.items()))
            checks.append((f"shmkv.connect {op} >= 0.5 x redis-py, placement fixed (same / cross)",
                           all(x >= 0.5 for x in xs.values()), " / ".join(f"{x:.3f}x" for x in xs.values())))
    z = ratio(py["shmkv.connect(local=True) -> 1"]["GET"], py["redis-py -> redis-server"]["GET"])
    lines.append(f"  python GET: zero-hop local / redis-py -> redis-server {z:.1f}x")
    checks.append(("zero-hop local get >= 50 x redis-py GET", z >= 50, f"{z:.1f}x"))
    lines += ["", "targets"]
    for what, ok, val in checks:
        lines.append(f"  {'met ' if ok else 'MISS'}  {what}: {val}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--py-ops", type=int, default=20_000)
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--python-only", action="store_true", help="skip redis-benchmark")
    a = ap.parse_args(argv)
    if a.quick:
        a.requests, a.clients, a.keys, a.py_ops, a.size = 400, 5, 100, 50, "32MiB"
    for tool in ("redis-server", "redis-cli", "redis-benchmark"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found (apt-get install redis-server)", file=sys.stderr)
            return 2
    rep = run(a)
    text = render(rep)
    rep["text"] = text
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
