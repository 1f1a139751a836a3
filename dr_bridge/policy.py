"""Pure policy: OpenADR signal values -> station budgets -> per-session limits.

No I/O and no clock: the daemon, the dry run and the tests all call the same functions with plain
domain values, so what the bridge would send can be computed and checked anywhere.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from .allocation import Claim, allocate
from .domain import Cap, Limit, LevelRule, PolicySettings, SignalInterval, Station, Unit

S = TypeVar("S")  # whoever asked for a limit (the engine passes the event), handed back with the result

LEVEL = ("SIMPLE", "level")
CAPACITY = ("LOAD_CONTROL", "x-loadControlCapacity")
LEVEL_OFFSET = ("LOAD_CONTROL", "x-loadControlLevelOffset")
PERCENT_OFFSET = ("LOAD_CONTROL", "x-loadControlPercentOffset")
SETPOINTS: frozenset[tuple[str, str]] = frozenset({("LOAD_CONTROL", "x-loadControlSetpoint"),
                                                   ("LOAD_DISPATCH", "setpoint")})
# Signals that set one amount for everything the event targets together, rather than a limit per station.
CAP_SIGNALS: frozenset[tuple[str, str]] = SETPOINTS | {PERCENT_OFFSET}

# OpenADR spells signal names and types case-sensitively; anything else is answered optOut upstream.
SUPPORTED_SIGNALS: frozenset[tuple[str, str]] = frozenset({LEVEL, CAPACITY, LEVEL_OFFSET}) | CAP_SIGNALS

# Float noise (e.g. 5.3 stored as 5.2999999999) must not cost a whole flooring step.
_EPS = 1e-9


class UnsupportedSignal(ValueError):
    """A signal (or a SIMPLE level) the bridge cannot turn into a limit."""


def is_supported(signal_name: str, signal_type: str) -> bool:
    return (signal_name, signal_type) in SUPPORTED_SIGNALS


def is_cap_signal(signal_name: str, signal_type: str) -> bool:
    return (signal_name, signal_type) in CAP_SIGNALS


def unusable(intervals: Iterable[SignalInterval], stations: Sequence[Station],
             settings: PolicySettings) -> str | None:
    """Why no interval of an event can be acted on for these stations (None: at least one can).

    Values are checked when the event arrives, so the VTN hears optOut at once instead of an optIn for an
    event that would then do nothing (a negative level, a value that is not a number).
    """
    problems: list[str] = []
    for iv in intervals:
        try:
            if is_cap_signal(iv.signal_name, iv.signal_type):
                cap_watts(iv, 0.0)
                return None
            if not is_supported(iv.signal_name, iv.signal_type):
                raise UnsupportedSignal(f"unsupported signal {iv.signal_name}/{iv.signal_type}")
            for station in stations:
                station_limit(iv, station, settings)
            return None
        except UnsupportedSignal as exc:
            problems.append(str(exc))
    return "; ".join(dict.fromkeys(problems)) or "no signal"


# --- station budget for one signal interval -------------------------------------------------------


def station_limit(interval: SignalInterval, station: Station, settings: PolicySettings) -> Limit | None:
    """The station's whole budget during `interval`; None means no limit."""
    key = (interval.signal_name, interval.signal_type)
    if key == LEVEL:
        return _level_limit(interval.value, station, settings)
    if key == LEVEL_OFFSET:
        # Levels relative to normal: a negative offset asks for more load, which a limit cannot give.
        if math.isfinite(interval.value) and interval.value < 0:
            return None
        return _level_limit(interval.value, station, settings)
    if key == CAPACITY:
        return _capacity_limit(interval.value, station)
    if key in CAP_SIGNALS:
        raise UnsupportedSignal(f"{interval.signal_type} is a cap over all targeted stations (cap_watts)")
    raise UnsupportedSignal(f"unsupported signal {interval.signal_name}/{interval.signal_type}")


def station_limits(interval: SignalInterval, stations: Iterable[Station],
                   settings: PolicySettings) -> dict[str, Limit | None]:
    """station_limit for each station, by id. A station's budget depends on its size alone (max_current,
    phases, voltage), and a fleet is mostly a few models: for 2,000 stations at an interval start, working
    each size out once took under 1 ms where one by one took 6. Raises UnsupportedSignal as station_limit
    does (for the interval, whatever the station)."""
    by_size: dict[tuple[float, int, float], Limit | None] = {}
    out: dict[str, Limit | None] = {}
    for station in stations:
        size = (station.max_current, station.phases, station.voltage)
        if size not in by_size:
            by_size[size] = station_limit(interval, station, settings)
        out[station.id] = by_size[size]
    return out


def cap_watts(interval: SignalInterval, baseline_w: float) -> float | None:
    """The cap (W) a setpoint or percent-offset interval puts on everything the event targets; None: no cap.

    baseline_w is the targeted stations' power before the event, which a percent offset is relative to.
    """
    key = (interval.signal_name, interval.signal_type)
    value = interval.value
    if not math.isfinite(value):
        raise UnsupportedSignal(f"{interval.signal_type} {value!r} is not a number")
    if key in SETPOINTS:
        if not math.isfinite(value * 1000.0):  # finite in kW, but not in W: read as 0 W, it paused everyone
            raise UnsupportedSignal(f"{interval.signal_type} {value!r} kW is out of range")
        return max(0.0, value * 1000.0)  # kW
    if key == PERCENT_OFFSET:
        # A change from normal: -20 means 20 % below the baseline. An increase cannot be asked of a limit.
        if value >= 0:
            return None
        return max(0.0, baseline_w * (1.0 + value / 100.0))
    raise UnsupportedSignal(f"{interval.signal_name}/{interval.signal_type} is not a cap signal")


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
    # Simulator stations accept only current. While eDRV has not said which kind a station is, it gets the
    # unit its config names (a DC station regulates power; dispatch falls back to current should eDRV
    # refuse it), and with none named, current, which every kind accepts.
    if station.simulator:
        return "current"
    if station.simulator is None:
        return station.limit_unit or "current"
    return station.limit_unit or natural_unit


