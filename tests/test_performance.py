"""Measured reduction maths and the reporting rules that need no peer: pure functions over plain values."""
from datetime import datetime, timedelta, timezone

import pytest

from dr_bridge.domain import Limit, Station
from dr_bridge.performance import HOLD, Sample, limit_kw, mean_power, power_at, reduction
from dr_bridge.reporting import opt_reason, overlapping
from dr_bridge.store import OptOutRow

T0 = datetime(2026, 11, 25, 17, 0, tzinfo=timezone.utc)


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_mean_power_holds_each_reading_until_the_next_and_sums_sessions():
    data = [Sample("S1", t(0), 22.0), Sample("S1", t(10), 11.0),  # S1 halves at 10 s
            Sample("S2", t(5), 4.0)]  # S2 starts reporting at 5 s
    mean = mean_power(data, t(0), t(20))
    assert mean.kw == pytest.approx((22 * 10 + 11 * 10 + 4 * 15) / 20)
    assert (mean.start, mean.end) == (t(0), t(20))


def test_a_reading_is_held_for_at_most_hold_and_an_end_marker_stops_it():
    data = [Sample("S1", t(0), 10.0)]
    hold_s = HOLD.total_seconds()
    mean = mean_power(data, t(0), t(2 * hold_s))
    assert mean.kw == pytest.approx(5.0)  # counted for the first half only
    ended = [Sample("S1", t(0), 10.0), Sample("S1", t(30), 0.0)]
    assert mean_power(ended, t(0), t(60)).kw == pytest.approx(5.0)


def test_the_mean_covers_only_the_time_after_the_first_reading():
    data = [Sample("S1", t(30), 8.0)]
    mean = mean_power(data, t(0), t(60))
    assert mean.kw == pytest.approx(8.0) and mean.start == t(30)
    assert mean_power(data, t(0), t(30)) is None  # nothing of that window is covered
    assert mean_power([], t(0), t(60)) is None


def test_power_at_is_the_sum_of_held_readings_and_none_without_data():
    data = [Sample("S1", t(0), 7.0), Sample("S2", t(1), 3.0), Sample("S2", t(2), 0.0)]
    assert power_at(data, t(1.5)) == pytest.approx(10.0)
    assert power_at(data, t(3)) == pytest.approx(7.0)
    assert power_at(data, t(-1)) is None
    assert power_at(data, t(2) + HOLD) is None  # every reading is stale: no data, not 0 kW


def test_reduction_in_kw_and_percent():
    assert reduction(20.0, 15.0) == (5.0, 25.0)
    assert reduction(0.0, 0.0) == (0.0, None)  # no percentage of nothing
    assert reduction(None, 3.0) == (None, None)


def test_limit_kw_converts_current_and_power():
    station = Station(id="C1", resource_id="R1", max_current=32, phases=3, voltage=230)
    assert limit_kw(Limit("current", 16), station) == pytest.approx(11.04)
    assert limit_kw(Limit("power", 7400), station) == pytest.approx(7.4)
    assert limit_kw(None, station) is None


def window(resource_id: str, start: float, end: float) -> OptOutRow:
    return OptOutRow(resource_id=resource_id, window_start=t(start), window_end=t(end))


def test_availability_windows_apply_to_the_events_they_overlap():
    windows = [window("A", 0, 60), window("B", 100, 200), window("C", 300, 400)]
    assert set(overlapping(windows, t(50), t(150))) == {"A", "B"}
    assert set(overlapping(windows, t(60), t(100))) == set()  # touching is not overlapping
    assert set(overlapping(windows, t(350), None)) == {"C"}  # an open-ended event


@pytest.mark.parametrize("row, expected", [
    (OptOutRow(opt_reason="outageRunStatus", source="automatic"), "outageRunStatus"),
    (OptOutRow(reason="emergency", source="operator"), "emergency"),
    (OptOutRow(reason="the depot floods", source="operator"), "overrideStatus"),
    (OptOutRow(reason="limit refused 4 times", source="automatic"), "notParticipating"),
])
def test_every_opt_goes_out_with_a_schema_valid_reason(row, expected):
    assert opt_reason(row) == expected


