"""sim.py: the simulated network is deterministic by seed, keeps the Transport contract
(timeouts, refusals, overload), applies its faults (drop, delay, partitions both ways and one
way, crashes) and drives pure step functions as well as async handlers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shmkv.cluster import wire
from shmkv.cluster.errors import ProtocolError
from shmkv.cluster.transport import RequestTimeout, TcpTransport, Transport, Unreachable
from shmkv.cluster.wire import Message, Overloaded

from .sim import SimDeadlock, SimNetwork

NODES = ["n1:1", "n2:1", "n3:1"]


@pytest.fixture
def sim() -> Iterator[Callable[..., SimNetwork]]:
    """SimNetwork factory; every network made is closed after the test, failed or not."""
    made: list[SimNetwork] = []

    def make(*args: Any, **kwargs: Any) -> SimNetwork:
        made.append(SimNetwork(*args, **kwargs))
        return made[-1]

    yield make
    for net in made:
        if not net.loop.is_closed():
            net.close()


def counting_handler(applied: dict[bytes, int]):
    async def handler(msg: Message) -> Message:
        if msg.code == wire.GET and msg.fields["key"].startswith(b"slow"):
            await asyncio.sleep(0.05)
        key = msg.fields.get("key", b"")
        applied[key] = applied.get(key, 0) + 1
        return Message(wire.OK, 0, {"value": key})

    return handler


def workload(net: SimNetwork) -> list[object]:
    """Three servers, three clients, 60 concurrent requests with timeouts; returns the outcomes."""
    applied: dict[bytes, int] = {}
    for n in NODES:
        net.run(net.transport(n).serve(n, counting_handler(applied)))
    clients = [net.transport(f"c{i}:0") for i in range(3)]

    async def one(i: int) -> object:
        c = clients[i % 3]
        try:
            r = await c.request(NODES[(i * 7) % 3], Message(wire.GET, 0, {"key": b"k%d" % i}), 0.01)
            return r.fields["value"]
        except (RequestTimeout, Unreachable) as e:
            return type(e).__name__

    async def main() -> list[object]:
        return list(await asyncio.gather(*(one(i) for i in range(60))))

    return net.run(main())


def test_same_seed_gives_the_same_delivery_trace_and_outcomes(
    sim: Callable[..., SimNetwork],
) -> None:
    runs = []
    for _ in range(2):
        net = sim(seed=42, delay=(0.001, 0.008), drop=0.1, duplicate=0.05)
        outcomes = workload(net)
        runs.append((outcomes, list(net.trace), net.now))
    assert runs[0] == runs[1]
    outcomes, trace, _ = runs[0]
    assert "RequestTimeout" in outcomes and any(isinstance(o, bytes) for o in outcomes)
    assert any(e[1] == "drop" for e in trace)


def test_a_seed_replays_in_another_process_with_another_hash_seed(
    sim: Callable[..., SimNetwork],
) -> None:
    code = (
        "import json, sys; sys.path.insert(0, '.');"
        "from tests.cluster.sim import SimNetwork; from tests.cluster.test_sim import workload;"
        "net = SimNetwork(seed=42, delay=(0.001, 0.008), drop=0.1, duplicate=0.05);"
        "workload(net); print(json.dumps(net.trace)); net.close()"
    )
    root = Path(__file__).resolve().parents[2]
    outs = [
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": h},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        for h in ("1", "2")
    ]
    assert outs[0] == outs[1] and len(json.loads(outs[0])) > 100


def test_another_seed_gives_another_order(sim: Callable[..., SimNetwork]) -> None:
    traces = []
    for seed in (1, 2):
        net = sim(seed=seed, delay=(0.001, 0.008))
        workload(net)
        traces.append([e[1:] for e in net.trace if e[1] == "deliver" and e[4] == "GET"])
    assert sorted(traces[0]) == sorted(traces[1])  # same messages...
    assert traces[0] != traces[1]  # ...delivered in another order


@pytest.mark.parametrize("fifo", [False, True])
def test_messages_overtake_each_other_unless_fifo(
    fifo: bool, sim: Callable[..., SimNetwork]
) -> None:
    net = sim(seed=3, delay=(0.001, 0.010), fifo=fifo)
    got: list[int] = []

    class Sink:
        def step(self, now: float, inbox: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
            got.extend(m.rid for _, m in inbox)
            return []

    net.add_machine("sink:1", Sink())
    for i in range(1, 30):
        net.send("src:1", "sink:1", Message(wire.PING, i, {}))
    net.run_for(1.0)
    assert sorted(got) == list(range(1, 30))
    assert (got == sorted(got)) is fifo


def test_virtual_time_passes_without_wall_time(sim: Callable[..., SimNetwork]) -> None:
    net = sim(seed=0)
    net.run(asyncio.sleep(3600))  # an hour of virtual time; the per-test timeout bounds wall time
    assert net.now == pytest.approx(3600)
    assert net.loop.time() == net.now


def test_partitioned_peer_times_out_at_the_virtual_deadline(sim: Callable[..., SimNetwork]) -> None:
    net = sim(seed=5)
    applied: dict[bytes, int] = {}
    net.run(net.transport("b:1").serve("b:1", counting_handler(applied)))
    a = net.transport("a:1")
    net.partition({"a:1"}, {"b:1"})
    start = net.now
    with pytest.raises(RequestTimeout, match="within 2 s"):
        net.run(a.request("b:1", Message(wire.GET, 0, {"key": b"k"}), 2.0))
    assert net.now - start == pytest.approx(2.0)
    assert applied == {}
    net.heal()
    assert (
        net.run(a.request("b:1", Message(wire.GET, 0, {"key": b"k"}), 2.0)).fields["value"] == b"k"
    )


def test_one_way_cut_applies_the_request_and_loses_the_reply(
    sim: Callable[..., SimNetwork],
) -> None:
    net = sim(seed=6)
    applied: dict[bytes, int] = {}
    net.run(net.transport("b:1").serve("b:1", counting_handler(applied)))
    a = net.transport("a:1")
    net.cut({"b:1"}, {"a:1"})  # b -> a lost, a -> b works
    with pytest.raises(RequestTimeout):
        net.run(a.request("b:1", Message(wire.GET, 0, {"key": b"w"}), 1.0))
    assert applied == {b"w": 1}  # "may have been applied": it was
    assert any(e[1] == "cut" and e[2] == "b:1" for e in net.trace)


@pytest.mark.parametrize("drop, expect_ok", [(1.0, False), (0.0, True)])
def test_drop_rate_one_loses_everything_and_zero_nothing(
    drop: float, expect_ok: bool, sim: Callable[..., SimNetwork]
) -> None:
    net = sim(seed=7, drop=drop)
    applied: dict[bytes, int] = {}
    net.run(net.transport("b:1").serve("b:1", counting_handler(applied)))
    a = net.transport("a:1")

    async def main() -> list[bool]:
        async def one(i: int) -> bool:
            try:
                await a.request("b:1", Message(wire.GET, 0, {"key": b"%d" % i}), 0.5)
                return True
            except RequestTimeout:
                return False

        return list(await asyncio.gather(*(one(i) for i in range(20))))

    assert net.run(main()) == [expect_ok] * 20


def test_nobody_serving_is_refused_unsent_and_a_crash_resets_sent_requests(
    sim: Callable[..., SimNetwork],
) -> None:
    net = sim(seed=8)
    applied: dict[bytes, int] = {}
    a = net.transport("a:1")
    with pytest.raises(Unreachable, match="connection refused") as e:
        net.run(a.request("b:1", Message(wire.PING, 0, {}), 1.0))
    assert e.value.sent is False
    net.run(net.transport("b:1").serve("b:1", counting_handler(applied)))
    task = net.spawn(a.request("b:1", Message(wire.GET, 0, {"key": b"slow"}), 1.0))
    net.run_for(0.02)  # delivered, handler sleeping
    net.crash("b:1")
    with pytest.raises(Unreachable, match="connection reset") as e2:
        net.run(task)
    assert e2.value.sent is True
    # restart: a new transport at the same address serves again
    net.run(net.transport("b:1").serve("b:1", counting_handler(applied)))
    assert (
        net.run(a.request("b:1", Message(wire.GET, 0, {"key": b"k"}), 1.0)).fields["value"] == b"k"
    )


def test_overload_bounds_hold_in_the_simulation_too(sim: Callable[..., SimNetwork]) -> None:
    net = sim(seed=9)

    async def never(msg: Message) -> Message:
        await asyncio.Event().wait()
        raise AssertionError

    b = net.transport("b:1", max_pending=2)
    net.run(b.serve("b:1", never))
    a = net.transport("a:1", max_in_flight=3)

    async def main() -> list[str]:
        async def one() -> str:
            try:
                await a.request("b:1", Message(wire.PING, 0, {}), 1.0)
                return "ok"
            except (Overloaded, RequestTimeout) as e:
                return type(e).__name__

        return list(await asyncio.gather(*(one() for _ in range(4))))

    got = net.run(main())
    # 4th refused locally at once; of the 3 sent, 2 handled (then time out), 1 overloaded remotely
    assert sorted(got) == ["Overloaded", "Overloaded", "RequestTimeout", "RequestTimeout"]


def test_unencodable_messages_fail_as_they_would_on_a_socket(
    sim: Callable[..., SimNetwork],
) -> None:
    net = sim(seed=10)
    with pytest.raises(ProtocolError):
        net.send("a:1", "b:1", Message(wire.GET, 1, {"key": "not bytes"}))


def test_deadlock_is_reported_not_hung(sim: Callable[..., SimNetwork]) -> None:
    net = sim(seed=11)
    with pytest.raises(SimDeadlock, match="no runnable task"):
        net.run(net.loop.create_future())


class TokenRing:
    """A pure step function: pass a counter around the ring; tick re-sends if it got lost."""

    def __init__(self, me: str, nxt: str, start: bool) -> None:
        self.me, self.nxt = me, nxt
        self.seen = 0
        self.last_sent = -1.0
        self.start = start

    def step(self, now: float, inbox: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
        out = []
        for _, m in inbox:
            n = m.fields["value"][0] if m.fields.get("value") else 0
            if n > self.seen:
                self.seen = n
                out.append((self.nxt, Message(wire.OK, n + 1, {"value": bytes([(n + 1) % 256])})))
                self.last_sent = now
        if not inbox and self.start and self.seen == 0:
            self.seen = 1
            out.append((self.nxt, Message(wire.OK, 2, {"value": b"\x02"})))
        return out


def run_ring(seed: int) -> tuple[list[int], list[tuple[float, str, str, str, str, int]]]:
    net = SimNetwork(seed=seed, delay=(0.001, 0.003), drop=0.02)
    names = ["r0:1", "r1:1", "r2:1"]
    machines = [TokenRing(n, names[(i + 1) % 3], i == 0) for i, n in enumerate(names)]
    for n, m in zip(names, machines, strict=True):
        net.add_machine(n, m, tick=0.01)
    net.run_for(0.5)
    trace = list(net.trace)
    net.close()
    return [m.seen for m in machines], trace


def test_pure_step_machines_are_driven_deterministically() -> None:
    a, b = run_ring(4), run_ring(4)
    assert a == b
    seen, trace = a
    assert max(seen) > 3  # the token went round
    assert run_ring(5)[1] != trace


async def _scenario(server: Transport, client: Transport, addr: str) -> list[object]:
    """The same code over either transport: the point of the Transport interface."""
    applied: dict[bytes, int] = {}
    bound = await server.serve(addr, counting_handler(applied))
    out: list[object] = []
    out.append(
        (await client.request(bound, Message(wire.GET, 0, {"key": b"x"}), 5)).fields["value"]
    )
    try:
        await client.request(bound, Message(wire.OK, 0, {}), 5)
    except wire.BadRequest as e:
        out.append(str(e))
    try:
        await client.request(bound, Message(wire.GET, 0, {"key": b"slow"}), 0.01)
    except RequestTimeout:
        out.append("timeout")
    out.append(applied[b"x"])
    return out


def test_the_same_scenario_runs_over_tcp_and_over_the_simulation(
    sim: Callable[..., SimNetwork],
) -> None:
    net = sim(seed=12)
    simulated = net.run(_scenario(net.transport("s:1"), net.transport("c:1"), "s:1"))

    async def over_tcp() -> list[object]:
        s, c = TcpTransport(), TcpTransport()
        try:
            return await _scenario(s, c, "127.0.0.1:0")
        finally:
            await c.close()
            await s.close()

    real = asyncio.run(over_tcp())
    assert simulated == real == [b"x", "OK is not a request", "timeout", 1]


def test_skew_shifts_the_clock_a_machine_sees(sim: Callable[..., SimNetwork]) -> None:
    net = sim(seed=13, delay=(0.01, 0.01))
    seen: dict[str, list[float]] = {"a:1": [], "b:1": []}

    class Clock:
        def __init__(self, me: str) -> None:
            self.me = me

        def step(self, now: float, inbox: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
            seen[self.me].append(now)
            return []

    net.skew["b:1"] = 5.0
    for a in seen:
        net.add_machine(a, Clock(a), tick=1.0)
    net.run_for(2.5)
    assert seen["a:1"] == pytest.approx([1.0, 2.0])
    assert seen["b:1"] == pytest.approx([6.0, 7.0])


def test_a_run_with_ticking_machines_is_bounded_by_a_virtual_timeout(
    sim: Callable[..., SimNetwork],
) -> None:
    net = sim(seed=14)

    class Idle:
        def step(self, now: float, inbox: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
            return []

    net.add_machine("m:1", Idle(), tick=0.1)
    with pytest.raises(asyncio.TimeoutError):  # TimeoutError itself from 3.11
        net.run(net.loop.create_future(), timeout=60.0)  # would tick forever
    assert net.now == pytest.approx(60.0)
