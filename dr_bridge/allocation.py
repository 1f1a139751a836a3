"""Sharing one power cap between charging sessions (pure: no I/O, no clock).

A site or feeder cap is shared by water-filling: every session is offered the same power (or the same power
per unit of weight), none gets more than its ceiling, and what one cannot use goes to the others. Priority
tiers are served in order: a higher tier is filled to its ceilings before a lower tier gets more than its
minimum. An AC charger cannot charge below `min_a`, so when the cap cannot give every session its minimum,
the lowest-priority sessions are paused (0 A) instead of everyone getting an unusable current.

Currents are per phase and floored to `step_a`, so the shares never add up to more than the cap.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

# Float noise (e.g. 6.0 computed as 5.9999999) must not cost a whole flooring step.
_EPS = 1e-9


@dataclass(frozen=True)
class Claim:
    """One running session asking for part of a cap."""

    session_id: str
    station_id: str
    watts_per_amp: float  # voltage * phases of its station
    ceiling_a: float  # the most it may get: its share of the station's budget (or of max_current)
    min_a: float = 0.0  # the least it can charge at; 0 for chargers without a minimum (DC)
    priority: int = 0  # higher keeps more power
    weight: float | None = None  # relative need within its tier (e.g. kWh still wanted); None: the tier's mean


def pause_order(claims: Sequence[Claim]) -> list[Claim]:
    """Highest priority first; the fixed tie-break (station, then session id) keeps pauses from flapping."""
    return sorted(claims, key=lambda c: (-c.priority, c.station_id, c.session_id))


def allocate(cap_w: float, claims: Sequence[Claim], step_a: float = 0.1) -> dict[str, float]:
    """session_id -> current (A per phase): 0 (paused) or between its minimum and its ceiling.

    The sum of current * watts_per_amp never exceeds cap_w.
    """
    cap_w = max(0.0, cap_w) if math.isfinite(cap_w) else 0.0
    result = {c.session_id: 0.0 for c in claims}
    lows, highs = {}, {}
    for c in claims:
        highs[c.session_id] = _floor(max(0.0, c.ceiling_a), step_a)
        lows[c.session_id] = min(_ceil(max(0.0, c.min_a), step_a), highs[c.session_id])

    # Who charges at all: the longest run, in priority order, whose minimums fit in the cap together.
    active: list[Claim] = []
    reserved_w = 0.0
    for c in pause_order(claims):
        if highs[c.session_id] <= 0:
            continue  # already off by its station's own limit
        need_w = lows[c.session_id] * c.watts_per_amp
        if reserved_w + need_w > cap_w + _EPS:
            break
        active.append(c)
        reserved_w += need_w

    # Everyone active holds its minimum; the rest goes to the tiers in priority order.
    spare_w = cap_w - reserved_w
    for _, tier_iter in groupby(active, key=lambda c: c.priority):
        tier = list(tier_iter)
        floor_w = sum(lows[c.session_id] * c.watts_per_amp for c in tier)
        watts = _water_fill(tier, lows, highs, floor_w + max(0.0, spare_w))
        spare_w -= sum(watts.values()) - floor_w
        for c in tier:
            amps = _floor(watts[c.session_id] / c.watts_per_amp, step_a)
            # Flooring never takes a session below the minimum it was given (lows are whole steps).
            result[c.session_id] = max(lows[c.session_id], min(amps, highs[c.session_id]))
    return result


def _water_fill(tier: list[Claim], lows: dict[str, float], highs: dict[str, float],
                budget_w: float) -> dict[str, float]:
    """Watts per session: clamp(level * weight, low, high), the level chosen so that they add up to budget_w
    (or everyone at its high when the budget is more than enough)."""
    bounds = {c.session_id: (lows[c.session_id] * c.watts_per_amp, highs[c.session_id] * c.watts_per_amp)
              for c in tier}
    known = [c.weight for c in tier if _usable(c.weight)]
    neutral = sum(known) / len(known) if known else 1.0  # a session with no known need is an average one
    weights = {c.session_id: c.weight if _usable(c.weight) else neutral for c in tier}

    def total(level: float) -> float:
        return sum(min(hi, max(lo, level * weights[sid])) for sid, (lo, hi) in bounds.items())

    if total(math.inf) <= budget_w:
        return {sid: hi for sid, (lo, hi) in bounds.items()}
    # total() is piecewise linear in the level and bends only where a session reaches its low or high.
    points = sorted({b / weights[sid] for sid, pair in bounds.items() for b in pair} | {0.0})
    below = 0.0
    for point in points:
        if total(point) >= budget_w:
            lo_total, hi_total = total(below), total(point)
            level = below if hi_total == lo_total else below + (point - below) * (budget_w - lo_total) / (
                hi_total - lo_total)
            return {sid: min(hi, max(lo, level * weights[sid])) for sid, (lo, hi) in bounds.items()}
        below = point
    return {sid: hi for sid, (lo, hi) in bounds.items()}  # unreachable: total(inf) > budget_w


def _usable(weight: float | None) -> bool:
    return weight is not None and math.isfinite(weight) and weight > 0


def _floor(value: float, step: float) -> float:
    return round(math.floor(value / step + _EPS) * step, 6)


def _ceil(value: float, step: float) -> float:
    return round(math.ceil(value / step - _EPS) * step, 6)
