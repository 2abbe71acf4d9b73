"""balance.py's policy, driven in virtual time over a model of a cluster's load (no I/O).

The model: each node's load is ``demand * share_i * heat_i`` -- the share of the key space its
weight gives it, times how hot its ranges are -- with multiplicative noise per sample. The
policy is fed a sample per node per second, exactly as autobalance.py feeds it on the leader,
and each change it returns is "committed" at once (the epoch rises).
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shmkv.cluster.balance import QUANTUM, REVERSE_AFTER, Balance, Change, Sample, Settings
from shmkv.cluster.cluster_config import ClusterConfig, apply, bootstrap_command, check
from shmkv.cluster.errors import ConfigError
from shmkv.cluster.ring import Member, Ring

FAST = Settings(window=10.0, cooldown=20.0, stale=3.0)


@dataclass
class Model:
    base: dict[str, float]
    heat: dict[str, float]
    noise: float = 0.0
    seed: int = 0
    demand: float = 3000.0  # ops/s over the cluster
    weights: dict[str, float] = field(default_factory=dict)
    silent: dict[str, tuple[float, float]] = field(default_factory=dict)  # node -> (from, to): no samples

    def __post_init__(self) -> None:
        self.weights = self.weights or dict(self.base)
        self.counters = dict.fromkeys(self.base, 0.0)
        self.rng = random.Random(self.seed)

    def rates(self) -> dict[str, float]:
        total = sum(self.weights.values())
        return {n: self.demand * self.weights[n] / total * self.heat[n] for n in self.base}

    def true_relative(self) -> dict[str, float]:
        rates = self.rates()
        fair = sum(rates.values()) / sum(self.base.values())
        return {n: rates[n] / self.base[n] / fair for n in self.base}

    def run(self, policy: Balance, until: float, start: float = 0.0, dt: float = 1.0) -> list[tuple[float, Change]]:
        changes: list[tuple[float, Change]] = []
        epoch = 1
        t = start
        while t < until:
            t += dt
            for n, rate in self.rates().items():
                self.counters[n] += rate * dt * (1 + self.rng.uniform(-self.noise, self.noise))
                lo, hi = self.silent.get(n, (math.inf, math.inf))
                if not lo <= t < hi:
                    policy.observe(n, Sample(t, int(self.counters[n]), 1000))
            base = {n: b for n, b in self.base.items() if self.weights[n] != b}  # as cluster_config keeps it
            change = policy.decide(t, epoch, dict(self.weights), base)
            if change is not None:
                assert change.old == self.weights[change.name]
                self.weights[change.name] = change.weight
                epoch += 1
                policy.committed(t, change)
                changes.append((t, change))
        return changes


def imbalance(rel: dict[str, float]) -> float:
    return max(abs(math.log(r)) for r in rel.values())


names = st.integers(min_value=2, max_value=4).map(lambda k: [f"n{i}" for i in range(k)])


@st.composite
def clusters(draw: st.DrawFn, heat_max: float = 1.0) -> tuple[dict[str, float], dict[str, float]]:
    ns = draw(names)
    base = {n: draw(st.sampled_from([0.5, 1.0, 1.0, 2.0])) for n in ns}
    heat = {n: draw(st.floats(min_value=1.0 / heat_max, max_value=heat_max)) for n in ns}
    return base, heat


@settings(max_examples=40, deadline=None)
@given(clusters(), st.floats(min_value=0.0, max_value=0.08), st.integers(0, 2**32))
def test_a_balanced_load_with_noise_never_changes_a_weight(c: tuple[dict[str, float], dict[str, float]],
                                                           noise: float, seed: int) -> None:
    base, _ = c
    m = Model(base, dict.fromkeys(base, 1.0), noise=noise, seed=seed)
    policy = Balance(FAST, 0.0)
    assert m.run(policy, 600.0) == []
    assert policy.loads and imbalance(policy.loads) < math.log1p(FAST.threshold / 2)


def _check_run(m: Model, s: Settings, changes: list[tuple[float, Change]]) -> None:
    # bounds, one change per cooldown, small steps
    last_t = -math.inf
    for t, ch in changes:
        assert t - last_t >= s.cooldown
        last_t = t
        b = m.base[ch.name]
        assert s.low * b - 1e-9 <= ch.weight <= s.high * b + 1e-9
        assert abs(ch.weight - ch.old) <= ch.old * s.step + QUANTUM  # a step, rounded to the quantum
    # no reversal within REVERSE_AFTER cooldowns of a node's previous move
    prev: dict[str, tuple[int, float]] = {}
    for t, ch in changes:
        d = 1 if ch.weight > ch.old else -1
        if ch.name in prev and prev[ch.name][0] != d:
            assert t - prev[ch.name][1] >= REVERSE_AFTER * s.cooldown
        prev[ch.name] = (d, t)


@settings(max_examples=30, deadline=None)
@given(clusters(heat_max=2.5), st.floats(min_value=0.0, max_value=0.05), st.integers(0, 2**32))
def test_a_skewed_stationary_load_converges_monotonically_within_bounds(
        c: tuple[dict[str, float], dict[str, float]], noise: float, seed: int) -> None:
    base, heat = c
    s = FAST
    m = Model(base, heat, noise=noise, seed=seed)
    before = imbalance(m.true_relative())
    policy = Balance(s, 0.0)
    horizon = 80 * s.cooldown  # 4 nodes x 15 steps (0.5x..2x by 1.1x) at most, and a margin
    changes = m.run(policy, horizon)
    _check_run(m, s, changes)
    # monotone: under a stationary load no node's weight ever turns back
    dirs: dict[str, set[int]] = {}
    for _, ch in changes:
        dirs.setdefault(ch.name, set()).add(1 if ch.weight > ch.old else -1)
    assert all(len(d) == 1 for d in dirs.values()), dirs
    # it stopped, and where it stopped the load is balanced or every helpful move is at a bound
    assert not changes or changes[-1][0] < horizon - 10 * s.cooldown
    rel = m.true_relative()
    after = imbalance(rel)
    assert after <= before + 0.05
    if after > math.log1p(s.threshold) + 0.1:
        for n, r in rel.items():
            if abs(math.log(r)) > math.log1p(s.threshold / 2) + 0.1:
                bound = s.low if r > 1 else s.high
                assert m.weights[n] == pytest.approx(bound * base[n], abs=2e-3), (n, r, m.weights)


def test_a_hot_node_is_stepped_down_until_its_share_fits() -> None:
    m = Model({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 1.6, "b": 1.0, "c": 1.0})
    changes = m.run(Balance(FAST, 0.0), 2000.0)
    assert changes and all(ch.name == "a" and ch.weight < ch.old for _, ch in changes)
    assert imbalance(m.true_relative()) <= math.log1p(FAST.threshold)
    # the first change waits for a full window of data, the sustained window and the cooldown
    assert changes[0][0] >= FAST.cooldown


@settings(max_examples=30, deadline=None)
@given(clusters(heat_max=2.5), st.integers(0, 2**32), st.data())
def test_a_node_with_stale_or_missing_data_is_never_reweighted(
        c: tuple[dict[str, float], dict[str, float]], seed: int, data: st.DataObject) -> None:
    base, heat = c
    silent = {}
    for n in base:
        if data.draw(st.booleans()):
            lo = data.draw(st.floats(min_value=0.0, max_value=400.0))
            silent[n] = (lo, lo + data.draw(st.floats(min_value=1.0, max_value=300.0)))
    m = Model(base, heat, seed=seed, silent=silent)
    changes = m.run(Balance(FAST, 0.0), 800.0)
    for t, _ in changes:
        for n, (lo, hi) in silent.items():
            # nobody changes while a node is silent, nor until it has a fresh full window again
            assert not lo <= t < hi + FAST.stale, (t, n, lo, hi)


def test_a_node_never_heard_from_blocks_every_change() -> None:
    m = Model({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 3.0, "b": 1.0, "c": 1.0}, silent={"c": (0.0, math.inf)})
    policy = Balance(FAST, 0.0)
    assert m.run(policy, 500.0) == []
    assert "c" in policy.waiting


def test_a_counter_that_goes_back_restarts_that_nodes_window() -> None:
    p = Balance(FAST, 0.0)
    for t in range(1, 12):
        p.observe("a", Sample(float(t), 1000 * t, 0))
    p.observe("a", Sample(12.0, 5, 0))  # restarted with a fresh store
    assert len(p.samples["a"]) == 1


def test_an_operators_change_restarts_the_window() -> None:
    m = Model({"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 1.0})
    p = Balance(FAST, 0.0)
    m.run(p, 35.0)  # uneven for long enough: it would change at once ...
    assert p.decide(36.0, 7, m.weights, {}) is None  # ... but the ring is another one now
    assert p.since == 36.0


def test_idle_load_is_not_judged() -> None:
    m = Model({"a": 1.0, "b": 1.0}, {"a": 5.0, "b": 1.0}, demand=10.0)
    assert m.run(Balance(FAST, 0.0), 500.0) == []


def test_the_bytes_metric_balances_stored_bytes() -> None:
    p = Balance(Settings(window=10.0, cooldown=10.0, stale=3.0, metric="bytes", min_load=1.0), 0.0)
    change = None
    for t in range(1, 40):
        p.observe("a", Sample(float(t), 0, 3_000_000))
        p.observe("b", Sample(float(t), 0, 1_000_000))
        change = change or p.decide(float(t), 1, {"a": 1.0, "b": 1.0}, {})
    # a carries 1.5x its share, b 0.5x: b is further from it (|ln 0.5| > |ln 1.5|) and goes up
    assert change is not None and change.name == "b" and change.weight == pytest.approx(1.1)


@pytest.mark.parametrize("kw", [{"threshold": 0.0}, {"step": 0.5, "threshold": 0.25}, {"low": 1.5},
                                {"high": 0.9}, {"window": 10.0, "cooldown": 5.0}, {"metric": "cpu"}])
def test_settings_that_cannot_work_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Settings(**kw).check()  # type: ignore[arg-type]


# -- the configuration commands it makes (cluster_config.py) -----------------------------------

def _state() -> ClusterConfig:
    ring = Ring([Member("a", "h:1"), Member("b", "h:2"), Member("c", "h:3", 2.0)], epoch=1)
    state, why = apply(None, bootstrap_command(ring, 2, 2, 2))
    assert why is None and state is not None
    return state


def test_an_auto_change_keeps_the_configured_weight_and_an_operators_resets_it() -> None:
    s = _state()
    s2, why = apply(s, Change("c", 2.0, 1.8, 1.4).command(s.epoch))
    assert why is None and s2 is not None
    assert s2.ring.members["c"].weight == 1.8 and s2.configured_weight("c") == 2.0
    assert ClusterConfig.decode(s2.encode()) == s2  # the base survives the log's snapshot
    s3, _ = apply(s2, {"op": "weight", "name": "c", "weight": 1.8})  # the operator takes it as is
    assert s3 is not None and s3.configured_weight("c") == 1.8 and not s3.base
    s4, _ = apply(s2, {"op": "weight", "name": "c", "weight": 2.0, "auto": True})  # back home
    assert s4 is not None and not s4.base
    s5, _ = apply(s2, {"op": "remove", "name": "c"})
    assert s5 is not None and not s5.base


def test_an_auto_change_computed_at_an_older_epoch_is_refused() -> None:
    s = _state()
    s2, _ = apply(s, {"op": "weight", "name": "a", "weight": 1.5})
    assert s2 is not None
    why = check(s2, Change("b", 1.0, 0.9, 1.3).command(s.epoch))
    assert why is not None and "epoch 1" in why and "epoch 2" in why


def test_a_configuration_without_base_reads_as_before() -> None:
    s = _state()
    assert "base" not in s.to_wire()
    assert ClusterConfig.from_wire(s.to_wire()) == s


def test_bad_balance_flags_refuse_the_start() -> None:
    from shmkv.cli import _bounds
    from shmkv.cluster.daemon import Options, check_options

    seeds = [f"127.0.0.1:{p}" for p in (1, 2, 3)]
    with pytest.raises(ConfigError, match="--auto-balance needs the configuration group"):
        check_options(Options(listen=seeds[0], seeds=seeds, auto_balance=True))
    ok = {"listen": seeds[0], "seeds": seeds, "raft_dir": "/nonexistent", "auto_balance": True}
    check_options(Options(**ok))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--balance-cooldown"):
        check_options(Options(**ok, balance_window=30.0, balance_cooldown=10.0))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--balance-bounds"):
        check_options(Options(**ok, balance_bounds=(1.2, 2.0)))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--balance-bounds must be LOW:HIGH"):
        _bounds("2")
    assert _bounds("0.5:3") == (0.5, 3.0)


# -- the loop (autobalance.py) over the simulated network, in virtual time ----------------------

SIM = Settings(window=2.0, cooldown=3.0, stale=1.5)


def _sim_group(tmp_path: Path, load: dict[str, int]) -> tuple[Any, dict[str, Any]]:
    from shmkv.cluster.autobalance import AutoBalance

    from .test_config_service import Group

    g = Group(seed=5, tmp=tmp_path, nodes=3)
    bals: dict[str, AutoBalance] = {}

    async def start() -> None:
        for name in g.names:
            bals[name] = AutoBalance(g.nodes[name], g.stores[name], g.services[name], SIM, enabled=True,
                                     interval=0.5)
            bals[name].start()

            async def work(kv: Any = g.stores[name], k: int = load[name]) -> None:  # k store ops / 10 ms
                while True:
                    for _ in range(k):
                        kv.get(b"x")
                    await asyncio.sleep(0.01)

            g.net.loop.create_task(work())

    g.net.run(start())
    return g, bals


def test_the_leaders_loop_commits_a_change_for_the_loaded_node(tmp_path: Path) -> None:
    g, bals = _sim_group(tmp_path, {"n1": 6, "n2": 2, "n3": 2})
    try:
        leader = g.wait_leader()
        g.net.run_for(12.0)
        assert bals[leader].adjustments >= 1 and bals[leader].policy is not None
        first = bals[leader].policy.last
        assert first is not None
        assert all(bals[n].adjustments == 0 for n in g.names if n != leader)  # only the leader acts
        for name in g.names:  # a committed configuration change, on every node
            ring = g.nodes[name].ring
            assert ring is not None and ring.epoch >= 2
            assert ring.members["n1"].weight < 1.0
            st = g.services[name].state
            assert st is None or st.configured_weight("n1") == 1.0
        assert bals[leader].status()["adjustments"] >= 1 and bals[leader].status()["last"]["name"] == first.name
    finally:
        for b in bals.values():
            g.net.run(b.close())
        g.close()


def test_the_loop_changes_nothing_while_a_node_is_down(tmp_path: Path) -> None:
    g, bals = _sim_group(tmp_path, {"n1": 6, "n2": 2, "n3": 2})
    try:
        leader = g.wait_leader()
        other = next(n for n in g.voters if n != leader)
        g.crash(other)
        g.net.run_for(12.0)
        assert bals[leader].adjustments == 0
        assert g.nodes[leader].ring is not None and g.nodes[leader].ring.epoch == 1
        assert bals[leader].policy is not None and other in bals[leader].policy.waiting
    finally:
        for b in bals.values():
            g.net.run(b.close())
        g.close()
