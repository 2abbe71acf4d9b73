"""A process claiming a member's identity from another address is refused, on routable
addresses (issue 12): three daemons on 10.77.0.x in a private network namespace
(netns_identity.py says what is checked). Skipped, with the reason, where ``unshare -rn``
cannot be had."""

from __future__ import annotations

import pytest

from .netns_run import WHY, run_script

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.mark.skipif(WHY is not None, reason=str(WHY))
def test_a_gossip_naming_a_member_from_another_routable_address_is_refused() -> None:
    res = run_script("netns_identity.py")
    assert res["all_up"] and res["honest_ok"] and "this came from 10.77.0.9" in res["refused"]
