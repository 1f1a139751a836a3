"""The main path end to end: the real openleadr VTN and the eDRV simulator over loopback, the whole bridge."""
from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timedelta, timezone

import pytest

from dr_bridge.engine import PREFETCH_S
from dr_bridge.rig import Rig, StationSpec, wait_for


def soon(seconds: float) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=seconds)


@pytest.fixture
async def rig(tmp_path, request):
    spec = getattr(request, "param", None) or {}
    r = Rig(tmp_path, spec.get("stations") or [
        StationSpec("A"), StationSpec("B", sessions=2), StationSpec("S", simulator=True), StationSpec("U")],
        bridge_options=spec.get("bridge", {}), edrv_options=spec.get("edrv", {}))
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def bridge(rig):
    b = await rig.started_bridge(**getattr(rig, "bridge_kwargs", {}))
    yield b
    await b.stop()


def calls(rig: Rig, resource: str):
    """(kind, body) of every set/clear call eDRV received for the resource's sessions, in order."""
    sessions = set(rig.sessions[resource])
    return [(kind, body) for sid, kind, body in rig.sim.limit_calls() if sid in sessions]


async def test_level2_event_limits_targeted_sessions_and_restores_them(rig, bridge):
    start = soon(3)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(start, timedelta(seconds=3), 2)],
                                 targets=[{"resource_id": "A"}, {"resource_id": "B"}, {"resource_id": "S"}])
    await wait_for(lambda: rig.vtn.responses, 10)
    assert rig.vtn.responses[0]["opt_type"] == "optIn"
    await wait_for(lambda: len(rig.sim.limit_calls()) >= 4, 15)
    assert calls(rig, "A") == [("set_power_limit", {"unit": "current", "limit": 16})]
    assert calls(rig, "B") == [("set_power_limit", {"unit": "current", "limit": 8})] * 2
    assert calls(rig, "S") == [("set_power_limit", {"unit": "current", "limit": 16})]
    await wait_for(lambda: len(rig.sim.limit_calls()) >= 8, 15)
    await bridge.engine.settle()
    assert calls(rig, "A")[1:] == [("clear_power_limit", {})]
    assert calls(rig, "B")[2:] == [("clear_power_limit", {})] * 2
    assert calls(rig, "S")[1:] == [("set_power_limit", {"unit": "current", "limit": 32})]
    assert calls(rig, "U") == []
    ev = bridge.store.get_event(event_id)
    assert ev.status == "completed" and ev.opt == "optIn"
    assert {a.status for a in bridge.store.actions(event_id)} == {"requested"}
    assert bridge.store.session_states(limited_only=True) == []


def one_station(**bridge):
    return {"stations": [StationSpec("A")], "bridge": bridge}


