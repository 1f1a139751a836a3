from datetime import datetime, timezone

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from dr_bridge.domain import Limit, LevelRule, PolicySettings, SignalInterval, Station
from dr_bridge.policy import (
    SUPPORTED_SIGNALS,
    UnsupportedSignal,
    desired_limits,
    is_supported,
    most_restrictive,
    in_current,
    restore_plan,
    send_unit,
    share,
    station_limit,
    station_limits,
    to_watts,
    unusable,
)

T0 = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)

LEVELS = {1: LevelRule(fraction=0.75), 2: LevelRule(fraction=0.5), 3: LevelRule(current=6)}
SETTINGS = PolicySettings(levels=LEVELS, min_current=6, below_min="min")
PAUSE = PolicySettings(levels=LEVELS, min_current=6, below_min="pause")

AC = Station("ac", "r-ac", max_current=32, phases=3, voltage=230, simulator=False)
ONE_PHASE = Station("one", "r-one", max_current=16, phases=1, voltage=230, simulator=False)
DC = Station("dc", "r-dc", max_current=100, phases=3, voltage=400, limit_unit="power", simulator=False)
SIM = Station("sim", "r-sim", max_current=32, simulator=True, limit_unit="power")
UNKNOWN = Station("unk", "r-unk", max_current=32, simulator=None)
CURRENT_FORCED = Station("cf", "r-cf", max_current=32, limit_unit="current", simulator=False)


def level(value: float) -> SignalInterval:
    return SignalInterval("SIMPLE", "level", T0, None, value)


def capacity(value: float) -> SignalInterval:
    return SignalInterval("LOAD_CONTROL", "x-loadControlCapacity", T0, None, value)


# --- signals ------------------------------------------------------------------------------------


def test_supported_signals_are_case_sensitive():
    assert is_supported("SIMPLE", "level")
    assert is_supported("LOAD_CONTROL", "x-loadControlCapacity")
    assert is_supported("LOAD_CONTROL", "x-loadControlSetpoint")
    assert is_supported("LOAD_DISPATCH", "setpoint")
    assert is_supported("LOAD_CONTROL", "x-loadControlPercentOffset")
    assert is_supported("LOAD_CONTROL", "x-loadControlLevelOffset")
    assert not is_supported("SIMPLE", "LEVEL")
    assert not is_supported("LOAD_DISPATCH", "delta")
    assert not is_supported("LOAD_CONTROL", "x-loadControlSetpoint in A")  # a setpoint in a unit we cannot read
    assert not is_supported("ELECTRICITY_PRICE", "price")
    assert len(SUPPORTED_SIGNALS) == 6


def test_level_zero_means_no_limit():
    assert station_limit(level(0), AC, SETTINGS) is None


def test_levels_map_through_rules():
    assert station_limit(level(1), AC, SETTINGS) == Limit("current", 24)
    assert station_limit(level(2), AC, SETTINGS) == Limit("current", 16)
    assert station_limit(level(3), AC, SETTINGS) == Limit("current", 6)


def test_non_integer_level_rounds_down():
    assert station_limit(level(2.9), AC, SETTINGS) == Limit("current", 16)
    assert station_limit(level(0.5), AC, SETTINGS) is None


def test_power_level_is_power_and_capped_at_station_max():
    s = PolicySettings(levels={1: LevelRule(power=4000), 2: LevelRule(power=1_000_000)})
    assert station_limit(level(1), AC, s) == Limit("power", 4000)
    assert station_limit(level(2), AC, s) == Limit("power", AC.max_power_w)


def test_current_level_never_above_station_max():
    s = PolicySettings(levels={1: LevelRule(current=63)})
    assert station_limit(level(1), ONE_PHASE, s) == Limit("current", 16)


def test_unconfigured_level_uses_most_restrictive_rule_below_it():
    # Level 2 is unconfigured: only level 1 is at or below it.
    s = PolicySettings(levels={1: LevelRule(power=5000), 3: LevelRule(fraction=0.9)})
    assert station_limit(level(2), AC, s) == Limit("power", 5000)
    # Level 3 is unconfigured: the stricter of levels 1 and 2 applies, whatever their order.
    s2 = PolicySettings(levels={2: LevelRule(current=6), 1: LevelRule(fraction=0.75)})
    assert station_limit(level(3), AC, s2) == Limit("current", 6)


def test_level_without_any_rule_at_or_below_is_unsupported():
    s = PolicySettings(levels={3: LevelRule(current=6)})
    with pytest.raises(UnsupportedSignal):
        station_limit(level(1), AC, s)
    with pytest.raises(UnsupportedSignal):
        station_limit(level(-1), AC, SETTINGS)


