"""Reporting back to the utility, end to end: the openleadr VTN (with EiOpt and report handlers) and the eDRV
simulator over loopback, the whole bridge, and the `opt-out` command as an operator runs it."""
from __future__ import annotations

import asyncio
import statistics
import time
from datetime import timedelta

import pytest
from openleadr import enums
from typer.testing import CliRunner

from dr_bridge.cli import app
from dr_bridge.daemon import Bridge
from dr_bridge.eventlog import event_detail, iso, parse_iso
from dr_bridge.rig import API_KEY, Rig, StationSpec, wait_for
from tests.test_core import calls, soon

KW_AT_16A = 16 * 230 * 3 / 1000  # 11.04 kW: a 32 A three-phase station at level 2
KW_AT_32A = 32 * 230 * 3 / 1000


@pytest.fixture
async def rig(tmp_path, request):
    spec = getattr(request, "param", None) or {}
    r = Rig(tmp_path, spec.get("stations") or [StationSpec("A"), StationSpec("B", sessions=2)],
            bridge_options=spec.get("bridge", {}), edrv_options=spec.get("edrv", {}),
            vtn_options=spec.get("vtn", {}), telemetry_s=spec.get("telemetry_s"),
            report_interval_s=spec.get("report_interval_s", 1.0))
    await r.start(webhooks=spec.get("webhooks", False))
    yield r
    await r.stop()


@pytest.fixture
async def bridge(rig):
    b = await rig.started_bridge()
    yield b
    await b.stop()


def opts_for(rig: Rig, resource_id: str) -> list[dict]:
    return [o for o in rig.vtn.opts if resource_id in o["resource_ids"]]


def cli(rig: Rig, tmp_path, *args: str):
    config = rig.write_config(tmp_path / "bridge.toml")
    return CliRunner().invoke(app, [*args, "--config", str(config)])


async def limited_then_offline(rig: Rig, bridge: Bridge) -> str:
    """An event limiting A and B, then A offline and reported to the VTN as an outage; the event's id."""
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), timedelta(seconds=60), 2)])
    await wait_for(lambda: calls(rig, "A") and calls(rig, "B"), 15)
    rig.sim.set_online(rig.station_ids["A"], False)
    await wait_for(lambda: opts_for(rig, "A"), 10)
    return event_id


# --- opt-outs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rig", [{"stations": [StationSpec("A", refuse="http"), StationSpec("B")],
                                  "edrv": {"limit_retries": 1}}], indirect=True)
async def test_a_station_that_refuses_its_limit_is_reported_once_and_not_limited_again(rig, bridge):
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), timedelta(seconds=30), 2)])
    await wait_for(lambda: opts_for(rig, "A"), 20)
    await asyncio.sleep(4)  # another limit, or a second opt, would show up by now
    (opt,) = rig.vtn.opts
    assert opt["resource_ids"] == ["A"] and opt["event_id"] == event_id and opt["modification_number"] == 0
    assert (opt["opt_type"], opt["opt_reason"]) == ("optOut", "notParticipating")
    # One try plus limit_retries=1, then only restores (which this charger refuses too, so they repeat).
    limits = [body for kind, body in calls(rig, "A") if kind == "set_power_limit" and body["limit"] != 32]
    assert limits == [{"unit": "current", "limit": 16}] * 2
    assert calls(rig, "B") == [("set_power_limit", {"unit": "current", "limit": 16})]
    (row,) = event_detail(bridge.store, event_id)["opt_outs"]
    assert (row["resource_id"], row["source"], row["sent"], row["acknowledged"]) == ("A", "automatic", True, True)


@pytest.mark.parametrize("rig", [{"webhooks": True}], indirect=True)
async def test_a_station_that_goes_offline_mid_event_is_reported_as_an_outage(rig, bridge):
    event_id = await limited_then_offline(rig, bridge)
    (opt,) = rig.vtn.opts
    assert (opt["event_id"], opt["opt_type"], opt["opt_reason"]) == (event_id, "optOut", "outageRunStatus")
    assert opts_for(rig, "B") == []


