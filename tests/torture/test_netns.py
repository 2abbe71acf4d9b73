"""Network faults against real daemons (netns.py): inside a private network namespace
(``unshare -rn``), nftables rules between 127.0.0.x addresses really cut TCP, and a partition
really cuts real ``shmkv serve`` daemons from each other while clients on 127.0.0.1 still reach
them. Skipped, with the reason, where the namespace or nft cannot be had."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shmkv.torture import netns

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WHY = netns.unavailable()
ROOT = Path(__file__).resolve().parents[2]


def _in_netns(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, netns.IN_NETNS_ENV: "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(["unshare", "-rn", sys.executable, "-c", textwrap.dedent(code)],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.skipif(WHY is not None, reason=str(WHY))
def test_rules_cut_tcp_between_loopback_addresses_and_heal() -> None:
    r = _in_netns("""
        import socket
        from shmkv.torture.netns import NetFaults
        net = NetFaults()
        srv = socket.socket(); srv.bind(("127.0.0.3", 0)); srv.listen(); port = srv.getsockname()[1]
        def dial(src):
            c = socket.socket(); c.settimeout(0.5); c.bind((src, 0))
            try:
                c.connect(("127.0.0.3", port)); return "ok"
            except OSError as e:
                return type(e).__name__
            finally:
                c.close()
        print("before", dial("127.0.0.2"))
        net.partition("127.0.0.2", ["127.0.0.3", "127.0.0.4"], "halves")
        print("halves", dial("127.0.0.2"), dial("127.0.0.1"))
        net.heal()
        net.partition("127.0.0.2", ["127.0.0.3", "127.0.0.4"], "one-way-in")
        print("one-way-in", dial("127.0.0.2"))
        net.heal()
        net.partition("127.0.0.4", ["127.0.0.2", "127.0.0.3"], "bridge")
        print("bridge", dial("127.0.0.2"), dial("127.0.0.4"))
        net.heal()
        print("healed", dial("127.0.0.2"))
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] == "before ok"
    assert lines[1] == "halves TimeoutError ok"  # the node is cut, the client (127.0.0.1) is not
    assert lines[2] == "one-way-in TimeoutError"  # the SYN-ACK back is dropped
    assert lines[3] == "bridge TimeoutError ok"  # the others cannot talk; the bridge can
    assert lines[4] == "healed ok"


@pytest.mark.skipif(WHY is not None, reason=str(WHY))
def test_partition_cuts_real_daemons_from_each_other_not_from_clients(tmp_path: Path) -> None:
    r = _in_netns(f"""
        import shmkv
        from shmkv.torture.local import LocalCluster
        c = LocalCluster(3, dir={str(tmp_path / "c")!r}, nemesis=["partition"])
        c.start()
        try:
            cl = shmkv.connect(c.seeds, n=3, w=3, r=1, timeout=0.5)
            cl.put(b"k", b"v1")
            print("addrs", sorted(x["addr"].rpartition(":")[0] for x in c.tools._load(c.dir)["nodes"]))
            c.partition("n1", "halves")
            # every key has n1 among its three replicas: W=3 cannot be met, whoever coordinates
            try:
                cl.put(b"k", b"v2")
                print("partitioned put ok")
            except shmkv.QuorumError as e:
                print("partitioned put", type(e).__name__)
            print("partitioned get", cl.get(b"k", r=1) is not None)  # clients still reach nodes
            c.heal_network()
            for _ in range(40):  # the coordinators' suspicion of each other ends with a probe
                try:
                    cl.put(b"k", b"v3"); print("healed put ok"); break
                except shmkv.QuorumError:
                    import time; time.sleep(0.25)
            cl.close()
        finally:
            c.stop()
    """)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "addrs ['127.0.0.2', '127.0.0.3', '127.0.0.4']" in out
    assert "partitioned put QuorumError" in out or "partitioned put MaybeApplied" in out
    assert "partitioned get True" in out
    assert "healed put ok" in out


def test_network_faults_are_refused_outside_a_namespace_with_the_reason() -> None:
    from shmkv.errors import InvalidArgument
    from shmkv.torture.local import LocalCluster

    if netns.in_netns():
        pytest.skip("running inside the harness' namespace already")
    with pytest.raises(InvalidArgument, match="nemesis partition: .*namespace"):
        LocalCluster(3, nemesis=["partition"])


@pytest.mark.skipif(WHY is not None, reason=str(WHY))
def test_delay_hold_reset_reach_real_daemons_and_a_delay_kill_run_keeps_every_promise(tmp_path: Path) -> None:
    """The nat redirect puts proxy.py between real daemons: a W=3 put (every replica must
    answer) gets slower by the delay of one node's links, stalls while that node is held, and
    completes once released; then a short torture run under delay and kill passes every
    checker and records the delay windows with their parameters."""
    r = _in_netns(f"""
        import json, threading, time
        import shmkv
        from shmkv.torture.local import DELAY_SECONDS, LocalCluster
        from shmkv.torture.runner import RunConfig, run
        c = LocalCluster(3, dir={str(tmp_path / "c")!r}, nemesis=["delay", "hold", "reset"])
        c.start()
        try:
            cl = shmkv.connect([c.seeds[1]], n=3, w=3, r=1, timeout=5.0)
            def put(v):
                t = time.monotonic(); cl.put(b"k", v); return time.monotonic() - t
            for i in range(3):
                put(b"warm%d" % i)
            base = min(put(b"b%d" % i) for i in range(3))
            c.delay("n1")
            slow = min(put(b"d%d" % i) for i in range(3))
            c.heal_proxy("n1")
            c.hold("n1")
            threading.Timer(0.5, c.heal_proxy, args=("n1",)).start()
            held = put(b"h")
            c.reset("n1")
            resets = c.proxy.stats["resets"]
            c.heal_proxy("n1")
            for _ in range(40):  # after the resets the peers reconnect (through the proxy)
                try:
                    after = put(b"r"); break
                except shmkv.Error:
                    time.sleep(0.25)
            print(json.dumps({{"base": base, "slow": slow, "held": held, "resets": resets,
                              "after": after, "accepted": c.proxy.stats["accepted"]}}))
            cl.close()
        finally:
            c.stop()
        c2 = LocalCluster(3, dir={str(tmp_path / "c2")!r}, nemesis=["delay", "kill"])
        res = run(c2, RunConfig(time=6, seed=4, nemesis=["delay", "kill"], op_timeout=1.0, cluster="local"))
        print(json.dumps({{"passed": res.passed, "faults": res.history.faults, "meta": res.history.meta,
                          "accepted": c2.proxy.stats["accepted"], "text": res.text}}))
    """, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    probe, torture = lines
    assert probe["accepted"] > 0  # node-to-node connections went through the proxy
    assert probe["slow"] >= 0.2 > probe["base"], probe  # 0.1 s each way on n1's links
    assert probe["held"] >= 0.4, probe  # nothing reached n1 until the hold ended (0.5 s)
    assert probe["resets"] >= 1, probe
    assert torture["passed"], torture["text"]
    delays = [f for f in torture["faults"] if f["kind"] == "delay"]
    assert delays and {f["kind"] for f in torture["faults"]} == {"delay", "kill"}
    assert all(f["delay_s"] == 0.1 and f["t1"] > f["t0"] for f in delays)
    assert torture["accepted"] > 0 and torture["meta"]["proxy"]["accepted"] == torture["accepted"]