def test_unsupported_signal_raises():
    with pytest.raises(UnsupportedSignal):
        station_limit(SignalInterval("ELECTRICITY_PRICE", "price", T0, None, 0.3), AC, SETTINGS)


def test_capacity_is_fraction_of_max_current_clamped():
    assert station_limit(capacity(0.5), AC, SETTINGS) == Limit("current", 16)
    assert station_limit(capacity(1.7), AC, SETTINGS) == Limit("current", 32)
    assert station_limit(capacity(-0.2), AC, SETTINGS) == Limit("current", 0)
    assert station_limit(capacity(0), AC, SETTINGS) == Limit("current", 0)


# --- combining ----------------------------------------------------------------------------------


def test_to_watts():
    assert to_watts(Limit("current", 10), AC) == 6900
    assert to_watts(Limit("current", 10), ONE_PHASE) == 2300
    assert to_watts(Limit("power", 5000), AC) == 5000


def test_most_restrictive_across_power_and_current():
    power, current = Limit("power", 4000), Limit("current", 6)  # 6 A x 690 = 4140 W
    assert most_restrictive([current, power, None], AC) is power
    # On one phase 6 A is 1380 W, so the current limit wins there.
    assert most_restrictive([power, None, current], ONE_PHASE) is current


def test_most_restrictive_of_nothing_is_no_limit():
    assert most_restrictive([], AC) is None
    assert most_restrictive([None, None], AC) is None


# --- units --------------------------------------------------------------------------------------


def test_send_unit():
    assert send_unit(SIM, "power") == "current"
    assert send_unit(UNKNOWN, "power") == "current"
    assert send_unit(AC, "power") == "power"
    assert send_unit(AC, "current") == "current"
    assert send_unit(DC, "current") == "power"
    assert send_unit(CURRENT_FORCED, "power") == "current"


def test_a_power_station_of_unknown_kind_gets_power_and_is_lifted_at_its_maximum_power():
    dc = Station("dcu", "r-dcu", max_current=125, phases=1, voltage=400, limit_unit="power", simulator=None)
    assert send_unit(dc, "current") == "power" and send_unit(dc, "power") == "power"
    assert restore_plan(dc) == ("set", Limit("power", 50000))
    # Should eDRV refuse power: the same limit in current, floored, and never above the station's maximum.
    assert in_current(Limit("power", 20000), dc) == Limit("current", 50)
    assert in_current(Limit("power", 90000), dc) == Limit("current", 125)
    assert in_current(Limit("current", 16), dc) == Limit("current", 16)


def test_restore_plan():
    assert restore_plan(AC) == ("clear", None)
    assert restore_plan(SIM) == ("set", Limit("current", 32))
    assert restore_plan(UNKNOWN) == ("set", Limit("current", 32))


# --- sharing ------------------------------------------------------------------------------------


def test_no_budget_means_no_limit_for_every_session():
    assert share(AC, None, ["a", "b"], SETTINGS) == {"a": None, "b": None}


def test_no_sessions_gives_nothing():
    assert share(AC, Limit("current", 16), [], SETTINGS) == {}


def test_zero_budget_turns_every_session_off():
    assert share(AC, Limit("current", 0), ["a", "b"], SETTINGS) == {
        "a": Limit("current", 0),
        "b": Limit("current", 0),
    }
    assert share(DC, Limit("current", 0), ["a"], SETTINGS) == {"a": Limit("power", 0)}


def test_equal_shares_in_input_order():
    result = share(AC, Limit("current", 24), ["z", "a", "m"], SETTINGS)
    assert list(result) == ["z", "a", "m"]
    assert set(result.values()) == {Limit("current", 8)}


def test_flooring_then_below_min():
    # 32 A x 0.5 / 3 sessions = 5.33 A -> floored 5.3 -> below 6 A
    budget = station_limit(level(2), AC, SETTINGS)
    assert share(AC, budget, ["a", "b", "c"], SETTINGS)["a"] == Limit("current", 6)
    assert share(AC, budget, ["a", "b", "c"], PAUSE)["a"] == Limit("current", 0)


def test_flooring_to_tenth_amp_never_rounds_up():
    # 20 A / 3 = 6.666 A -> 6.6, not 6.7
    assert share(AC, Limit("current", 20), ["a", "b", "c"], SETTINGS)["a"] == Limit("current", 6.6)


def test_seven_sessions_on_one_station():
    ids = [f"s{i}" for i in range(7)]
    result = share(AC, Limit("current", 32), ids, SETTINGS)
    assert list(result) == ids
    # 32 / 7 = 4.57 A: below min
    assert set(result.values()) == {Limit("current", 6)}
    big = Station("big", "r-big", max_current=63, simulator=False)
    result = share(big, Limit("current", 63), ids, SETTINGS)
    assert set(result.values()) == {Limit("current", 9)}