@pytest.mark.parametrize("rig", [{"webhooks": True}], indirect=True)
async def test_a_station_offline_before_the_event_is_an_outage_from_its_start(rig, bridge):
    """Offline before the event began, the station was only found out by its refused limit calls, seconds
    later (with real eDRV, after every call timed out), and reported as notParticipating."""
    rig.sim.set_online(rig.station_ids["A"], False)
    await asyncio.sleep(0.5)  # the offline webhook is in
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), timedelta(seconds=60), 2)])
    await wait_for(lambda: opts_for(rig, "A") and calls(rig, "B"), 15)
    assert [(o["event_id"], o["opt_reason"]) for o in opts_for(rig, "A")] == [(event_id, "outageRunStatus")]
    assert not [c for c in calls(rig, "A") if c[0] == "set_power_limit"]  # never tried while offline
    rig.sim.set_online(rig.station_ids["A"], True)
    await wait_for(lambda: ("set_power_limit", {"unit": "current", "limit": 16}) in calls(rig, "A"), 10)


LIMIT_16 = ("set_power_limit", {"unit": "current", "limit": 16})


@pytest.mark.parametrize("rig", [{"webhooks": True}], indirect=True)
async def test_a_station_back_online_keeps_the_operators_opt_out(rig, bridge, tmp_path):
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), timedelta(seconds=60), 2)])
    await wait_for(lambda: calls(rig, "A") and calls(rig, "B"), 15)
    assert cli(rig, tmp_path, "opt-out", event_id, "--resource", "A").exit_code == 0
    await wait_for(lambda: len(calls(rig, "A")) == 2, 10)  # restored at once
    rig.sim.set_online(rig.station_ids["A"], False)
    rig.sim.set_online(rig.station_ids["A"], True)
    await wait_for(lambda: len(calls(rig, "A")) >= 3, 10)  # a reconnected charger is told its state again
    await asyncio.sleep(1)
    await bridge.engine.settle()
    assert LIMIT_16 not in calls(rig, "A")[1:] and calls(rig, "A")[2] == ("clear_power_limit", {})
    assert [o["opt_reason"] for o in opts_for(rig, "A")] == ["overrideStatus"]  # no outage opt on top


@pytest.mark.parametrize("rig", [{"webhooks": True}], indirect=True)
async def test_a_station_offline_across_a_restart_is_limited_again_when_it_is_back(rig, tmp_path):
    first = await rig.started_bridge()
    try:
        event_id = await limited_then_offline(rig, first)
    finally:
        await first.stop()
    again = await rig.started_bridge()
    try:
        await asyncio.sleep(1)  # its first pass: A stays opted out while offline (its restore is refused)
        before = len(calls(rig, "A"))
        rig.sim.set_online(rig.station_ids["A"], True)
        await wait_for(lambda: LIMIT_16 in calls(rig, "A")[before:], 10)
    finally:
        await again.stop()
    assert [o["event_id"] for o in opts_for(rig, "A")] == [event_id]


@pytest.mark.parametrize("rig", [{"webhooks": True}], indirect=True)
async def test_an_operator_opt_out_given_while_the_station_is_offline_stands_when_it_is_back(rig, bridge, tmp_path):
    """The bridge's own outage opt-out must neither swallow the operator's (the command answered "already
    opted out" and recorded nothing) nor take it away when the station returns (it was limited again)."""
    event_id = await limited_then_offline(rig, bridge)
    result = cli(rig, tmp_path, "opt-out", event_id, "--resource", "A")
    assert result.exit_code == 0 and "opt-out recorded" in result.output, result.output
    await wait_for(lambda: [o["opt_reason"] for o in opts_for(rig, "A")] == ["outageRunStatus", "overrideStatus"], 10)
    await wait_for(lambda: all(o.applied for o in bridge.store.opt_outs(event_id)), 5)  # the daemon took it in
    before = len(calls(rig, "A"))
    rig.sim.set_online(rig.station_ids["A"], True)
    await wait_for(lambda: len(calls(rig, "A")) > before, 10)  # a reconnected charger is told its state again
    await asyncio.sleep(1)
    await bridge.engine.settle()
    assert LIMIT_16 not in calls(rig, "A")[before:], calls(rig, "A")


