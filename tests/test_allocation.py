"""Sharing a site or feeder cap: the pure allocation and the policy around it (properties and examples)."""
from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from dr_bridge.allocation import Claim, allocate
from dr_bridge.domain import Cap, Limit, LevelRule, PolicySettings, SignalInterval, Station
from dr_bridge.policy import (UnsupportedSignal, cap_watts, desired_limits, session_limits, share, station_limit,
                              to_watts)

T0 = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
LEVELS = {1: LevelRule(fraction=0.75), 2: LevelRule(fraction=0.5), 3: LevelRule(current=6)}
SETTINGS = PolicySettings(levels=LEVELS, min_current=6)
STEP = 0.1  # A: currents are floored to this


def ac(sid: str, max_current: float = 32, phases: int = 3, priority: int = 0, **kw) -> Station:
    return Station(sid, f"r-{sid}", max_current=max_current, phases=phases, voltage=230, priority=priority,
                   simulator=kw.pop("simulator", False), **kw)


def interval(name: str, kind: str, value: float) -> SignalInterval:
    return SignalInterval(name, kind, T0, None, value)


def plan(caps, stations, sessions, budgets=None, settings=SETTINGS, weights=None):
    by_id = {s.id: s for s in stations}
    result = session_limits(budgets or {}, [(cap, "cap") for cap in caps], by_id, sessions, settings, weights)
    return {sid: limit for sid, (limit, _) in result.items()}


# --- properties -----------------------------------------------------------------------------------

station_st = st.builds(
    dict,
    max_current=st.sampled_from([6, 10, 16, 20, 32, 40, 63]),
    phases=st.sampled_from([1, 3]),
    voltage=st.sampled_from([220, 230, 240]),
    priority=st.integers(0, 2),
    simulator=st.sampled_from([None, True, False]),
    sessions=st.integers(0, 4),
)


@hsettings(max_examples=400, deadline=None)
@given(specs=st.lists(station_st, min_size=1, max_size=6), cap_kw=st.floats(0, 250),
       min_current=st.sampled_from([0.0, 6.0, 8.0]), below_min=st.sampled_from(["min", "pause"]))
def test_cap_properties(specs, cap_kw, min_current, below_min):
    settings = PolicySettings(levels={}, min_current=min_current, below_min=below_min)
    stations = [Station(f"st{i}", f"r{i}", max_current=x["max_current"], phases=x["phases"], voltage=x["voltage"],
                        priority=x["priority"], simulator=x["simulator"]) for i, x in enumerate(specs)]
    sessions = {s.id: [f"{s.id}-s{j}" for j in range(x["sessions"])] for s, x in zip(stations, specs)}
    by_id = {s.id: s for s in stations}
    station_of = {sid: by_id[st_id] for st_id, ids in sessions.items() for sid in ids}
    cap_w = cap_kw * 1000
    limits = plan([Cap(cap_w, frozenset(by_id))], stations, sessions, settings=settings)

    # Every limit is a current (the stations regulate current) and they never add up to more than the cap.
    assert set(limits) == set(station_of)
    assert all(limit is not None and limit.unit == "current" for limit in limits.values())
    amps = {sid: limit.value for sid, limit in limits.items()}
    used_w = sum(amps[sid] * station_of[sid].watts_per_amp for sid in amps)
    assert used_w <= cap_w + 1e-6

    # None above its station share, and nothing between 0 and the minimum current.
    ceiling = {}
    for st_id, ids in sessions.items():
        for sid, own in share(by_id[st_id], Limit("current", by_id[st_id].max_current), ids, settings).items():
            ceiling[sid] = own.value
    for sid, a in amps.items():
        assert a <= ceiling[sid] + 1e-9
        assert a == 0 or a >= min(min_current, station_of[sid].max_current) - 1e-9
        assert math.isclose(a * 10, round(a * 10), abs_tol=1e-6), "floored to 0.1 A"

    active = [sid for sid in amps if amps[sid] > 0]
    # Among sessions charging, equal priority and equal maxima mean equal limits (within the flooring step).
    for x in active:
        for y in active:
            sx, sy = station_of[x], station_of[y]
            if (sx.priority, sx.watts_per_amp, ceiling[x]) == (sy.priority, sy.watts_per_amp, ceiling[y]):
                assert abs(amps[x] - amps[y]) <= STEP + 1e-9

    # Pauses go by priority: a session is paused only if every lower-priority one is paused too.
    for x in amps:
        if amps[x] == 0 and ceiling[x] > 0:
            assert all(amps[y] == 0 for y in amps if station_of[y].priority < station_of[x].priority
                       and ceiling[y] > 0)
    # A lower tier gets more than its minimum only once every higher tier is full.
    for y in active:
        if amps[y] > max(min_current, 0) + STEP + 1e-9:
            for x in active:
                if station_of[x].priority > station_of[y].priority:
                    assert amps[x] >= ceiling[x] - STEP - 1e-9

    # Unused cap is at most one minimum-current step plus one flooring step per session while a session
    # is below its maximum.
    if any(amps[sid] < ceiling[sid] - 1e-9 for sid in amps):
        min_step_w = max((min_current * s.watts_per_amp for s in station_of.values()), default=0)
        flooring_w = sum(STEP * station_of[sid].watts_per_amp for sid in amps)
        assert cap_w - used_w <= min_step_w + flooring_w + 1e-6


