"""A site cap end to end: the real openleadr VTN, the eDRV simulator over loopback and the whole bridge."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from dr_bridge import schedule
from dr_bridge.daemon import Bridge
from dr_bridge.domain import Event
from dr_bridge.edrv.models import Session
from dr_bridge.rig import API_KEY, Rig, StationSpec, wait_for
from tests.test_core import soon

W_PER_A = 230 * 3  # every station here is three-phase at 230 V
T0 = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)


# --- the staggered restore's timetable (pure) ---------------------------------------------------------

def test_the_spread_is_restore_spread_s_or_the_event_recovery_period_when_longer():
    event = Event("E", 0, T0, T0 + timedelta(minutes=30), [], recovery=timedelta(minutes=5))
    assert schedule.restore_spread(event, 60) == timedelta(minutes=5)
    assert schedule.restore_spread(event, 600) == timedelta(minutes=10)
    assert schedule.restore_spread(event, 0) == timedelta(minutes=5)
    event.recovery = None
    assert schedule.restore_spread(event, 60) == timedelta(seconds=60)
    assert schedule.restore_spread(event, 0) == timedelta(0)


def test_the_spread_is_never_longer_than_its_maximum_whatever_the_recovery_period():
    event = Event("E", 0, T0, T0 + timedelta(minutes=30), [], recovery=timedelta(hours=5))
    assert schedule.restore_spread(event, 60, max_s=3600) == timedelta(hours=1)
    assert schedule.restore_spread(event, 60, max_s=0) == timedelta(0)
    event.recovery = timedelta(minutes=5)
    assert schedule.restore_spread(event, 60, max_s=3600) == timedelta(minutes=5)


def test_an_energy_target_gives_a_need():
    metrics = {"energyConsumed": 4500}  # Wh
    assert Session.from_json({"_id": "s", "status": "Started", "target": {"energy": 10},
                              "metrics": metrics}).energy_need_kwh == pytest.approx(5.5)
    assert Session.from_json({"_id": "s", "status": "Started", "target": {"energy": "3"},
                              "metrics": metrics}).energy_need_kwh == 0
    assert Session.from_json({"_id": "s", "status": "Started", "target": {}, "metrics": metrics}) \
        .energy_need_kwh is None


def test_restores_are_evenly_spaced_and_all_done_before_end_plus_spread():
    spread = timedelta(seconds=90)
    times = [schedule.staggered_restore_at(T0, spread, k, 9) for k in range(9)]
    assert times[0] == T0 and times[-1] == T0 + timedelta(seconds=80)
    assert {b - a for a, b in zip(times, times[1:])} == {timedelta(seconds=10)}
    # A session that was not counted (or a bad rank) still lands inside the window.
    assert schedule.staggered_restore_at(T0, spread, 12, 9) == times[-1]
    assert schedule.staggered_restore_at(T0, spread, -1, 0) == T0


# --- end to end -------------------------------------------------------------------------------------


@pytest.fixture
async def rig(tmp_path, request):
    spec = request.param
    r = Rig(tmp_path, spec["stations"], bridge_options=spec.get("bridge", {}),
            edrv_options={"reconcile_interval_s": 2})
    await r.start(webhooks=True)  # session.started tells the bridge about a session joining mid-interval
    yield r
    await r.stop()


@pytest.fixture
async def bridge(rig):
    b = await rig.started_bridge()
    yield b
    await b.stop()


def sent(rig: Rig) -> dict[str, float | None]:
    """The last limit eDRV was asked to hold per session (A), None after a clear."""
    held: dict[str, float | None] = {}
    for session_id, kind, body in rig.sim.limit_calls():
        held[session_id] = body["limit"] if kind == "set_power_limit" else None
    return held


def restore_times(rig: Rig) -> dict[str, float]:
    return {r.path.split("/")[3]: r.at for r in rig.sim.requests if r.path.endswith("/clear_power_limit")}


def cap_event(rig: Rig, bridge: Bridge, start: datetime, seconds: float, kw: float, **kw_args) -> str:
    return rig.vtn.add_event(bridge.ven.ven_id, intervals=[(start, timedelta(seconds=seconds), kw)],
                             signal_name="LOAD_CONTROL", signal_type="x-loadControlSetpoint", **kw_args)


EIGHT = {"stations": [StationSpec(r, sessions=2) for r in "ABCD"]}


@pytest.mark.parametrize("rig", [EIGHT], indirect=True)
async def test_a_50_kw_cap_over_eight_sessions_a_ninth_joins_and_the_restore_is_spread(rig, bridge):
    start, length, recovery = soon(3), 8, 5
    event_id = cap_event(rig, bridge, start, length, 50, unit="kW", recovery=timedelta(seconds=recovery))
    eight = [s for ids in rig.sessions.values() for s in ids]

    # 50 kW / 8 = 6.25 kW = 9.06 A each at 690 W/A: floored to 9.0 A, once each.
    await wait_for(lambda: all(sent(rig).get(s) == 9.0 for s in eight), 15)
    assert len(rig.sim.limit_calls()) == 8
    assert rig.vtn.responses[0]["opt_type"] == "optIn"

    # A ninth session mid-interval: everyone is lowered to 50 kW / 9 = 8.05 A -> 8.0 A, the new one included.
    ninth = rig.sim.start_session(rig.station_ids["A"])
    await wait_for(lambda: all(sent(rig).get(s) == 8.0 for s in [*eight, ninth]), 10)
    assert sum(sent(rig)[s] for s in [*eight, ninth]) * W_PER_A <= 50_000
    await wait_for(lambda: sum(rig.sim.station_power_kw(sid) for sid in rig.station_ids.values()) <= 50, 5)
    assert len(rig.sim.limit_calls()) == 17  # only what changed: eight lowered, one new

    # It leaves again: the others go back up, and nothing is sent to it.
    mark = len(rig.sim.limit_calls())
    rig.sim.end_session(ninth)
    await wait_for(lambda: all(sent(rig).get(s) == 9.0 for s in eight), 10)
    assert all(s != ninth for s, _, _ in rig.sim.limit_calls()[mark:])

    # The end: one restore each, spread over the recovery period, all done by end + recovery.
    end = (start + timedelta(seconds=length)).timestamp()
    await wait_for(lambda: len(restore_times(rig)) == 8, length + recovery + 10)
    times = sorted(restore_times(rig).values())
    assert set(restore_times(rig)) == set(eight)
    assert end - 0.2 <= times[0] <= end + 1.0
    assert times[-1] <= end + recovery
    assert times[-1] - times[0] >= recovery / 2, f"restores came in a burst: {[t - end for t in times]}"
    assert max(b - a for a, b in zip(times, times[1:])) < recovery / 2  # and gradually, not in two lumps
    await bridge.engine.settle()
    assert bridge.store.session_states(limited_only=True) == []
    assert {a.status for a in bridge.store.actions(event_id)} <= {"requested", "accepted"}


TWO = {"stations": [StationSpec("A"), StationSpec("B")]}


@pytest.mark.parametrize("rig", [TWO], indirect=True)
async def test_when_shares_move_the_lowered_limit_goes_out_before_the_raised_one(rig, bridge):
    s = soon(3)
    cap_event(rig, bridge, s, 12, 30)  # no item base: kW
    a1, b1 = rig.sessions["A"][0], rig.sessions["B"][0]
    await wait_for(lambda: sent(rig).get(a1) == 21.7 and sent(rig).get(b1) == 21.7, 15)  # 15 kW each
    rig.sim.faults.methods = ("POST",)
    rig.sim.faults.update(latency_s=0.5)
    # A level 3 event on A alone: A is held at 6 A (4.14 kW) and B may take the rest of the cap, up to 32 A.
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), timedelta(seconds=8), 3)],
                      targets=[{"resource_id": "A"}])
    await wait_for(lambda: sent(rig).get(a1) == 6 and sent(rig).get(b1) == 32, 15)
    posts = {r.path.split("/")[3]: r for r in rig.sim.requests if r.json and r.json.get("limit") in (6, 32)}
    # The raise waited for eDRV's answer to the lowering: the two limits never added up to more than the cap.
    assert posts[b1].at - posts[a1].at >= 0.4


@pytest.mark.parametrize("rig", [TWO], indirect=True)
async def test_percent_offset_caps_the_fleet_below_its_pre_event_power(rig, bridge):
    # Both EVs draw their station's full 22.08 kW before the event, reported by eDRV every second.
    await wait_for(lambda: len(bridge.store.readings()) >= 4, 10)
    s = soon(2)
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=3), -50)], signal_name="LOAD_CONTROL",
                      signal_type="x-loadControlPercentOffset")
    # Half of 44.16 kW: 11.04 kW each = 16 A.
    await wait_for(lambda: len(rig.sim.limit_calls()) >= 2, 15)
    assert set(sent(rig).values()) == {16.0}


FOUR = {"stations": [StationSpec("A", sessions=2), StationSpec("B", sessions=2)],
        "bridge": {"restore_spread_s": 6}}


@pytest.mark.parametrize("rig", [FOUR], indirect=True)
async def test_a_restart_mid_spread_still_restores_everyone_in_turn(rig, tmp_path):
    first = await rig.started_bridge()
    start, length, spread = soon(3), 3, 6
    cap_event(rig, first, start, length, 20)
    four = [s for ids in rig.sessions.values() for s in ids]
    await wait_for(lambda: all(sent(rig).get(s) == 7.2 for s in four), 15)  # 20 kW / 4 = 5 kW = 7.2 A

    end = (start + timedelta(seconds=length)).timestamp()
    await wait_for(lambda: len(restore_times(rig)) >= 1, length + 10)
    left = await first.stop()  # as a SIGTERM would: the sessions not yet restored stay limited
    assert 1 <= len(restore_times(rig)) < 4 and len(left) == 4 - len(restore_times(rig))

    second = Bridge(rig.config(), API_KEY, vtn_backoff_s=0.2)
    await second.start()
    try:
        await wait_for(lambda: len(restore_times(rig)) == 4, spread + 10)
        times = sorted(restore_times(rig).values())
        assert times[-1] <= end + spread + 0.5
        # The restart resumed the spread rather than restoring everyone at once.
        assert times[-1] - times[0] >= spread / 2
        await second.engine.settle()
        assert second.store.session_states(limited_only=True) == []
        assert [k for _, k, _ in rig.sim.limit_calls()].count("clear_power_limit") == 4
    finally:
        await second.stop()


NEEDS = {"stations": [StationSpec("A", sessions=0), StationSpec("B", sessions=0)],
         "bridge": {"cap_sharing": "energy_need"}}


@pytest.mark.parametrize("rig", [NEEDS], indirect=True)
async def test_energy_need_sharing_gives_more_to_the_driver_who_needs_more(rig, bridge):
    far = rig.sim.start_session(rig.station_ids["A"], target_energy_kwh=30)
    near = rig.sim.start_session(rig.station_ids["B"], target_energy_kwh=10)
    cap_event(rig, bridge, soon(3), 4, 20)
    await wait_for(lambda: sent(rig).get(far) and sent(rig).get(near), 15)
    # 30 : 10 kWh still wanted: 15 kW and 5 kW of the 20 kW cap (21.7 A and 7.2 A), give or take what they
    # charged meanwhile.
    assert sent(rig)[far] == pytest.approx(21.7, abs=0.2) and sent(rig)[near] == pytest.approx(7.2, abs=0.2)
    assert (sent(rig)[far] + sent(rig)[near]) * W_PER_A <= 20_000


async def test_a_pass_for_one_station_takes_in_every_cap_linked_to_it_through_another(tmp_path):
    """Cap E2 (10 kW over B and C) arrived before cap E1 (40 kW over A and B). A session starting on A
    starts a pass over A: E1 brings in B, and through B, E2 must bring in C. Left out, C's 7.2 A was not
    counted and E2's whole 10 kW went to B, so B and C drew ~15 kW under a 10 kW cap until the next full pass."""
    r = Rig(tmp_path, [StationSpec("A"), StationSpec("B"), StationSpec("C")])  # full passes only every 60 s
    await r.start(webhooks=True)
    b = await r.started_bridge()
    try:
        start = soon(3)
        e2 = cap_event(r, b, start, 60, 10, unit="kW", targets=[{"resource_id": "B"}, {"resource_id": "C"}])
        e1 = cap_event(r, b, start, 60, 40, unit="kW", targets=[{"resource_id": "A"}, {"resource_id": "B"}])
        on = {name: r.sessions[name][0] for name in "ABC"}
        await wait_for(lambda: sent(r).get(on["B"]) == 7.2 and sent(r).get(on["C"]) == 7.2, 15)
        await b.engine.settle()
        assert list(b.engine.events) == [e2, e1]  # the order the pass meets the caps in
        second = r.sim.start_session(r.station_ids["A"])
        await wait_for(lambda: second in sent(r), 10)
        await b.engine.settle()
        assert (sent(r)[on["B"]] + sent(r)[on["C"]]) * W_PER_A <= 10_000, sent(r)
        assert sent(r)[on["B"]] == 7.2
    finally:
        await b.stop()
        await r.stop()