@pytest.mark.parametrize("rig", [{"webhooks": True}], indirect=True)
@pytest.mark.slow  # a restart
async def test_a_station_back_online_is_still_limited_after_a_restart(rig, tmp_path):
    first = await rig.started_bridge()
    try:
        event_id = await limited_then_offline(rig, first)
        before = len(calls(rig, "A"))
        rig.sim.set_online(rig.station_ids["A"], True)
        await wait_for(lambda: LIMIT_16 in calls(rig, "A")[before:], 10)
        await first.engine.settle()
    finally:
        await first.stop()
    before = len(calls(rig, "A"))
    again = await rig.started_bridge()
    try:
        await asyncio.sleep(2)
        await again.engine.settle()
        # Resumed as it was: limited (the limit is sent again, as after any restart), never restored.
        assert ("clear_power_limit", {}) not in calls(rig, "A")[before:], calls(rig, "A")[before:]
        (outage,) = [o for o in event_detail(again.store, event_id)["opt_outs"] if o["resource_id"] == "A"]
        assert "; back online 20" in outage["reason"]  # when it was back, in the event log
    finally:
        await again.stop()


@pytest.mark.slow  # two bridges in turn, each waited on
async def test_an_opt_out_taken_during_a_dry_run_never_reaches_the_vtn(rig, tmp_path):
    dry = Bridge(rig.config(), API_KEY, vtn_backoff_s=0.2, dry_run=True)
    await dry.start()
    try:
        await wait_for(lambda: dry.ven.registered, 15)
        event_id = rig.vtn.add_event(dry.ven.ven_id, intervals=[(soon(2), timedelta(seconds=60), 2)])
        await wait_for(lambda: dry.store.get_event(event_id) is not None, 10)
        assert cli(rig, tmp_path, "opt-out", event_id, "--resource", "A").exit_code == 0
        await asyncio.sleep(3)
    finally:
        await dry.stop()
    real = await rig.started_bridge()  # the same database, run for real now
    try:
        await asyncio.sleep(3)  # the reporter looks every second
        assert rig.vtn.opts == []
        assert [o.sent for o in real.store.opt_outs(event_id)] == [False]
    finally:
        await real.stop()


@pytest.mark.slow  # a restart
async def test_an_opt_out_recorded_while_the_bridge_is_stopped_is_applied_before_its_first_pass(rig, tmp_path):
    first = await rig.started_bridge()
    try:
        event_id = rig.vtn.add_event(first.ven.ven_id, intervals=[(soon(2), timedelta(seconds=60), 2)])
        await wait_for(lambda: calls(rig, "A") and calls(rig, "B"), 15)
        await first.engine.settle()
    finally:
        await first.stop()
    assert cli(rig, tmp_path, "opt-out", event_id).exit_code == 0  # the whole event, the daemon stopped
    before = {r: len(calls(rig, r)) for r in "AB"}
    again = await rig.started_bridge()
    try:
        restored = {r: [("clear_power_limit", {})] * len(rig.sessions[r]) for r in "AB"}  # one per session
        await wait_for(lambda: all(len(calls(rig, r)) - before[r] >= len(restored[r]) for r in "AB"), 10)
        await again.engine.settle()
        # Restored at once: the limits were not sent again first.
        assert {r: calls(rig, r)[before[r]:] for r in "AB"} == restored
    finally:
        await again.stop()