def a_calls(rig):
    return [(k, b.get("limit")) for k, b in calls(rig, "A")]


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_intervals_with_different_levels_and_a_level0_gap(rig, bridge):
    s = soon(3)
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=2), 1), (s + timedelta(seconds=2),
                      timedelta(seconds=2), 0), (s + timedelta(seconds=4), timedelta(seconds=2), 2)])
    await wait_for(lambda: len(calls(rig, "A")) >= 4, 20)
    await bridge.engine.settle()
    assert a_calls(rig) == [("set_power_limit", 24), ("clear_power_limit", None), ("set_power_limit", 16),
                            ("clear_power_limit", None)]


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_modification_takes_effect_at_once_and_cancellation_restores_at_once(rig, bridge):
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=60), 1)])
    await wait_for(lambda: calls(rig, "A"), 15)
    rig.vtn.modify_event(event_id, intervals=[(s, timedelta(seconds=60), 2)])
    await wait_for(lambda: len(calls(rig, "A")) >= 2, 10)
    assert a_calls(rig) == [("set_power_limit", 24), ("set_power_limit", 16)]
    rig.vtn.cancel_event(event_id)
    await wait_for(lambda: len(calls(rig, "A")) >= 3, 10)
    assert a_calls(rig)[2] == ("clear_power_limit", None)
    assert bridge.store.get_event(event_id).status == "cancelled"
    assert bridge.store.get_event(event_id).modification_number == 2


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_overlapping_events_restore_only_after_the_later_one(rig, bridge):
    s = soon(3)
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=3), 1)])
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s + timedelta(seconds=1), timedelta(seconds=5), 2)])
    await wait_for(lambda: len(calls(rig, "A")) >= 3, 20)
    await bridge.engine.settle()
    assert a_calls(rig) == [("set_power_limit", 24), ("set_power_limit", 16), ("clear_power_limit", None)]
    clear_at = [r.at for r in rig.sim.requests if r.path.endswith("clear_power_limit")][0]
    assert clear_at >= (s + timedelta(seconds=6)).timestamp() - 0.2


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_open_ended_event_holds_until_cancelled(rig, bridge):
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(0), 3)])
    await wait_for(lambda: calls(rig, "A"), 15)
    assert bridge.store.get_event(event_id).end is None
    await asyncio.sleep(2)
    assert a_calls(rig) == [("set_power_limit", 6)]
    rig.vtn.cancel_event(event_id)
    await wait_for(lambda: len(calls(rig, "A")) >= 2, 10)
    assert a_calls(rig)[1] == ("clear_power_limit", None)


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
@pytest.mark.parametrize("kind", ["unknown resource", "another VEN", "no supported signal"])
async def test_events_we_cannot_act_on_are_answered_opt_out(rig, bridge, kind):
    s = soon(2)
    args = {"unknown resource": dict(targets=[{"resource_id": "ZZZ"}]),
            "another VEN": dict(targets=[{"ven_id": "SOME-OTHER-VEN"}]),
            "no supported signal": dict(signal_name="ELECTRICITY_PRICE", signal_type="price")}[kind]
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=2), 1)], **args)
    await wait_for(lambda: rig.vtn.responses, 10)
    assert rig.vtn.responses[0]["opt_type"] == "optOut"
    row = bridge.store.get_event(event_id)
    assert row.opt == "optOut" and row.opt_reason
    await asyncio.sleep(3)
    assert rig.sim.limit_calls() == []


@pytest.mark.parametrize("rig", [{"stations": [StationSpec("A", simulator=True, configured_simulator=False)]}],
                         indirect=True)
async def test_refused_clear_falls_back_to_set_max(rig, bridge):
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=2), 2)])
    await wait_for(lambda: len(calls(rig, "A")) >= 3, 20)
    await bridge.engine.settle()
    assert a_calls(rig) == [("set_power_limit", 16), ("clear_power_limit", None), ("set_power_limit", 32)]
    restores = [(a.kind, a.status) for a in bridge.store.actions(event_id) if a.purpose == "restore"]
    assert restores == [("clear_power_limit", "rejected"), ("set_power_limit", "requested")]
    assert bridge.store.session_states(limited_only=True) == []


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_a_rate_limited_set_never_lands_after_the_restore(rig, bridge):
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=2), 2)])
    await wait_for(lambda: rig.vtn.responses, 10)
    rig.sim.faults.methods = ("POST",)
    rig.sim.faults.update(rate_limit_rate=1.0, retry_after_s=5)
    await wait_for(lambda: calls(rig, "A"), 15)  # the first set is answered 429, Retry-After 5 s
    await asyncio.sleep(s.timestamp() + 2.5 - datetime.now(timezone.utc).timestamp())
    rig.sim.faults.update(rate_limit_rate=0.0)
    await wait_for(lambda: any(k == "clear_power_limit" for k, _ in a_calls(rig)), 10)
    await bridge.engine.settle()
    answered = [(r.path.rsplit("/", 1)[1], r.status) for r in rig.sim.requests if r.method == "POST"]
    ok = [kind for kind, status in answered if status and status < 300]
    assert ok == ["clear_power_limit"] or ok == ["set_power_limit", "clear_power_limit"]
    assert answered[-1][0] == "clear_power_limit"
    limit_rows = [a for a in bridge.store.actions(event_id) if a.purpose == "limit"]
    assert limit_rows[0].status in ("skipped", "requested")