@hsettings(max_examples=200, deadline=None)
@given(cap_w=st.floats(0, 200_000), n=st.integers(1, 10), weights=st.lists(st.floats(0.5, 60), min_size=10,
                                                                              max_size=10))
def test_weights_never_break_the_cap_or_the_bounds(cap_w, n, weights):
    claims = [Claim(f"s{i}", "st", 690, ceiling_a=32, min_a=6, weight=weights[i]) for i in range(n)]
    amps = allocate(cap_w, claims)
    assert sum(a * 690 for a in amps.values()) <= cap_w + 1e-6
    assert all(a == 0 or 6 <= a <= 32 for a in amps.values())


# --- examples -------------------------------------------------------------------------------------

def test_fifty_kw_over_eight_sessions_then_a_ninth():
    stations = [ac(f"st{i}") for i in range(4)]
    sessions = {s.id: [f"{s.id}-a", f"{s.id}-b"] for s in stations}
    cap = Cap(50_000, frozenset(s.id for s in stations))
    # 50 kW / 8 = 6.25 kW = 9.06 A at 690 W/A -> 9.0 A each
    assert set(plan([cap], stations, sessions).values()) == {Limit("current", 9.0)}
    sessions["st0"].append("st0-c")
    # 50 kW / 9 = 5.56 kW = 8.05 A -> 8.0 A; the station with three sessions has room for 10.6 A each
    limits = plan([cap], stations, sessions)
    assert set(limits.values()) == {Limit("current", 8.0)}
    assert sum(to_watts(x, stations[0]) for x in limits.values()) <= 50_000


def test_what_one_session_cannot_use_goes_to_the_others():
    small = ac("small", max_current=10)
    big = ac("big", max_current=32)
    # 30 kW: an equal share would be 21.7 A each, but the small station takes 10 A (6.9 kW) and the big
    # one the rest: 23.1 kW = 33.5 A, capped at its 32 A.
    limits = plan([Cap(30_000, frozenset({"small", "big"}))], [small, big], {"small": ["x"], "big": ["y"]})
    assert limits == {"x": Limit("current", 10), "y": Limit("current", 32)}
    limits = plan([Cap(20_000, frozenset({"small", "big"}))], [small, big], {"small": ["x"], "big": ["y"]})
    assert limits == {"x": Limit("current", 10), "y": Limit("current", 18.9)}  # 13.1 kW / 690 = 18.98


def test_too_small_a_cap_pauses_the_lowest_priority_instead_of_starving_everyone():
    stations = [ac("low", priority=0), ac("high", priority=2), ac("mid", priority=1)]
    sessions = {"low": ["l1"], "high": ["h1"], "mid": ["m1"]}
    # 10 kW cannot give three sessions 6 A (4.14 kW each) but can give two.
    limits = plan([Cap(10_000, frozenset(sessions))], stations, sessions)
    assert limits["l1"] == Limit("current", 0)
    assert limits["h1"].value >= 6 and limits["m1"].value >= 6
    # Priority tiers: the high session is filled first; the middle one keeps its minimum.
    assert limits == {"l1": Limit("current", 0), "h1": Limit("current", 8.4), "m1": Limit("current", 6)}


def test_a_lower_priority_session_never_charges_while_a_higher_one_is_paused():
    stations = [ac("high", priority=1), ac("low", phases=1)]
    sessions = {"high": ["h1", "h2"], "low": ["l1"]}
    # 7 kW gives one three-phase session its 6 A (4.14 kW) but not two; the leftover 2.86 kW would give the
    # one-phase session 6 A (1.38 kW), yet it is paused: it ranks below the paused h2.
    limits = plan([Cap(7_000, frozenset(sessions))], stations, sessions)
    assert limits == {"h1": Limit("current", 10.1), "h2": Limit("current", 0), "l1": Limit("current", 0)}


def test_equal_priority_pauses_by_a_fixed_tie_break():
    stations = [ac("b"), ac("a")]
    sessions = {"b": ["b1"], "a": ["a1"]}
    for _ in range(3):  # the same session every time, so pauses do not flap between passes
        assert plan([Cap(5_000, frozenset(sessions))], stations, sessions) == {
            "a1": Limit("current", 7.2), "b1": Limit("current", 0)}


