"""Pure policy: OpenADR signal values -> station budgets -> per-session limits.

No I/O and no clock: the daemon, the dry run and the tests all call the same functions with plain
domain values, so what the bridge would send can be computed and checked anywhere.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from .domain import Limit, LevelRule, PolicySettings, SignalInterval, Station, Unit

# OpenADR spells signal names and types case-sensitively; anything else is answered optOut upstream.
SUPPORTED_SIGNALS: frozenset[tuple[str, str]] = frozenset(
    {("SIMPLE", "level"), ("LOAD_CONTROL", "x-loadControlCapacity")}
)

# Float noise (e.g. 5.3 stored as 5.2999999999) must not cost a whole flooring step.
_EPS = 1e-9


class UnsupportedSignal(ValueError):
    """A signal (or a SIMPLE level) the bridge cannot turn into a limit."""


def is_supported(signal_name: str, signal_type: str) -> bool:
    return (signal_name, signal_type) in SUPPORTED_SIGNALS


# --- station budget for one signal interval -------------------------------------------------------


def station_limit(interval: SignalInterval, station: Station, settings: PolicySettings) -> Limit | None:
    """The station's whole budget during `interval`; None means no limit."""
    key = (interval.signal_name, interval.signal_type)
    if key == ("SIMPLE", "level"):
        return _level_limit(interval.value, station, settings)
    if key == ("LOAD_CONTROL", "x-loadControlCapacity"):
        return _capacity_limit(interval.value, station)
    raise UnsupportedSignal(f"unsupported signal {interval.signal_name}/{interval.signal_type}")


def _level_limit(value: float, station: Station, settings: PolicySettings) -> Limit | None:
    if not math.isfinite(value):
        raise UnsupportedSignal(f"SIMPLE level {value!r} is not a number")
    level = math.floor(value)
    if level < 0:
        raise UnsupportedSignal(f"SIMPLE level {value!r} is negative")
    if level == 0:
        return None
    rule = settings.levels.get(level)
    if rule is not None:
        return _rule_limit(rule, station)
    # An unconfigured level is at least as severe as every configured one below it, so the
    # strictest of those is the safe reading.
    lower = [_rule_limit(r, station) for lvl, r in settings.levels.items() if 1 <= lvl <= level]
    if not lower:
        raise UnsupportedSignal(f"SIMPLE level {level} has no [levels] rule at or below it")
    return most_restrictive(lower, station)


def _rule_limit(rule: LevelRule, station: Station) -> Limit:
    if rule.fraction is not None:
        return Limit("current", _clamp(rule.fraction, 0.0, 1.0) * station.max_current)
    if rule.current is not None:
        return Limit("current", _clamp(rule.current, 0.0, station.max_current))
    if rule.power is not None:
        return Limit("power", _clamp(rule.power, 0.0, station.max_power_w))
    raise UnsupportedSignal("level rule sets none of fraction, current, power")


def _capacity_limit(value: float, station: Station) -> Limit:
    if not math.isfinite(value):
        raise UnsupportedSignal(f"x-loadControlCapacity {value!r} is not a number")
    return Limit("current", _clamp(value, 0.0, 1.0) * station.max_current)


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


# --- combining budgets ----------------------------------------------------------------------------


def to_watts(limit: Limit, station: Station) -> float:
    if limit.unit == "power":
        return limit.value
    return limit.value * station.watts_per_amp


def most_restrictive(limits: Iterable[Limit | None], station: Station) -> Limit | None:
    """The lowest limit in watts, unchanged; None entries mean no limit. Ties keep the first."""
    best: Limit | None = None
    for limit in limits:
        if limit is None:
            continue
        if best is None or to_watts(limit, station) < to_watts(best, station):
            best = limit
    return best


# --- sharing a budget between sessions ------------------------------------------------------------


def send_unit(station: Station, natural_unit: Unit) -> Unit:
    # Simulator stations accept only current, and current is accepted everywhere, so it is also
    # the safe answer while eDRV has not told us which kind the station is.
    if station.simulator is None or station.simulator:
        return "current"
    return station.limit_unit or natural_unit


def share(
    station: Station,
    budget: Limit | None,
    session_ids: Sequence[str],
    settings: PolicySettings,
) -> dict[str, Limit | None]:
    """Split the station budget equally between its running sessions, in input order."""
    if budget is None:
        return {sid: None for sid in session_ids}
    if not session_ids:
        return {}
    unit = send_unit(station, budget.unit)
    per_session_w = max(0.0, to_watts(budget, station)) / len(session_ids)
    limit = _session_limit(station, unit, per_session_w, settings)
    return {sid: limit for sid in session_ids}


def _session_limit(station: Station, unit: Unit, watts: float, settings: PolicySettings) -> Limit:
    value = _floor_in_unit(station, unit, watts)
    if watts > 0 and _below_min(station, unit, value, settings):
        if settings.below_min == "pause":
            return Limit(unit, 0)
        return _min_limit(station, unit, settings)
    return Limit(unit, value)


def _floor_in_unit(station: Station, unit: Unit, watts: float) -> float:
    # Floor, never round: the shares must add up to no more than the budget.
    if unit == "current":
        amps = min(watts / station.watts_per_amp, station.max_current)
        return math.floor(amps * 10 + _EPS) / 10
    return float(math.floor(min(watts, station.max_power_w) + _EPS))


def _below_min(station: Station, unit: Unit, value: float, settings: PolicySettings) -> bool:
    # DC chargers regulate power and have no AC minimum current.
    if station.limit_unit == "power":
        return False
    amps = value if unit == "current" else value / station.watts_per_amp
    return amps < settings.min_current - _EPS


def _min_limit(station: Station, unit: Unit, settings: PolicySettings) -> Limit:
    amps = min(settings.min_current, station.max_current)
    if unit == "current":
        return Limit("current", amps)
    # Rounded up: a power just under the minimum current would still stop an AC charger.
    watts = math.ceil(amps * station.watts_per_amp - _EPS)
    return Limit("power", float(min(watts, math.floor(station.max_power_w + _EPS))))


# --- restoring and the whole pipeline -------------------------------------------------------------


def restore_plan(station: Station) -> tuple[str, Limit | None]:
    """How to lift a limit: clear on physical stations, else set max_current (accepted everywhere)."""
    if station.simulator is False:
        return ("clear", None)
    return ("set", Limit("current", station.max_current))


def desired_limits(
    active_intervals_by_station: dict[str, list[SignalInterval]],
    stations: dict[str, Station],
    sessions_by_station: dict[str, list[str]],
    settings: PolicySettings,
) -> dict[str, Limit | None]:
    """session_id -> limit for every running session on a configured station.

    Sessions on stations that are not configured are not ours to limit and are left out.
    """
    result: dict[str, Limit | None] = {}
    for station_id, session_ids in sessions_by_station.items():
        station = stations.get(station_id)
        if station is None:
            continue
        intervals = active_intervals_by_station.get(station_id, [])
        budget = most_restrictive(_budgets(intervals, station, settings), station)
        result.update(share(station, budget, session_ids, settings))
    return result


def _budgets(
    intervals: Iterable[SignalInterval], station: Station, settings: PolicySettings
) -> list[Limit | None]:
    budgets: list[Limit | None] = []
    for interval in intervals:
        if not is_supported(interval.signal_name, interval.signal_type):
            continue
        try:
            budgets.append(station_limit(interval, station, settings))
        except UnsupportedSignal:
            continue
    return budgets
