"""gossip.py's loop as specs, over the simulated network with a seeded clock (failsim.py).

Defaults throughout: gossip every 1 s, fanout 3, phi threshold 8. Each scenario is a function of
its seed: the same seed gives the same trace and the same verdicts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

import shmkv
from shmkv.cluster import wire
from shmkv.cluster.gossip import Gossip, LocalBoard, StoreBoard, plausible
from shmkv.cluster.wire import BadRequest, Message

from .failsim import WALL0, FailCluster


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[FailCluster] = []

    def mk(*a: Any, **kw: Any) -> FailCluster:
        made.append(FailCluster(*a, **kw))
        return made[-1]

    yield mk
    for c in made:
        c.close()


def kill_and_return(c: FailCluster, victim: str) -> list[Any]:
    """The scenario: warm up 10 s, SIGKILL ``victim``, wait for every other node to hold it
    down, restart it, wait for everyone to hold it up. Returns what was observed."""
    c.net.run_for(10.0)
    assert c.down_views() == {n: set() for n in c.names}
    c.crash(victim)
    took = c.until(lambda: all(victim in d for d in c.down_views().values()), limit=10.0)
    c.start(victim)
    back = c.until(lambda: not any(victim in d for d in c.down_views().values()), limit=10.0)
    return [took, back, dict(c.down_views())]


def test_a_killed_node_is_down_everywhere_within_5_s_and_up_when_it_returns(make: Any) -> None:
    c = make(seed=3, nodes=5)
    took, back, after = kill_and_return(c, "n3")
    assert took is not None and took <= 5.0, took
    assert back is not None and back <= 3.0, back  # its first gossip round reaches everyone
    assert after == {n: set() for n in c.names}


def test_the_same_seed_gives_the_same_run(make: Any) -> None:
    runs = []
    for _ in range(2):
        c = make(seed=11, nodes=4, drop=0.02)
        obs = kill_and_return(c, "n2")
        runs.append((obs, list(c.net.trace)))
    assert runs[0] == runs[1]
    other = make(seed=12, nodes=4, drop=0.02)
    assert kill_and_return(other, "n2") is not None
    assert list(other.net.trace) != runs[0][1]


def test_a_paused_node_is_down_then_up_and_convicts_nobody_when_it_wakes(make: Any) -> None:
    c = make(seed=5, nodes=4)
    c.net.run_for(10.0)
    c.pause("n4")
    took = c.until(lambda: all("n4" in d for d in c.down_views().values()), limit=10.0)
    assert took is not None and took <= 5.0
    c.net.run_for(10.0 - took)  # paused well beyond the threshold
    c.resume("n4")
    woken = c.nodes["n4"].gossip
    seen_down: set[str] = set()
    t0 = c.net.now
    while c.net.now - t0 < 10.0:  # from the very instant it wakes, every 50 ms
        seen_down |= {p for p in c.names if p != "n4" and woken.is_down(p)}
        c.net.run_for(0.05)
    assert seen_down == set()
    assert woken.pauses == 1  # it noticed its own stall
    assert all("n4" not in d for d in c.down_views().values())


def test_one_percent_message_loss_causes_no_flapping(make: Any) -> None:
    c = make(seed=7, nodes=4, drop=0.01)
    flaps = []
    t0 = c.net.now
    while c.net.now - t0 < 120.0:
        c.net.run_for(0.5)
        flaps += [(round(c.net.now, 1), n, d) for n, d in c.down_views().items() if d]
    assert flaps == []


def test_coordinators_skip_a_down_node_without_waiting_for_its_timeout(make: Any) -> None:
    c = make(seed=9, nodes=3)
    c.net.run_for(5.0)
    c.pause("n3")  # a paused node makes every request to it wait for the full timeout
    assert c.until(lambda: c.nodes["n1"].gossip.is_down("n3"), limit=6.0) is not None
    key = next(k for k in (b"k%d" % i for i in range(100)) if c.ring.preference_list(k, 3)[0] == "n1")
    t0 = c.net.now
    with pytest.raises(shmkv.QuorumError, match="not applied: only 2 of N=3 replicas are up"):
        c.request("n1", wire.PUT, key=key, value=b"v", w=3)
    assert c.net.now - t0 < 0.1  # refused at once: no 0.5 s replica timeout was waited for
    c.request("n1", wire.PUT, key=key, value=b"v", w=2)
    assert c.net.now - t0 < 0.2


# -- bad input ------------------------------------------------------------------------------


def gossip_req(c: FailCluster, to: str, sender: Any, view: Any) -> Message:
    return c.net.run(c.client.request(c.addr[to], Message(wire.GOSSIP, 0, {"from": sender, "view": view}), 1.0))


def test_forged_and_malformed_gossip_is_refused_logged_and_changes_nothing(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    c = make(seed=13, nodes=3)
    c.net.run_for(5.0)
    g = c.nodes["n1"].gossip
    before = dict(g.gossiper.view)
    now_ms = WALL0 + int(c.net.now * 1000)
    with caplog.at_level(logging.WARNING, logger="shmkv.cluster.gossip"):
        with pytest.raises(BadRequest, match="not a member"):
            gossip_req(c, "n1", "mallory", [["n2", 1, 1]])
        with pytest.raises(BadRequest, match="own name"):
            gossip_req(c, "n1", "n1", [["n2", 1, 1]])
        gossip_req(c, "n1", "n2", "not a list")
        gossip_req(c, "n1", "n3", [["n2", 2**40, 5], ["n2", now_ms, 2**50], ["zed", 1, 1],
                                   ["n1", now_ms + 1000, 10**6 // 10], [1, 2], ["n3", -1, 0]])
    text = caplog.text
    assert "not a member of the ring" in text and "own name" in text
    assert "generation" in text and "impossible" in text
    assert g.rejected >= 8
    after = g.gossiper.view
    for peer in ("n2", "n3"):  # neither frozen by a forged huge entry nor moved by junk
        assert after[peer][0] == before[peer][0] and after[peer][1] < 100
    assert after["n1"] == g.gossiper.view["n1"] and after["n1"][1] < 100
    c.net.run_for(10.0)  # and the real heartbeats still advance: nobody looks down
    assert c.down_views() == {n: set() for n in c.names}


def test_plausibility_bounds() -> None:
    now = WALL0
    keep, why = plausible([["a", now - 10_000, 5], ["b", now + 10**9, 0], ["c", now - 1000, 10**9], "junk"], now)
    assert keep == [["a", now - 10_000, 5], "junk"] and len(why) == 2


# -- workers: one owner, the others through the board ---------------------------------------


def test_a_non_owner_worker_shares_the_view_and_verdicts_through_the_board(make: Any) -> None:
    """Worker 1 of n1 answers a peer's GOSSIP: the entries reach the owner's detector through the
    shared store, and worker 1 skips whatever the owner holds down; a stale verdict is ignored."""
    c = make(seed=17, nodes=3)
    board_store = shmkv.attach(f"failsim.board.{id(c)}", size="4MiB")
    try:
        board = StoreBoard(board_store)
        owner = c.nodes["n1"].gossip
        owner.board = board  # as if n1 were started with --workers: its owner writes the board
        c.net.run_for(3.0)
        other = Gossip("n1", c.addr, c.client, board=board, owner=False, clock=c.net.loop.time,
                       wall_ms=lambda: WALL0 + int(c.net.loop.time() * 1000))
        assert other.peers().keys() == {"n2", "n3"} and not other.is_down("n3")
        gen, count = owner.gossiper.view["n3"]
        reply = c.net.run(other.handle(Message(wire.GOSSIP, 0, {"from": "n3", "view": [["n3", gen, count + 50]]})))
        assert any(e[0] == "n1" for e in reply.fields["view"])  # the board carries the owner's own entry
        c.net.run_for(0.3)
        assert owner.gossiper.view["n3"] == (gen, count + 50)  # learnt through the board
        c.pause("n3")
        assert c.until(lambda: other.is_down("n3"), limit=6.0) is not None
        c.net.run(owner.stop())  # the owner stalls: its last verdict gets stale, and is ignored
        c.net.run_for(4.0)
        assert not other.is_down("n3") and other.peers() == {}
    finally:
        board_store.close()
        shmkv.unlink(board_store.name)


def test_local_board_merges_by_maximum() -> None:
    b = LocalBoard()
    b.merge_view({"a": (1, 5), "b": (2, 1)})
    assert b.merge_view({"a": (1, 3), "b": (3, 0)}) == {"a": (1, 5), "b": (3, 0)}


def test_gossip_refuses_an_interval_below_the_minimum() -> None:
    with pytest.raises(ValueError, match="interval"):
        Gossip("a", {"a": "a:1"}, None, interval=0.001, owner=False)  # type: ignore[arg-type]


def test_a_quick_restart_is_no_sample_and_the_next_failure_is_detected_as_fast(make: Any) -> None:
    """Killed, restarted at once, killed again: the restart's gap (a new generation, shorter than
    the detector's max sample) must not inflate the peers' statistics for that node."""
    c = make(seed=21, nodes=3)
    c.net.run_for(20.0)
    times = []
    for _ in range(3):
        c.crash("n3")
        took = c.until(lambda: all("n3" in d for d in c.down_views().values()), limit=15.0)
        times.append(took)
        c.start("n3")
        assert c.until(lambda: not any("n3" in d for d in c.down_views().values()), limit=5.0) is not None
        c.net.run_for(3.0)
    assert all(t is not None and t <= 5.0 for t in times), times


def test_gossip_claiming_a_member_from_another_source_ip_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """Real TCP on 127.0.0.x (every 127/8 address is on lo): n2 listens on 127.0.0.6, so its
    daemon's connections come from 127.0.0.6 (pinned_source); a GOSSIP naming n2 from
    127.0.0.7 is refused, logged and merges nothing. n3 on 127.0.0.1 shares its address with
    every local process: the source proves nothing there (the documented limit)."""
    import time

    from shmkv.cluster.transport import TcpTransport, pinned_source, run

    pinned = {"127.0.0.6:1": "127.0.0.6", "127.0.0.255:9": "127.0.0.255", "10.0.0.1:1": "10.0.0.1",
              "[2001:db8::5]:7": "2001:db8::5", "127.0.0.1:1": None, "[::1]:1": None, "0.0.0.0:1": None,
              "[::]:1": None, "localhost:1": None, "node-a.example:7401": None}
    for addr, source in pinned.items():  # the daemon binds to it (daemon.py), gossip checks it
        assert pinned_source(addr) == source, addr
    now_ms = int(time.time() * 1000)

    async def go() -> list[Any]:
        srv = TcpTransport(source="127.0.0.5")
        g = Gossip("n1", {"n1": "127.0.0.5:1", "n2": "127.0.0.6:1", "n3": "127.0.0.1:1"}, srv)
        addr = await srv.serve("127.0.0.5:0", g.handle)
        out: list[Any] = []
        for source, sender, counter in (("127.0.0.6", "n2", 3), ("127.0.0.7", "n2", 9), ("127.0.0.7", "n3", 4)):
            t = TcpTransport(source=source)
            try:
                msg = Message(wire.GOSSIP, 0, {"from": sender, "view": [[sender, now_ms - 1000, counter]]})
                reply = await t.request(addr, msg, 2.0)
                out.append(("ok", reply.fields["view"]))
            except BadRequest as e:
                out.append(("refused", str(e)))
            finally:
                await t.close()
        assert g.gossiper is not None
        out.append(dict(g.gossiper.view))
        out.append(g.rejected)
        await srv.close()
        return out

    with caplog.at_level(logging.WARNING, logger="shmkv.cluster.gossip"):
        honest, spoofed, unpinned, view, rejected = run(go())
    assert honest[0] == "ok" and unpinned[0] == "ok"
    assert spoofed[0] == "refused" and "n2 connects from 127.0.0.6, this came from 127.0.0.7" in spoofed[1]
    assert view["n2"][1] == 3  # the forged counter 9 never entered the view
    assert view["n3"][1] == 4
    assert rejected == 1
    assert "refused GOSSIP claiming to come from n2 (127.0.0.6:1) sent from 127.0.0.7" in caplog.text
