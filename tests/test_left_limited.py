"""The ways a limit could outlive its event, each run end to end (the openleadr VTN and the eDRV simulator over
loopback, the whole bridge): every one must end with the session restored in eDRV and in the event log."""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from dr_bridge.rig import Rig, StationSpec, wait_for
from tests.test_core import a_calls, calls, one_station, soon


@pytest.fixture
async def rig(tmp_path, request):
    spec = getattr(request, "param", None) or {}
    r = Rig(tmp_path, spec.get("stations") or [StationSpec("A"), StationSpec("B")],
            bridge_options=spec.get("bridge", {}), edrv_options=spec.get("edrv", {}))
    await r.start(webhooks=spec.get("webhooks", False))
    yield r
    await r.stop()


@pytest.fixture
async def bridge(rig):
    b = await rig.started_bridge()
    yield b
    await b.stop()


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_a_logged_test_event_never_stands_in_for_a_real_limit(rig, bridge):
    # The test event (logged only, the default) is stricter than the real one and outlasts it: the real
    # limit must still be lifted when the real event ends, not be taken for the logged one.
    s = soon(2)
    real = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=3), 2)])
    test = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s + timedelta(seconds=1), timedelta(seconds=4), 3)],
                             test_event=True)
    await wait_for(lambda: len(calls(rig, "A")) >= 2, 15)
    await wait_for(lambda: len(bridge.store.actions(test)) >= 2, 10)
    await bridge.engine.settle()
    assert a_calls(rig) == [("set_power_limit", 16), ("clear_power_limit", None)]
    clear_at = [r.at for r in rig.sim.requests if r.path.endswith("clear_power_limit")][0]
    assert clear_at < (s + timedelta(seconds=5)).timestamp()  # at the real event's end, not the test's
    assert [(a.purpose, a.status, a.limit) for a in bridge.store.actions(test)] == [
        ("limit", "dry_run", 6), ("restore", "dry_run", None)]
    assert [(a.kind, a.status) for a in bridge.store.actions(real)] == [
        ("set_power_limit", "requested"), ("clear_power_limit", "requested")]
    assert bridge.engine.limited_sessions() == [] and bridge.store.session_states(limited_only=True) == []


async def test_a_limited_session_missing_from_a_listing_is_asked_about_before_it_is_let_go(rig, bridge):
    s = soon(2)
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=4), 2)])
    await wait_for(lambda: calls(rig, "A") and calls(rig, "B"), 15)
    await bridge.engine.settle()
    (a,), (b,) = rig.sessions["A"], rig.sessions["B"]
    rig.sim.unlisted.add(a)  # still running, but the listing leaves it out (a page boundary moved)
    rig.sim.end_session(b, send_webhook=False)  # really over, and its webhook lost
    rig.sim.clear_requests()
    bridge.engine.kick()  # a full pass with a fresh listing, as the reconcile job makes
    await bridge.engine.settle()
    asked = sorted(r.path.rsplit("/", 1)[1] for r in rig.sim.requests if r.method == "GET"
                   and "/sessions/" in r.path)
    assert asked == sorted([a, b])
    await wait_for(lambda: len(calls(rig, "A")) >= 1, 15)  # the event ends
    await bridge.engine.settle()
    assert calls(rig, "A") == [("clear_power_limit", {})]
    assert calls(rig, "B") == []  # ended: nothing to restore
    assert bridge.store.session_states(limited_only=True) == []


@pytest.mark.parametrize("rig", [{"webhooks": True, "edrv": {"retry_backoff_s": 0.5}}], indirect=True)
async def test_a_restore_the_charger_refuses_after_edrv_accepted_it_survives_a_restart(rig):
    bridge = await rig.started_bridge()
    s = soon(2)
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=2), 2)])
    try:
        await wait_for(lambda: calls(rig, "A"), 15)
        (a,) = rig.sessions["A"]
        rig.sim.set_refuse(rig.station_ids["A"], "webhook")  # eDRV answers 201, the charger then says no
        await wait_for(lambda: len(calls(rig, "A")) >= 2, 15)  # the clear: accepted by eDRV, refused later
        # The database says the session is limited again, so that a restart still lifts it.
        await wait_for(lambda: [st.session_id for st in bridge.store.session_states(limited_only=True)
                                if st.session_id == a], 5)
    finally:
        await bridge.stop()
    rig.sim.set_refuse(rig.station_ids["A"], None)
    before = len(calls(rig, "A"))
    again = await rig.started_bridge()
    try:
        await wait_for(lambda: not again.store.session_states(limited_only=True), 15)
        await again.engine.settle()
    finally:
        await again.stop()
    after = calls(rig, "A")[before:]
    assert after and after[-1] in (("clear_power_limit", {}), ("set_power_limit", {"unit": "current", "limit": 32}))
    await wait_for(lambda: rig.sim.session_limit(a) in (None, 32), 5)  # the EV follows a moment later