async def test_operator_opt_outs_reach_the_vtn_and_restore_within_5_seconds(rig, bridge, tmp_path):
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=60), 2)])
    await wait_for(lambda: calls(rig, "A") and len(calls(rig, "B")) == 2, 15)

    result = cli(rig, tmp_path, "opt-out", event_id, "--resource", "A")
    t0 = time.monotonic()
    assert result.exit_code == 0, result.output
    await wait_for(lambda: opts_for(rig, "A") and len(calls(rig, "A")) == 2, 5)
    assert time.monotonic() - t0 < 5
    assert calls(rig, "A")[1] == ("clear_power_limit", {})
    (opt,) = rig.vtn.opts
    assert (opt["event_id"], opt["opt_type"], opt["opt_reason"]) == (event_id, "optOut", "overrideStatus")
    assert len(calls(rig, "B")) == 2  # B is still limited

    result = cli(rig, tmp_path, "opt-out", event_id)  # the whole event
    t0 = time.monotonic()
    assert result.exit_code == 0, result.output
    await wait_for(lambda: len(calls(rig, "B")) == 4 and [r["opt_type"] for r in rig.vtn.responses
                                                          if r["event_id"] == event_id] == ["optIn", "optOut"], 5)
    assert time.monotonic() - t0 < 5
    assert calls(rig, "B")[2:] == [("clear_power_limit", {})] * 2
    await bridge.engine.settle()
    row = bridge.store.get_event(event_id)
    assert row.opt == "optOut" and bridge.store.session_states(limited_only=True) == []
    opt_outs = event_detail(bridge.store, event_id)["opt_outs"]
    assert [(o["resource_id"], o["acknowledged"]) for o in opt_outs] == [("A", True), (None, True)]
    assert len(rig.vtn.opts) == 1  # the whole event went as oadrCreatedEvent, not as another opt

    rig.vtn.modify_event(event_id, intervals=[(s, timedelta(seconds=60), 3)])  # does not undo the opt-out
    await wait_for(lambda: len([r for r in rig.vtn.responses if r["event_id"] == event_id]) == 3, 10)
    assert rig.vtn.responses[-1]["opt_type"] == "optOut"
    await asyncio.sleep(1)
    assert len(calls(rig, "A")) == 2 and len(calls(rig, "B")) == 4


async def test_an_unavailability_window_reaches_the_vtn_and_events_in_it_skip_the_resource(rig, bridge, tmp_path):
    start, until = soon(-60), soon(600)
    result = cli(rig, tmp_path, "opt-out", "--resource", "A", "--from", iso(start), "--until", iso(until))
    assert result.exit_code == 0, result.output
    await wait_for(lambda: opts_for(rig, "A"), 5)
    (window,) = rig.vtn.opts
    assert window["event_id"] is None and window["opt_type"] == "optOut"
    assert window["vavailability"] == [{"dtstart": start, "duration": until - start}]

    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), timedelta(seconds=3), 2)])
    await wait_for(lambda: len(calls(rig, "B")) == 4, 15)  # limited and restored
    assert calls(rig, "A") == []
    (skipped,) = event_detail(bridge.store, event_id)["opt_outs"]
    assert skipped["resource_id"] == "A" and skipped["reason"].startswith(f"unavailable from {iso(start)}")
    await wait_for(lambda: [o for o in opts_for(rig, "A") if o["event_id"] == event_id], 5)