def test_cap_and_level_together_respect_both():
    stations = [ac("lvl"), ac("free")]
    sessions = {"lvl": ["l1"], "free": ["f1"]}
    budgets = {"lvl": [(station_limit(interval("SIMPLE", "level", 3), stations[0], SETTINGS), "level")],
               "free": []}
    result = session_limits(budgets, [(Cap(30_000, frozenset(sessions)), "cap")], {s.id: s for s in stations},
                            sessions, SETTINGS)
    # The level holds l1 at 6 A; the cap's remainder (30 kW - 4.14 kW) goes to f1, capped at 32 A.
    assert result == {"l1": (Limit("current", 6), "level"), "f1": (Limit("current", 32), "cap")}
    # 8 kW cannot give both their 6 A (2 x 4.14 kW): one is paused (by the tie-break: station "free" sorts
    # first), and the other gets the whole cap, still within its station share.
    result = session_limits(budgets, [(Cap(8_000, frozenset(sessions)), "cap")], {s.id: s for s in stations},
                            sessions, SETTINGS)
    assert result == {"l1": (Limit("current", 0), "cap"), "f1": (Limit("current", 11.5), "cap")}


def test_two_caps_each_hold():
    stations = [ac("a"), ac("b")]
    sessions = {"a": ["a1"], "b": ["b1"]}
    site = Cap(20_000, frozenset({"a", "b"}))
    feeder = Cap(5_000, frozenset({"a"}))
    limits = plan([site, feeder], stations, sessions)
    assert limits["a1"] == Limit("current", 7.2)  # 5 kW / 690
    assert to_watts(limits["a1"], stations[0]) + to_watts(limits["b1"], stations[1]) <= 20_000


def test_dc_station_gets_power_and_simulators_get_current():
    dc = Station("dc", "r-dc", max_current=100, phases=3, voltage=400, limit_unit="power", simulator=False)
    sim = ac("sim", simulator=True, limit_unit="power")
    limits = plan([Cap(20_000, frozenset({"dc", "sim"}))], [dc, sim], {"dc": ["d1"], "sim": ["s1"]})
    assert limits["d1"].unit == "power" and limits["s1"].unit == "current"
    assert limits["d1"].value + limits["s1"].value * sim.watts_per_amp <= 20_000


def test_energy_need_weighting_gives_more_to_the_session_that_needs_more():
    stations = [ac("a"), ac("b"), ac("c")]
    sessions = {"a": ["a1"], "b": ["b1"], "c": ["c1"]}
    limits = plan([Cap(30_000, frozenset(sessions))], stations, sessions, weights={"a1": 30, "b1": 10})
    # c1 reported no target: it counts as an average need (20).
    assert limits["a1"].value > limits["c1"].value > limits["b1"].value >= 6
    assert sum(x.value * 690 for x in limits.values()) <= 30_000


def test_sessions_off_by_their_own_station_limit_do_not_block_others():
    stations = [ac("off"), ac("on")]
    sessions = {"off": ["o1"], "on": ["n1"]}
    budgets = {"off": [(Limit("current", 0), "capacity")], "on": []}
    limits = plan([Cap(10_000, frozenset(sessions))], stations, sessions, budgets=budgets)
    assert limits == {"o1": Limit("current", 0), "n1": Limit("current", 14.4)}


def test_desired_limits_accepts_caps():
    stations = {"a": ac("a")}
    assert desired_limits({"a": []}, stations, {"a": ["x", "y"]}, SETTINGS, caps=[Cap(11_040, frozenset({"a"}))]) \
        == {"x": Limit("current", 8), "y": Limit("current", 8)}


# --- the signals that carry a cap -----------------------------------------------------------------

def test_setpoints_are_kw():
    assert cap_watts(interval("LOAD_CONTROL", "x-loadControlSetpoint", 50), 0) == 50_000
    assert cap_watts(interval("LOAD_DISPATCH", "setpoint", 12.5), 0) == 12_500
    assert cap_watts(interval("LOAD_DISPATCH", "setpoint", -3), 0) == 0
    with pytest.raises(UnsupportedSignal, match="out of range"):  # 1e306 kW overflowed to inf W, read as 0 W
        cap_watts(interval("LOAD_CONTROL", "x-loadControlSetpoint", 1e306), 0)


def test_percent_offset_is_relative_to_the_baseline():
    assert cap_watts(interval("LOAD_CONTROL", "x-loadControlPercentOffset", -20), 40_000) == pytest.approx(32_000)
    assert cap_watts(interval("LOAD_CONTROL", "x-loadControlPercentOffset", -150), 40_000) == 0
    assert cap_watts(interval("LOAD_CONTROL", "x-loadControlPercentOffset", 10), 40_000) is None  # an increase
    with pytest.raises(UnsupportedSignal):
        cap_watts(interval("LOAD_CONTROL", "x-loadControlPercentOffset", float("nan")), 40_000)


def test_level_offset_goes_through_levels():
    station = ac("a")
    kind = ("LOAD_CONTROL", "x-loadControlLevelOffset")
    assert station_limit(interval(*kind, 2), station, SETTINGS) == Limit("current", 16)
    assert station_limit(interval(*kind, 0), station, SETTINGS) is None
    assert station_limit(interval(*kind, -1), station, SETTINGS) is None  # more load: nothing to limit


def test_cap_signals_are_not_station_limits():
    with pytest.raises(UnsupportedSignal):
        station_limit(interval("LOAD_CONTROL", "x-loadControlSetpoint", 50), ac("a"), SETTINGS)