@pytest.mark.parametrize("rig", [{"stations": [StationSpec("A")], "edrv": {"retry_backoff_s": 5}}], indirect=True)
async def test_a_limit_that_may_have_landed_is_lifted_when_its_event_is_cancelled(rig, bridge):
    # Limited, then restored in a level-0 gap; the next limit reaches the charger but eDRV's gateway answers
    # 504, and while the bridge waits to try again the event is cancelled: the session must be restored,
    # although the last restore the bridge knows of went through.
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[
        (s, timedelta(seconds=2), 2), (s + timedelta(seconds=2), timedelta(seconds=2), 0),
        (s + timedelta(seconds=4), timedelta(seconds=60), 3)])
    await wait_for(lambda: len(calls(rig, "A")) >= 2, 15)
    rig.sim.faults.methods = ("POST",)
    rig.sim.faults.fail_after_effect_next(1)
    await wait_for(lambda: len(calls(rig, "A")) >= 3, 15)
    rig.vtn.cancel_event(event_id)
    await wait_for(lambda: len(calls(rig, "A")) >= 4, 10)
    await bridge.engine.settle()
    assert a_calls(rig) == [("set_power_limit", 16), ("clear_power_limit", None), ("set_power_limit", 6),
                            ("clear_power_limit", None)]
    (a,) = rig.sessions["A"]
    await wait_for(lambda: rig.sim.session_limit(a) is None, 5)
    assert [(x.kind, x.status) for x in bridge.store.actions(event_id)][2:] == [
        ("set_power_limit", "skipped"), ("clear_power_limit", "requested")]


@pytest.mark.parametrize("rig", [{"webhooks": True, "stations": [StationSpec("A")]}], indirect=True)
async def test_a_reconnecting_charger_does_not_make_retries_ignore_retry_after(rig, bridge):
    rig.sim.faults.update(rate_limit_rate=1.0, retry_after_s=30)
    rig.sim.faults.methods = ("POST",)
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), timedelta(seconds=60), 2)])
    await wait_for(lambda: calls(rig, "A"), 15)  # answered 429, Retry-After: 30
    rig.sim.set_online(rig.station_ids["A"], True)  # "reconnected": send the limit again now, once
    await asyncio.sleep(2)
    assert len(calls(rig, "A")) == 2


@pytest.mark.parametrize("rig", [{"webhooks": True, "stations": [StationSpec("A")]}], indirect=True)
async def test_a_restore_refused_after_a_restart_is_sent_again(rig):
    first = await rig.started_bridge()
    try:
        rig.vtn.add_event(first.ven.ven_id, intervals=[(soon(2), timedelta(seconds=2), 2)])
        await wait_for(lambda: calls(rig, "A"), 15)
        rig.sim.outcome_delay_s = 4  # the charger's answer comes after the restart
        rig.sim.set_refuse(rig.station_ids["A"], "webhook")
        await wait_for(lambda: len(calls(rig, "A")) >= 2, 15)  # the clear: accepted by eDRV (201)
    finally:
        await first.stop()
    rig.sim.set_refuse(rig.station_ids["A"], None)
    rig.sim.outcome_delay_s = 0.05
    (a,) = rig.sessions["A"]
    again = await rig.started_bridge()
    try:
        assert again.store.session_states(limited_only=True) == []  # the database took it for restored
        await wait_for(lambda: len(calls(rig, "A")) >= 3, 15)  # then the refusal came, and another restore
        await wait_for(lambda: rig.sim.session_limit(a) in (None, 32), 5)
        await again.engine.settle()
        assert again.store.session_states(limited_only=True) == []
    finally:
        await again.stop()
    # the last a clear, or the station's maximum where this run had not yet read the station's kind
    assert calls(rig, "A")[1:] in ([("clear_power_limit", {})] * 2, [
        ("clear_power_limit", {}), ("set_power_limit", {"unit": "current", "limit": 32})])


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_a_call_cut_short_by_a_stop_is_marked_failed_at_the_next_start_and_sent_again(rig):
    first = await rig.started_bridge()
    try:
        rig.sim.faults.methods = ("POST",)
        rig.sim.faults.update(latency_s=3)  # the call is still on its way when the bridge stops
        event_id = rig.vtn.add_event(first.ven.ven_id, intervals=[(soon(2), timedelta(seconds=60), 2)])
        await wait_for(lambda: first.store.action_counts(event_id).get("planned"), 15)
    finally:
        await first.stop()
    assert first.store.action_counts(event_id) == {"planned": 1}
    rig.sim.faults.update(latency_s=0)
    again = await rig.started_bridge()
    try:
        await wait_for(lambda: again.store.action_counts(event_id).get("requested"), 15)
        await again.engine.settle()
        rows = [(a.kind, a.status, a.limit) for a in again.store.actions(event_id)]
        assert rows == [("set_power_limit", "failed", 16), ("set_power_limit", "requested", 16)]
        assert "interrupted" in again.store.actions(event_id)[0].detail
    finally:
        await again.stop()