def test_the_opt_reasons_are_the_ones_openleadr_accepts():
    from openleadr import enums

    from dr_bridge.reporting import OPT_REASONS

    assert sorted(OPT_REASONS) == sorted(enums.OPT_REASON.values)


def _measured_event(tmp_path, intervals):
    """A completed 30-minute event over one station with a reading a minute from 30 minutes before it: 22 kW
    before, 11 kW during. Returns the config, the store and the time it is now."""
    import sqlalchemy as sa

    from dr_bridge.config import config_from_dict
    from dr_bridge.domain import Event
    from dr_bridge.eventlog import event_to_json
    from dr_bridge.store import EventRow, ReadingRow, Store

    cfg = config_from_dict({"bridge": {"database_url": f"sqlite:///{tmp_path / 'b.db'}"},
                            "vtn": {"url": "http://127.0.0.1:9/OpenADR2/Simple/2.0b", "ven_name": "b"},
                            "chargestations": [{"id": "C1", "max_current": 32}]}, source="test")
    store = Store.for_config(cfg)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    start, end = now - timedelta(minutes=40), now - timedelta(minutes=10)
    ev = Event("E1", 0, start, end, intervals(start, end))
    store.save_event(EventRow(event_id="E1", start=start, effective_start=start, end=end, status="completed",
                              modification_number=0, opt="optIn", event_json=event_to_json(ev)), [])
    readings = [dict(bridge="b", at=start + timedelta(minutes=m), session_id="S1", chargestation_id="C1",
                     power_kw=22.0 if m < 0 else 11.0) for m in range(-30, 31)]
    with store.engine.begin() as conn:
        conn.execute(sa.insert(ReadingRow.__table__), readings)
    return cfg, store, now


async def test_measured_figures_survive_a_restart_after_their_readings_are_pruned(tmp_path):
    """An event with an interval the bridge does not act on (a price) beside its level: after a restart the
    stored rows cover fewer windows than have ended, and the event was measured afresh, from readings the
    retention had pruned by then: baseline, mean and reduction all became null, the proof gone."""
    from dr_bridge.domain import SignalInterval
    from dr_bridge.reporting import Reporter

    cfg, store, now = _measured_event(tmp_path, lambda start, end: [
        SignalInterval("SIMPLE", "level", start, end, 2), SignalInterval("ELECTRICITY_PRICE", "price", start, end, 0.3)])
    await Reporter(cfg, store, ven=None, clock=lambda: now).measure()
    (first,) = store.performance("E1")
    assert (first.baseline_kw, first.mean_kw, first.reduction_kw) == (22.0, 11.0, 11.0)

    store.prune(now)  # the readings are gone, as after readings_retention_days
    await Reporter(cfg, store, ven=None, clock=lambda: now + timedelta(hours=1)).measure()  # a restart
    (again,) = store.performance("E1")
    assert (again.baseline_kw, again.mean_kw, again.reduction_kw) == (22.0, 11.0, 11.0)
    store.close()


async def test_a_site_cap_event_is_measured_per_resource_too(tmp_path):
    """A setpoint caps every targeted station together, so no share of it is a resource's own to request;
    the measured baseline, mean and reduction are the proof all the same (there were none at all)."""
    from dr_bridge.domain import SignalInterval
    from dr_bridge.reporting import Reporter

    cfg, store, now = _measured_event(tmp_path, lambda start, end: [
        SignalInterval("LOAD_CONTROL", "x-loadControlSetpoint", start, end, 11.0)])
    await Reporter(cfg, store, ven=None, clock=lambda: now).measure()
    (row,) = store.performance("E1")
    assert (row.resource_id, row.signal_type, row.baseline_kw, row.mean_kw, row.reduction_kw, row.requested_kw) == (
        "C1", "x-loadControlSetpoint", 22.0, 11.0, 11.0, None)
    store.close()