def test_one_phase_station_power_budget_to_current():
    forced = Station("one", "r", max_current=16, phases=1, voltage=230, limit_unit="current", simulator=False)
    # 3000 W / 230 V = 13.04 A
    assert share(forced, Limit("power", 3000), ["a"], SETTINGS) == {"a": Limit("current", 13)}


def test_dc_station_gets_whole_watts_and_no_min_current():
    # 2 kW over 3 sessions = 666.67 W each, well under 6 A x 1200 V-phases, but DC has no minimum
    result = share(DC, Limit("power", 2000), ["a", "b", "c"], SETTINGS)
    assert set(result.values()) == {Limit("power", 666)}


def test_dc_station_current_budget_is_sent_as_power():
    # 0.5 x 100 A x 400 V x 3 = 60 kW over 2 sessions
    budget = station_limit(capacity(0.5), DC, SETTINGS)
    assert share(DC, budget, ["a", "b"], SETTINGS) == {"a": Limit("power", 30000), "b": Limit("power", 30000)}


def test_power_level_on_current_forced_station():
    budget = station_limit(level(1), CURRENT_FORCED, PolicySettings(levels={1: LevelRule(power=11000)}))
    assert budget == Limit("power", 11000)
    # 11000 / 690 = 15.94 A -> 15.9
    assert share(CURRENT_FORCED, budget, ["a"], SETTINGS) == {"a": Limit("current", 15.9)}


def test_current_level_on_power_station():
    power_ac = Station("pac", "r", max_current=32, limit_unit="power", simulator=False)
    # 6 A x 690 = 4140 W; limit_unit power also means no min_current
    assert share(power_ac, Limit("current", 6), ["a", "b"], SETTINGS) == {
        "a": Limit("power", 2070),
        "b": Limit("power", 2070),
    }


def test_power_budget_below_min_raised_in_watts():
    # Physical AC station, natural unit power: 2000 W / 690 = 2.9 A -> raised to 6 A = 4140 W
    assert share(AC, Limit("power", 2000), ["a"], SETTINGS) == {"a": Limit("power", 4140)}
    assert share(AC, Limit("power", 2000), ["a"], PAUSE) == {"a": Limit("power", 0)}


def test_simulator_station_always_gets_current():
    budget = Limit("power", 11000)
    assert share(SIM, budget, ["a"], SETTINGS) == {"a": Limit("current", 15.9)}
    assert share(UNKNOWN, budget, ["a"], SETTINGS) == {"a": Limit("current", 15.9)}


def test_min_never_above_station_max():
    tiny = Station("t", "r", max_current=4, simulator=False)
    assert share(tiny, Limit("current", 4), ["a", "b"], SETTINGS) == {
        "a": Limit("current", 4),
        "b": Limit("current", 4),
    }


def test_share_never_above_station_max():
    assert share(AC, Limit("power", 10**9), ["a"], SETTINGS) == {"a": Limit("power", AC.max_power_w)}


# --- pipeline -----------------------------------------------------------------------------------


def test_desired_limits_combines_signals_and_skips_unsupported():
    intervals = {
        "ac": [level(1), capacity(0.25), SignalInterval("ELECTRICITY_PRICE", "price", T0, None, 9)],
        "one": [level(0)],
    }
    stations = {"ac": AC, "one": ONE_PHASE}
    sessions = {"ac": ["a1", "a2"], "one": ["o1"], "elsewhere": ["x"]}
    assert desired_limits(intervals, stations, sessions, SETTINGS) == {
        "a1": Limit("current", 6),  # min(24 A, 8 A) = 8 A / 2 = 4 A -> min
        "a2": Limit("current", 6),
        "o1": None,
    }


def test_desired_limits_skips_unconfigured_level():
    s = PolicySettings(levels={3: LevelRule(current=6)})
    result = desired_limits({"ac": [level(1), capacity(0.5)]}, {"ac": AC}, {"ac": ["a"]}, s)
    assert result == {"a": Limit("current", 16)}


# --- properties ---------------------------------------------------------------------------------

stations_st = st.builds(
    Station,
    id=st.just("p"),
    resource_id=st.just("p"),
    max_current=st.floats(1, 500),
    phases=st.sampled_from([1, 3]),
    voltage=st.floats(100, 480),
    limit_unit=st.sampled_from([None, "current", "power"]),
    simulator=st.sampled_from([None, True, False]),
)
budget_st = st.one_of(
    st.builds(Limit, unit=st.just("current"), value=st.floats(0, 600)),
    st.builds(Limit, unit=st.just("power"), value=st.floats(0, 1_000_000)),
)


