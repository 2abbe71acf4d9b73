"""A real network partition between two data centres: 4 daemons in a private network namespace,
nftables cutting the DCs apart (netns_dc_partition.py says what is checked). Skipped, with the
reason, where ``unshare -rn`` or nft cannot be had (CI installs nftables)."""

from __future__ import annotations

import pytest

from .netns_run import WHY, run_script

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.mark.skipif(WHY is not None, reason=str(WHY))
def test_a_partition_between_dcs_keeps_local_quorum_fails_each_quorum_fast_and_heals() -> None:
    res = run_script("netns_dc_partition.py")
    assert res["each_quorum_worst_s"] < 0.5
    assert res["ae_repaired"] >= 40
