"""Pure schedule maths over domain.Event: offsets, effective times, active intervals, boundaries.

Time is always passed in, so the scheduler, a restart after a crash and the tests agree on what was
(or should have been) in force at any moment.
"""
from __future__ import annotations

import random
from dataclasses import replace
from datetime import datetime, timedelta

from .domain import ACTIVE, CANCELLED, COMPLETED, PENDING, Event, SignalInterval


def draw_offset(start_after: timedelta, rng: random.Random) -> float:
    """Randomisation offset in seconds, within [0, start_after]; drawn once per event and persisted."""
    window = start_after.total_seconds()
    if window <= 0:
        return 0.0
    return min(window, max(0.0, rng.uniform(0.0, window)))


def _offset(offset_s: float) -> timedelta:
    return timedelta(seconds=offset_s)


def effective_start(event: Event, offset_s: float) -> datetime:
    return event.start + _offset(offset_s)


def effective_end(event: Event, offset_s: float, max_event_hours: float) -> datetime:
    """The moment the event stops limiting; the backstop also caps events that claim to run longer."""
    backstop = effective_start(event, offset_s) + timedelta(hours=max_event_hours)
    if event.end is None:
        return backstop
    return min(event.end + _offset(offset_s), backstop)


def shifted_intervals(event: Event, offset_s: float) -> list[SignalInterval]:
    """The event's intervals moved by the offset; an open interval ends with the event."""
    shift = _offset(offset_s)
    event_end = None if event.end is None else event.end + shift
    shifted = []
    for interval in event.intervals:
        end = event_end if interval.end is None else interval.end + shift
        shifted.append(replace(interval, start=interval.start + shift, end=end))
    return shifted


def active_intervals(
    event: Event, at: datetime, offset_s: float, max_event_hours: float
) -> list[SignalInterval]:
    """Intervals in force at `at` (start inclusive, end exclusive)."""
    if status_at(event, at, offset_s, max_event_hours) != ACTIVE:
        return []
    return [
        interval
        for interval in shifted_intervals(event, offset_s)
        if interval.start <= at and (interval.end is None or at < interval.end)
    ]


def boundaries(event: Event, offset_s: float, max_event_hours: float) -> list[datetime]:
    """Sorted unique times at which the desired limits may change: the scheduler's jobs."""
    if event.cancelled:
        return []
    end = effective_end(event, offset_s, max_event_hours)
    times = {effective_start(event, offset_s), end}  # an interval may begin before the event does
    for interval in shifted_intervals(event, offset_s):
        times.add(interval.start)
        if interval.end is not None:
            times.add(interval.end)
    # Nothing changes after the end: the end itself restores.
    return sorted(t for t in times if t <= end)


def restore_spread(event: Event, restore_spread_s: float, max_s: float = float("inf")) -> timedelta:
    """How long the restore after the end is spread over: restore_spread_s, or the event's recovery period
    when the utility sent a longer one; never more than max_s, whatever the recovery period says."""
    configured = timedelta(seconds=max(0.0, restore_spread_s))
    spread = max(configured, event.recovery or timedelta(0))
    return spread if max_s == float("inf") else min(spread, timedelta(seconds=max(0.0, max_s)))


def staggered_restore_at(end: datetime, spread: timedelta, rank: int, count: int) -> datetime:
    """When the session in place `rank` of `count` is restored: evenly over [end, end + spread), the first
    at the end, so every one is done by end + spread and the load comes back in steps, not one peak."""
    count = max(1, count)
    return end + spread * (min(max(0, rank), count - 1) / count)


def status_at(event: Event, at: datetime, offset_s: float, max_event_hours: float) -> str:
    """pending / active / completed / cancelled, from the clock rather than the VTN's event_status,
    which lags behind and ignores the randomisation offset."""
    if event.cancelled:
        return CANCELLED
    if at < effective_start(event, offset_s):
        return PENDING
    if at < effective_end(event, offset_s, max_event_hours):
        return ACTIVE
    return COMPLETED


def interval_starts(start: datetime, durations: list[timedelta]) -> list[datetime]:
    """Starts of intervals sent without dtstart: each begins where the earlier ones end."""
    starts = []
    current = start
    for duration in durations:
        starts.append(current)
        current += duration
    return starts


def interval_bounds(
    start: datetime, durations: list[timedelta]
) -> list[tuple[datetime, datetime | None]]:
    """(start, end) per interval; a zero duration on the last interval means open-ended (end None)."""
    starts = interval_starts(start, durations)
    bounds: list[tuple[datetime, datetime | None]] = []
    for i, (begin, duration) in enumerate(zip(starts, durations)):
        open_ended = i == len(durations) - 1 and duration == timedelta(0)
        bounds.append((begin, None if open_ended else begin + duration))
    return bounds