async def test_unacknowledged_opts_are_retried_with_backoff_and_survive_a_restart(rig, tmp_path):
    first = await rig.started_bridge()
    event_id = rig.vtn.add_event(first.ven.ven_id, intervals=[(soon(30), timedelta(seconds=30), 2)])
    await wait_for(lambda: first.store.get_event(event_id), 10)
    rig.vtn.refuse_opts(100)
    assert cli(rig, tmp_path, "opt-out", event_id, "--resource", "A").exit_code == 0
    await wait_for(lambda: first.store.opt_outs(event_id)[0].attempts >= 2, 10)
    (row,) = first.store.opt_outs(event_id)
    assert row.sent and not row.acknowledged and rig.vtn.opts == []
    await first.stop()

    rig.vtn.refuse_opts(0)
    second = Bridge(rig.config(), API_KEY, vtn_backoff_s=0.2)
    await second.start()
    try:
        await wait_for(lambda: opts_for(rig, "A"), 10)
        await wait_for(lambda: second.store.opt_outs(event_id)[0].acknowledged, 5)
        assert [(o["event_id"], o["resource_ids"]) for o in rig.vtn.opts] == [(event_id, ["A"])]
    finally:
        await second.stop()


@pytest.mark.parametrize("rig", [{"bridge": {"dry_run": True}}], indirect=True)
async def test_a_dry_run_sends_no_opts(rig, bridge, tmp_path):
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(1), timedelta(seconds=30), 2)])
    await wait_for(lambda: bridge.store.get_event(event_id), 10)
    assert cli(rig, tmp_path, "opt-out", event_id, "--resource", "A").exit_code == 0
    await wait_for(lambda: bridge.store.opt_outs(event_id)[0].applied, 5)
    await asyncio.sleep(2)
    assert rig.vtn.opts == [] and not bridge.store.opt_outs(event_id)[0].sent


# --- the command's input checks -------------------------------------------------------------------------
async def test_opt_out_refuses_bad_input_with_one_line_and_records_nothing(rig, bridge, tmp_path):
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(30), timedelta(seconds=30), 2)],
                                 targets=[{"resource_id": "A"}])
    await wait_for(lambda: bridge.store.get_event(event_id), 10)
    cases = [(["opt-out", "NOPE"], 1, "no event 'NOPE'"),
             (["opt-out"], 2, "exactly one of EVENT_ID"),
             (["opt-out", event_id, "--from", "2026-01-01T00:00:00Z", "--until", "2026-01-02T00:00:00Z"], 2,
              "exactly one of EVENT_ID"),
             (["opt-out", "--from", "2026-01-01T00:00:00Z"], 2, "exactly one of EVENT_ID"),
             (["opt-out", "--from", "yesterday", "--until", "today"], 2, "not ISO 8601"),
             (["opt-out", "--from", "2026-01-02T00:00:00Z", "--until", "2026-01-01T00:00:00Z"], 2, "after --from"),
             (["opt-out", event_id, "--resource", "ZZZ"], 2, "not a configured resource: ZZZ"),
             (["opt-out", event_id, "--resource", "B"], 2, f"event {event_id} does not target B")]
    for args, code, message in cases:
        result = cli(rig, tmp_path, *args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert bridge.store.opt_outs() == []
    assert cli(rig, tmp_path, "opt-out", event_id, "--resource", "A").exit_code == 0
    again = cli(rig, tmp_path, "opt-out", event_id, "--resource", "A")
    assert again.exit_code == 0 and "already opted out" in again.output
    assert len(bridge.store.opt_outs(event_id)) == 1


# --- telemetry -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rig", [{"webhooks": True, "telemetry_s": 1, "vtn": {"telemetry_min_sampling_s": 1}}],
                         indirect=True)
