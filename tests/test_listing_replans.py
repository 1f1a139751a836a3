"""What the bridge learns from its own listing of running sessions is acted on at once, as a webhook would be.

The listing made just ahead of each interval boundary (engine.PREFETCH_S) once replaced the picture of which
sessions run without planning anew: a session that started without a webhook got no limit until the
boundary, and one that left the same way kept its share of a cap unused until then.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from dr_bridge.engine import PREFETCH_S
from dr_bridge.rig import StationSpec, wait_for
from tests.test_capacity import cap_event, sent
from tests.test_core import bridge, rig, soon  # noqa: F401  (fixtures; the rig sends no webhooks)


def before(boundary: datetime, seconds: float) -> float:
    """How long from now until `seconds` before `boundary`."""
    return (boundary - timedelta(seconds=seconds) - datetime.now(timezone.utc)).total_seconds()


@pytest.mark.parametrize("rig", [{"stations": [StationSpec("A")]}], indirect=True)
async def test_a_session_started_silently_is_limited_once_a_listing_sees_it(rig, bridge):
    start = soon(3)
    boundary = start + timedelta(seconds=PREFETCH_S + 4)  # the second interval's start, listed for ahead
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(start, boundary - start, 2), (boundary, timedelta(seconds=3), 2)])
    first = rig.sessions["A"][0]
    await wait_for(lambda: sent(rig).get(first) == 16, 15)  # level 2: half of 32 A, one session

    second = rig.sim.start_session(rig.station_ids["A"], send_webhook=False)
    # The listing ahead of the boundary sees it; the station's budget is shared from then on, not from the
    # boundary on (before the fix the second session ran unlimited, the first holding the whole budget).
    await wait_for(lambda: sent(rig).get(second) == 8 and sent(rig).get(first) == 8, before(boundary, 0.5))
    calls = [(sid, body.get("limit")) for sid, _, body in rig.sim.limit_calls()]
    assert [limit for sid, limit in calls if sid == first] == [16, 8], calls
    assert [limit for sid, limit in calls if sid == second] == [8], calls


@pytest.mark.parametrize("rig", [{"stations": [StationSpec("A"), StationSpec("B")]}], indirect=True)
async def test_a_session_that_left_silently_frees_its_share_of_a_cap_once_a_listing_misses_it(rig, bridge):
    start = soon(3)
    boundary = start + timedelta(seconds=PREFETCH_S + 4)
    cap_event(rig, bridge, start, (boundary - start).total_seconds() + 3, 20, unit="kW",
              extra_signals=[{"signal_name": "SIMPLE", "signal_type": "level",
                              "intervals": [(start, boundary - start, 0), (boundary, timedelta(seconds=3), 0)]}])
    a, b = rig.sessions["A"][0], rig.sessions["B"][0]
    await wait_for(lambda: sent(rig).get(a) == 14.4 and sent(rig).get(b) == 14.4, 15)  # 10 kW each at 690 W/A

    rig.sim.end_session(b, send_webhook=False)
    # Seen gone by the listing ahead of the boundary: A gets the whole 20 kW then (28.9 A), not at the boundary.
    await wait_for(lambda: sent(rig).get(a) == 28.9, before(boundary, 0.5))
    assert [x for x, _, _ in rig.sim.limit_calls()].count(b) == 1, "nothing more is sent to a session that ended"
