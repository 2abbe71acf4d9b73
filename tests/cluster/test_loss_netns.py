"""1 % packet loss between real daemons causes no flapping (issue 12): 3 daemons in a private
network namespace, nftables dropping 1 % of every node-to-node packet for 30 s
(netns_loss.py says what is checked). Skipped, with the reason, where ``unshare -rn`` or nft
cannot be had (CI installs nftables)."""

from __future__ import annotations

import pytest

from .netns_run import WHY, run_script

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.mark.skipif(WHY is not None, reason=str(WHY))
def test_one_percent_loss_between_daemons_convicts_no_one_and_loses_nothing() -> None:
    res = run_script("netns_loss.py", timeout=150)
    assert res["flaps"] == [] and res["lost"] == 0 and res["acked"] > 100