@pytest.mark.parametrize("rig", [one_station(dry_run=True)], indirect=True)
async def test_dry_run_plans_everything_and_sends_nothing(rig, bridge):
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=2), 2)])
    await wait_for(lambda: rig.vtn.responses, 10)
    assert rig.vtn.responses[0]["opt_type"] == "optOut"  # dry_run_opt defaults to "out"
    await wait_for(lambda: len(bridge.store.actions(event_id)) >= 2, 15)
    await bridge.engine.settle()
    rows = bridge.store.actions(event_id)
    assert [(a.purpose, a.status, a.limit) for a in rows] == [("limit", "dry_run", 16), ("restore", "dry_run", None)]
    assert rig.sim.limit_calls() == []
    assert rig.vtn.opts == []


@pytest.mark.parametrize("rig", [{"stations": [StationSpec("A"), StationSpec("B")]}], indirect=True)
async def test_modification_that_drops_a_station_restores_it_at_once(rig, bridge):
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=60), 2)],
                                 targets=[{"resource_id": "A"}, {"resource_id": "B"}])
    await wait_for(lambda: calls(rig, "A") and calls(rig, "B"), 15)
    rig.vtn.modify_event(event_id, targets=[{"resource_id": "A"}])
    await wait_for(lambda: len(calls(rig, "B")) >= 2, 10)
    assert calls(rig, "B")[1] == ("clear_power_limit", {})
    assert calls(rig, "A") == [("set_power_limit", {"unit": "current", "limit": 16})]


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_an_event_that_disappears_from_the_vtn_list_counts_as_cancelled(rig, bridge):
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=60), 2)])
    await wait_for(lambda: calls(rig, "A"), 15)
    rig.vtn.remove_event(event_id)
    await wait_for(lambda: len(calls(rig, "A")) >= 2, 10)
    assert a_calls(rig) == [("set_power_limit", 16), ("clear_power_limit", None)]
    assert bridge.store.get_event(event_id).status == "cancelled"


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_an_event_missing_from_one_list_and_then_listed_again_unchanged_is_resumed(rig, bridge):
    """Its absence was taken for a cancellation, but the VTN lists it again, unchanged and not cancelled: to
    the utility it runs, and openleadr answered optIn from its cache, so the bridge must limit again."""
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=60), 2)])
    await wait_for(lambda: calls(rig, "A"), 15)
    rig.vtn.remove_event(event_id)
    await wait_for(lambda: len(calls(rig, "A")) >= 2, 10)
    assert bridge.store.get_event(event_id).status == "cancelled"
    rig.vtn.relist_event(event_id)
    await wait_for(lambda: len(calls(rig, "A")) >= 3, 10)
    assert a_calls(rig) == [("set_power_limit", 16), ("clear_power_limit", None), ("set_power_limit", 16)]
    assert bridge.store.get_event(event_id).status == "active"
    assert [r["opt_type"] for r in rig.vtn.responses if r["event_id"] == event_id][-1] == "optIn"


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_test_events_are_answered_opt_in_and_only_logged(rig, bridge):
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=2), 2)], test_event=True)
    await wait_for(lambda: rig.vtn.responses, 10)
    assert rig.vtn.responses[0]["opt_type"] == "optIn"
    await wait_for(lambda: len(bridge.store.actions(event_id)) >= 2, 15)
    assert [a.status for a in bridge.store.actions(event_id)] == ["dry_run", "dry_run"]
    assert rig.sim.limit_calls() == []


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_randomisation_offset_is_drawn_once_and_delays_the_limit(rig, bridge):
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=30), 2)],
                                 start_after=timedelta(seconds=3))
    await wait_for(lambda: bridge.store.get_event(event_id), 10)
    first = bridge.store.get_event(event_id)
    assert 0 <= first.offset_s <= 3 and first.effective_start == s + timedelta(seconds=first.offset_s)
    rig.vtn.modify_event(event_id, intervals=[(s, timedelta(seconds=30), 1)])
    await wait_for(lambda: bridge.store.get_event(event_id).modification_number == 1, 10)
    assert bridge.store.get_event(event_id).offset_s == first.offset_s
    await wait_for(lambda: calls(rig, "A"), 15)
    sent = [r.at for r in rig.sim.requests if r.path.endswith("set_power_limit")][0]
    assert sent >= first.effective_start.timestamp() - 0.1


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_release_all_never_resends_an_old_limit_on_a_station_it_no_longer_knows(rig, bridge):
    bridge.store.save_session_state("S-GONE", chargestation_id="not-configured", resource_id="X", limited=True,
                                    unit="current", limit=8)
    await bridge.engine.release_all(timeout=2)
    assert [c for c in rig.sim.limit_calls() if c[0] == "S-GONE"] == []
    assert [s.session_id for s in bridge.store.session_states(limited_only=True)] == ["S-GONE"]


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_limits_at_an_interval_start_go_out_before_any_listing_and_a_late_session_follows(rig, bridge):
    start = soon(PREFETCH_S + 3)
    # Long enough that the listing ahead of its end comes after its start.
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(start, timedelta(seconds=PREFETCH_S + 3), 2)])
    first = rig.sessions["A"][0]
    # Once the sessions were listed ahead of the interval, a session starts whose webhook never comes.
    await wait_for(lambda: datetime.now(timezone.utc) > start - timedelta(seconds=PREFETCH_S - 1.5), 15)
    late = rig.sim.start_session(rig.station_ids["A"], send_webhook=False)
    await wait_for(lambda: any(sid == late for sid, _, _ in rig.sim.limit_calls()), 10)

    def listing(r) -> bool:
        return r.method == "GET" and r.path.endswith("/sessions")

    t = start.timestamp()
    assert any(listing(r) and t - PREFETCH_S - 1 < r.at < t - 1 for r in rig.sim.requests)  # the listing ahead
    after = [r for r in rig.sim.requests if r.at >= t]
    assert after and after[0].method == "POST" and after[0].path.endswith(f"{first}/set_power_limit"), [
        (r.method, r.path) for r in after[:3]]  # the limit first, not a listing
    assert any(listing(r) for r in after)  # then a fresh listing, which found the late session
    await wait_for(lambda: [k for _, k, _ in rig.sim.limit_calls()].count("clear_power_limit") == 2, 20)
    await bridge.engine.settle()
    by_session = {sid: [(k, b.get("limit")) for s, k, b in rig.sim.limit_calls() if s == sid] for sid in (first, late)}
    assert by_session == {first: [("set_power_limit", 16), ("set_power_limit", 8), ("clear_power_limit", None)],
                          late: [("set_power_limit", 8), ("clear_power_limit", None)]}
    assert bridge.store.session_states(limited_only=True) == []


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_the_scheduled_passes_run_on_the_engines_own_event_loop(rig, bridge):
    """A boundary's pass is asked for by a scheduler job. Run in a worker thread, its writes to the engine's
    flags could race the engine's loop and lose that pass: the limit or the restore would not go out."""
    threads: list[int] = []
    kick = bridge.engine.kick
    bridge.engine.kick = lambda: threads.append(threading.get_ident()) or kick()
    start = soon(2)
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(start, timedelta(seconds=2), 2)])
    await wait_for(lambda: a_calls(rig) == [("set_power_limit", 16), ("clear_power_limit", None)], 15)
    assert len(threads) >= 2 and set(threads) == {threading.get_ident()}  # the start's and the end's, at least


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_a_cancelled_event_listed_again_does_not_hide_a_new_one(rig, bridge):
    first = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(30), timedelta(seconds=60), 1)])
    await wait_for(lambda: rig.vtn.responses, 10)
    rig.vtn.cancel_event(first)
    await wait_for(lambda: bridge.store.get_event(first).status == "cancelled", 10)
    await asyncio.sleep(1.5)  # the VTN has our confirmation, and openleadr has forgotten its answer
    cancelled_at = bridge.store.get_event(first).updated_at
    rig.vtn.relist_event(first)  # listed again, unchanged, beside a new event
    second = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), timedelta(seconds=30), 2)])
    await wait_for(lambda: calls(rig, "A"), 15)
    assert a_calls(rig) == [("set_power_limit", 16)]
    assert [r["opt_type"] for r in rig.vtn.responses if r["event_id"] == second] == ["optIn"]
    assert bridge.store.get_event(first).updated_at == cancelled_at  # its cancellation, recorded once


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_an_event_the_operator_opted_out_of_stays_opted_out_when_the_vtn_sends_it_again(rig, bridge,
                                                                                                  tmp_path):
    from typer.testing import CliRunner

    from dr_bridge.cli import app
    first = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), timedelta(seconds=60), 2)])
    await wait_for(lambda: calls(rig, "A"), 15)
    result = CliRunner().invoke(app, ["opt-out", first, "--config", str(rig.write_config(tmp_path / "b.toml"))])
    assert result.exit_code == 0, result.output

    def answers():
        return [r["opt_type"] for r in rig.vtn.responses if r["event_id"] == first]

    await wait_for(lambda: answers() == ["optIn", "optOut"], 10)
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(60), timedelta(seconds=60), 1)])  # all sent again
    await wait_for(lambda: len(answers()) >= 3, 10)
    assert answers()[2:] == ["optOut"]


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_an_event_the_vtn_stops_listing_after_its_end_is_completed_not_cancelled(rig, bridge):
    s = soon(2)
    # Opted out (it targets nothing here), so no job of the bridge's own marks its end.
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=2), 2)],
                                 targets=[{"resource_id": "elsewhere"}])
    await wait_for(lambda: rig.vtn.responses, 10)
    await asyncio.sleep((s + timedelta(seconds=2.5) - datetime.now(timezone.utc)).total_seconds())
    assert bridge.store.get_event(event_id).status in ("pending", "active")  # nothing looked since its end
    rig.vtn.remove_event(event_id)  # as a VTN does with a completed event
    await wait_for(lambda: bridge.store.get_event(event_id).status not in ("pending", "active"), 10)
    assert bridge.store.get_event(event_id).status == "completed"


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_a_modification_that_narrows_the_randomisation_window_narrows_the_offset(rig, bridge):
    from dataclasses import replace

    from dr_bridge.domain import Event, SignalInterval
    s = soon(600)
    ev = Event("E-WINDOW", 0, s, s + timedelta(hours=1), [SignalInterval("SIMPLE", "level", s, s + timedelta(hours=1),
                                                                           2.0)], start_after=timedelta(minutes=30))
    bridge.engine.rng.seed(1)  # a draw well inside the 30 minutes
    await bridge.engine.handle_event(ev)
    assert bridge.store.get_event("E-WINDOW").offset_s > 60
    await bridge.engine.handle_event(replace(ev, modification_number=1, start_after=timedelta(seconds=60)))
    assert bridge.store.get_event("E-WINDOW").offset_s <= 60  # escalated: at most its new window late
    await bridge.engine.handle_event(replace(ev, modification_number=2, start_after=timedelta(0)))
    assert bridge.store.get_event("E-WINDOW").offset_s == 0


@pytest.mark.parametrize("rig", [one_station()], indirect=True)
async def test_an_event_that_arrives_while_the_database_is_away_is_handled_when_sent_again(rig, bridge,
                                                                                           monkeypatch):
    import sqlalchemy as sa
    save, failed = bridge.store.save_event, []

    def away_once(*args, **kwargs):
        # The database away at the very moment the event is recorded: a moment no real outage can aim at.
        if not failed:
            failed.append(True)
            raise sa.exc.OperationalError("INSERT INTO event ...", {}, Exception("the server closed the connection"))
        return save(*args, **kwargs)

    monkeypatch.setattr(bridge.store, "save_event", away_once)
    first = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(60), timedelta(seconds=60), 2)])

    def answers():
        return [r["opt_type"] for r in rig.vtn.responses if r["event_id"] == first]

    await wait_for(answers, 10)
    assert answers() == ["optOut"] and bridge.store.get_event(first) is None
    assert first not in bridge.engine.events  # nothing acts on an event it could not record
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(120), timedelta(seconds=60), 1)])  # all sent again
    await wait_for(lambda: len(answers()) >= 2, 10)
    assert answers() == ["optOut", "optIn"] and bridge.store.get_event(first).opt == "optIn"