def _below(limit: Limit, station: Station, amps: float) -> bool:
    # Whole watts can fall up to 1 W short of a station max that is not a whole number of watts.
    if limit.unit == "power":
        return limit.value < amps * station.watts_per_amp - 1
    return limit.value < amps - 1e-6


@hsettings(max_examples=300, deadline=None)
@given(station=stations_st, budget=budget_st, n=st.integers(1, 12), min_current=st.floats(0, 16))
def test_share_properties(station, budget, n, min_current):
    ids = [str(i) for i in range(n)]
    paused = share(station, budget, ids, PolicySettings(levels={}, min_current=min_current, below_min="pause"))
    raised = share(station, budget, ids, PolicySettings(levels={}, min_current=min_current, below_min="min"))
    unit = send_unit(station, budget.unit)
    floor_a = min(min_current, station.max_current)
    for limits in (paused, raised):
        assert list(limits) == ids
        for limit in limits.values():
            assert limit is not None and limit.unit == unit
            assert 0 <= limit.value
            assert to_watts(limit, station) <= station.max_power_w + 1e-6
            if unit == "current":
                assert limit.value <= station.max_current + 1e-9
            if station.limit_unit != "power":
                assert not (0 < limit.value and _below(limit, station, floor_a))
    # Without raising, the shares never add up to more than the budget.
    assert sum(to_watts(x, station) for x in paused.values()) <= to_watts(budget, station) + 1e-6
    # "min" differs from "pause" only where "pause" stopped a session that had some budget.
    for sid in ids:
        if raised[sid] != paused[sid]:
            assert paused[sid].value == 0 and budget.value > 0
            assert not _below(raised[sid], station, floor_a)


# --- checked on arrival -------------------------------------------------------------------------


def test_an_event_is_unusable_only_when_no_interval_can_be_acted_on():
    price = SignalInterval("ELECTRICITY_PRICE", "price", T0, None, 0.3)
    setpoint = SignalInterval("LOAD_CONTROL", "x-loadControlSetpoint", T0, None, 50.0)
    assert unusable([level(2)], [AC], SETTINGS) is None
    assert unusable([level(0)], [AC], SETTINGS) is None  # level 0 is a valid "no limit"
    assert unusable([level(-1), level(2)], [AC], SETTINGS) is None  # one good interval is enough
    assert unusable([setpoint], [AC], SETTINGS) is None
    assert "negative" in unusable([level(-1)], [AC], SETTINGS)
    assert "not a number" in unusable([level(float("nan")), price], [AC], SETTINGS)
    assert "ELECTRICITY_PRICE/price" in unusable([price], [AC], SETTINGS)
    nan_setpoint = SignalInterval("LOAD_CONTROL", "x-loadControlSetpoint", T0, None, float("inf"))
    assert "not a number" in unusable([nan_setpoint], [AC], SETTINGS)


rule_st = st.one_of(st.builds(LevelRule, fraction=st.floats(0, 1)), st.builds(LevelRule, current=st.floats(0, 80)),
                    st.builds(LevelRule, power=st.floats(0, 100_000)))
fleet_st = st.lists(st.tuples(st.sampled_from([16.0, 32.0, 63.0]), st.sampled_from([1, 3]),
                              st.sampled_from([230.0, 400.0]), st.sampled_from([None, "current", "power"]),
                              st.sampled_from([None, True, False])), min_size=1, max_size=30)


@hsettings(max_examples=300, deadline=None)
@given(fleet=fleet_st, rules=st.dictionaries(st.integers(1, 4), rule_st, max_size=4), fraction=st.floats(0, 1))
def test_station_limits_are_each_stations_own_however_alike_the_fleet(fleet, rules, fraction):
    # Stations of one size share a computation: whatever else differs, each still gets its own station_limit.
    stations = [Station(f"s{i}", f"r{i % 3}", max_current=a, phases=p, voltage=v, limit_unit=u, simulator=sim,
                        priority=i % 2) for i, (a, p, v, u, sim) in enumerate(fleet)]
    settings = PolicySettings(levels=rules, min_current=6)
    intervals = [*(level(float(n)) for n in range(-1, 6)), level(float("nan")), capacity(fraction),
                 SignalInterval("LOAD_CONTROL", "x-loadControlLevelOffset", T0, None, 2),
                 SignalInterval("LOAD_CONTROL", "x-loadControlSetpoint", T0, None, 50),
                 SignalInterval("ELECTRICITY_PRICE", "price", T0, None, 1)]
    for interval in intervals:
        try:
            expected = {s.id: station_limit(interval, s, settings) for s in stations}
        except UnsupportedSignal:
            with pytest.raises(UnsupportedSignal):
                station_limits(interval, stations, settings)
            continue
        assert station_limits(interval, stations, settings) == expected, interval
