"""Measured load reduction: pure maths over power readings (no I/O, no clock).

eDRV reports each session's power from time to time. Between two reports a session is taken to keep drawing
what it last reported (sample and hold), but for at most `hold`: a session whose reports stop (an end the
bridge never heard of) must not count for ever. The bridge records a 0 kW reading when a session ends.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterable

from dr_bridge.domain import Limit, Station

HOLD = timedelta(minutes=15)


@dataclass(frozen=True)
class Sample:
    """One session's power at one instant."""

    session_id: str
    at: datetime
    kw: float


@dataclass(frozen=True)
class Mean:
    """A time-weighted mean and the part of the asked window that readings covered."""

    kw: float
    start: datetime
    end: datetime


def _by_session(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    sessions: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        sessions[s.session_id].append(s)
    for steps in sessions.values():
        steps.sort(key=lambda s: s.at)
    return sessions


def _held_until(steps: list[Sample], i: int, hold: timedelta) -> datetime:
    until = steps[i].at + hold
    return min(until, steps[i + 1].at) if i + 1 < len(steps) else until


def power_at(samples: Iterable[Sample], at: datetime, hold: timedelta = HOLD) -> float | None:
    """The resource's power at `at`: the sum of every session's held reading; None without any reading
    in the `hold` before `at` (no data, which is not the same as 0 kW)."""
    total, seen = 0.0, False
    for steps in _by_session(samples).values():
        for i, s in enumerate(steps):
            if s.at <= at < _held_until(steps, i, hold):
                total += s.kw
            seen = seen or at - hold < s.at <= at
    return total if seen else None


def mean_power(samples: Iterable[Sample], start: datetime, end: datetime,
               hold: timedelta = HOLD) -> Mean | None:
    """Time-weighted mean power over [start, end].

    Readings only describe time after the first of them (the bridge was down, or just installed), so the
    mean is taken over the covered part; None when nothing of the window is covered.
    """
    samples = list(samples)
    first = min((s.at for s in samples), default=None)
    if first is None:
        return None
    begin = max(start, first)
    if begin >= end:
        return None
    energy = 0.0  # kW*s
    for steps in _by_session(samples).values():
        for i, s in enumerate(steps):
            lo, hi = max(s.at, begin), min(_held_until(steps, i, hold), end)
            if hi > lo:
                energy += s.kw * (hi - lo).total_seconds()
    return Mean(energy / (end - begin).total_seconds(), begin, end)


def reduction(baseline_kw: float | None, mean_kw: float | None) -> tuple[float | None, float | None]:
    """(reduction in kW, in % of the baseline); None where it cannot be known."""
    if baseline_kw is None or mean_kw is None:
        return None, None
    kw = baseline_kw - mean_kw
    return kw, (100.0 * kw / baseline_kw if baseline_kw > 0 else None)


def limit_kw(limit: Limit | None, station: Station) -> float | None:
    """A station limit as real power in kW; None for no limit."""
    if limit is None:
        return None
    watts = limit.value * station.watts_per_amp if limit.unit == "current" else limit.value
    return watts / 1000.0