async def test_the_vtn_receives_telemetry_per_resource_matching_the_simulator(rig, bridge):
    assert enums.MEASUREMENTS.REAL_POWER.scale == "none"  # openleadr's shared object is left alone
    offers = {o["resource_id"]: o for o in rig.vtn.report_offers}
    assert set(offers) == {"A", "B"}
    assert {(o["measurement"], o["unit"], o["scale"]) for o in offers.values()} == {("RealPower", "W", "k")}

    def values(resource_id, after=0.0):
        return [(v["at"], v["value"]) for v in rig.vtn.telemetry
                if v["resource_id"] == resource_id and v["at"].timestamp() > after]

    # Until each session's first energy report lands, the bridge can only report the sessions it has heard of.
    every_session = {s for ids in rig.sessions.values() for s in ids}
    await wait_for(lambda: {r.session_id for r in bridge.store.readings()} >= every_session, 15)
    heard_all = time.time() + 0.1
    await wait_for(lambda: len(values("A", heard_all)) >= 4 and len(values("B", heard_all)) >= 4, 15)
    assert rig.sim.station_power_kw(rig.station_ids["A"]) == pytest.approx(KW_AT_32A)
    assert [v for _, v in values("A", heard_all)] == [pytest.approx(KW_AT_32A)] * len(values("A", heard_all))
    assert [v for _, v in values("B", heard_all)] == [pytest.approx(2 * KW_AT_32A)] * len(
        values("B", heard_all))  # two sessions
    times = [at.timestamp() for at, _ in values("A")]
    assert 0.5 < statistics.median(b - a for a, b in zip(times, times[1:])) < 1.5  # the 1 s the VTN asked for

    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(1), timedelta(seconds=60), 2)],
                      targets=[{"resource_id": "A"}])
    await wait_for(lambda: calls(rig, "A"), 10)
    limited_at = time.time() + 2  # the EV follows within a second, the next energy report within another
    await wait_for(lambda: len(values("A", after=limited_at)) >= 2, 10)
    assert rig.sim.station_power_kw(rig.station_ids["A"]) == pytest.approx(KW_AT_16A)
    assert [v for _, v in values("A", after=limited_at)] == [pytest.approx(KW_AT_16A)] * len(
        values("A", after=limited_at))


# --- measured reduction ------------------------------------------------------------------------------------
@pytest.mark.slow  # readings drawn for real minutes' worth of baseline (about 22 s): with the process-level suite
@pytest.mark.parametrize("rig", [{"stations": [StationSpec("A"), StationSpec("U")], "webhooks": True,
                                  "report_interval_s": 0.25, "bridge": {"baseline_minutes": 0.1}}], indirect=True)
async def test_measured_baseline_and_mean_match_the_simulators_drawn_power(rig, bridge, tmp_path):
    s = soon(9)  # the baseline window (6 s) lies after the bridge started receiving energy reports
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=10), 2)],
                                 targets=[{"resource_id": "A"}])
    await wait_for(lambda: (event_detail(bridge.store, event_id) or {}).get("performance"), 30)
    (row,) = event_detail(bridge.store, event_id)["performance"]
    station = rig.station_ids["A"]
    sim_baseline = rig.sim.mean_power_kw(station, parse_iso(row["baseline_start"]), parse_iso(row["baseline_end"]))
    sim_mean = rig.sim.mean_power_kw(station, parse_iso(row["window_start"]), parse_iso(row["window_end"]))
    assert row["resource_id"] == "A" and row["interval_start"] == iso(s)
    assert parse_iso(row["baseline_end"]) == s and parse_iso(row["baseline_start"]) == s - timedelta(seconds=6)
    assert (parse_iso(row["window_start"]), parse_iso(row["window_end"])) == (s, s + timedelta(seconds=10))
    assert row["baseline_kw"] == pytest.approx(sim_baseline, rel=0.05)
    assert row["mean_kw"] == pytest.approx(sim_mean, rel=0.05)
    assert sim_mean < 0.6 * sim_baseline  # the limit did bite, so the comparison means something
    assert row["requested_kw"] == pytest.approx(KW_AT_16A)
    assert row["reduction_kw"] == pytest.approx(row["baseline_kw"] - row["mean_kw"], abs=0.002)
    assert row["reduction_pct"] == pytest.approx(100 * row["reduction_kw"] / row["baseline_kw"], abs=0.1)

    shown = cli(rig, tmp_path, "events", "show", event_id, "--json")
    assert '"performance"' in shown.output and '"baseline_kw"' in shown.output
