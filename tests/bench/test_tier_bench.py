"""bench/tier_bench.py runs end to end at tiny sizes and writes the JSON its report is built from."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "tier_bench.py"


def _load() -> ModuleType:  # bench/ is not a package
    spec = importlib.util.spec_from_file_location("tier_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tier_bench"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.bench
@pytest.mark.timeout(60)
def test_tier_bench_runs_small_and_writes_json(tmp_path: Path) -> None:
    tb = _load()
    out = tmp_path / "tier.json"
    stores = tmp_path / "stores"
    stores.mkdir()
    tb.main(["-q", "--mem-keys", "2000", "--disk-keys", "3000", "--durable-ops", "100",
             "--scan-len", "100", "--spill-gb", "0.003", "--settle-s", "0.3", "--budget", "0.2",
             "--dir", str(stores), "--json", str(out)])  # fmt: skip
    res = json.loads(out.read_text())
    assert set(res) >= {"meta", "memory_gets", "puts", "disk", "spill", "markdown"}
    mg = res["memory_gets"]
    for side in ("tiered", "memory_only"):
        assert mg[side]["ops_s_p50"] > 0 and mg[side]["p99_us"] >= mg[side]["p50_us"]
    assert mg["ratio_p50"] > 0 and mg["tiered_memory_misses"] == 0
    assert mg["resident_items"] == {"tiered": 2000, "memory_only": 2000}
    assert set(res["puts"]) == {"fsync", "interval", "none"}
    for r in res["puts"].values():
        assert r["tiered"]["ops_s_p50"] > 0
    d = res["disk"]
    assert d["get"]["tiered_memory_hit_ratio"] == 0.0  # every probe was on disk only
    assert {"get", "get_absent", "scan", "bloom_false_positive_rate", "files_per_level"} <= set(d)
    assert d["scan"]["keys_per_scan"] == 100
    sp = res["spill"]["tiered"]
    for k in ("own_write_amplification", "wchar_write_amplification", "load_s", "elapsed_s",
              "puts_s_p50", "disk_bytes", "files_per_level"):  # fmt: skip
        assert k in sp
    assert sp["own_write_amplification"] >= 1.0
    if res["meta"]["plyvel"]:  # LevelDB beside it when plyvel is installed
        assert "ratio_p50" in d["get"] and res["spill"]["leveldb"]["wchar_write_amplification"] > 0
    assert "| 1 | get, resident in memory" in res["markdown"]
    assert os.listdir(stores) == []  # the run removed its stores