def in_current(limit: Limit, station: Station) -> Limit:
    """The same limit in A per phase (floored, never above max_current), for a station that refused it in
    power."""
    if limit.unit == "current":
        return limit
    return Limit("current", _floor_in_unit(station, "current", limit.value))


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


def lift_limit(station: Station) -> Limit:
    """The station's maximum, in the unit it is limited in: what lifts a limit where a clear cannot."""
    if send_unit(station, "current") == "power":
        return Limit("power", float(math.floor(station.max_power_w + _EPS)))
    return Limit("current", station.max_current)


def restore_plan(station: Station) -> tuple[str, Limit | None]:
    """How to lift a limit: clear on physical stations, else set the station's maximum (lift_limit)."""
    if station.simulator is False:
        return ("clear", None)
    return ("set", lift_limit(station))


def session_limits(
    budgets: Mapping[str, Sequence[tuple[Limit | None, S]]],
    caps: Sequence[tuple[Cap, S]],
    stations: Mapping[str, Station],
    sessions_by_station: Mapping[str, Sequence[str]],
    settings: PolicySettings,
    weights: Mapping[str, float] | None = None,
) -> dict[str, tuple[Limit | None, S | None]]:
    """session_id -> (limit, who asked) for every running session on a configured station.

    Per station the most restrictive budget is shared equally by its sessions; each cap is then shared by
    every session on its stations, none above its station share; a session keeps the lowest of them.
    """
    result: dict[str, tuple[Limit | None, S | None]] = {}
    for station_id, session_ids in sessions_by_station.items():
        station = stations.get(station_id)
        if station is None or not session_ids:
            continue  # not ours to limit, or nothing to share
        entries = list(budgets.get(station_id, ()))
        budget = most_restrictive([limit for limit, _ in entries], station)
        source = next((src for limit, src in entries if limit == budget), None) if budget is not None else None
        for session_id, limit in share(station, budget, session_ids, settings).items():
            result[session_id] = (limit, source if limit is not None else None)
    for cap, source in caps:
        claims = _claims(cap, stations, sessions_by_station, result, settings, weights or {})
        amps = allocate(cap.watts, claims)
        for claim in claims:
            station = stations[claim.station_id]
            limit = _from_amps(station, amps[claim.session_id])
            current = result[claim.session_id][0]
            if current is None or to_watts(limit, station) < to_watts(current, station):
                result[claim.session_id] = (limit, source)
    return result


def _claims(cap: Cap, stations: Mapping[str, Station], sessions_by_station: Mapping[str, Sequence[str]],
            shares: Mapping[str, tuple[Limit | None, object]], settings: PolicySettings,
            weights: Mapping[str, float]) -> list[Claim]:
    claims = []
    for station_id in sorted(cap.station_ids):
        station = stations.get(station_id)
        session_ids = sessions_by_station.get(station_id) or []
        if station is None or not session_ids:
            continue
        # A session never gets more than its share of the station (with below_min applied): of the
        # station's own budget when a level or capacity signal limits it too, else of max_current.
        whole = share(station, Limit("current", station.max_current), session_ids, settings)
        for session_id in session_ids:
            own = shares[session_id][0] or whole[session_id]
            ceiling = own.value if own.unit == "current" else own.value / station.watts_per_amp
            claims.append(Claim(session_id=session_id, station_id=station_id,
                                watts_per_amp=station.watts_per_amp, ceiling_a=min(ceiling, station.max_current),
                                min_a=0.0 if station.limit_unit == "power" else min(settings.min_current,
                                                                                     station.max_current),
                                priority=station.priority, weight=weights.get(session_id)))
    return claims


def _from_amps(station: Station, amps: float) -> Limit:
    """A cap share (A per phase) in the unit the station is sent; caps are shared as current."""
    unit = send_unit(station, "current")
    if unit == "current":
        return Limit("current", amps)
    return Limit("power", _floor_in_unit(station, "power", amps * station.watts_per_amp))


def desired_limits(
    active_intervals_by_station: dict[str, list[SignalInterval]],
    stations: dict[str, Station],
    sessions_by_station: dict[str, list[str]],
    settings: PolicySettings,
    caps: Sequence[Cap] = (),
) -> dict[str, Limit | None]:
    """session_id -> limit for every running session on a configured station.

    Sessions on stations that are not configured are not ours to limit and are left out.
    """
    budgets = {sid: [(limit, None) for limit in _budgets(intervals, stations[sid], settings)]
               for sid, intervals in active_intervals_by_station.items() if sid in stations}
    plan = session_limits(budgets, [(cap, None) for cap in caps], stations, sessions_by_station, settings)
    return {session_id: limit for session_id, (limit, _) in plan.items()}


def _budgets(
    intervals: Iterable[SignalInterval], station: Station, settings: PolicySettings
) -> list[Limit | None]:
    budgets: list[Limit | None] = []
    for interval in intervals:
        if not is_supported(interval.signal_name, interval.signal_type):
            continue
        if is_cap_signal(interval.signal_name, interval.signal_type):
            continue  # shared over stations: see session_limits
        try:
            budgets.append(station_limit(interval, station, settings))
        except UnsupportedSignal:
            continue
    return budgets
