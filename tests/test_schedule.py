import random
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings as hsettings, strategies as st

from dr_bridge.domain import Event, SignalInterval
from dr_bridge.schedule import (
    active_intervals,
    boundaries,
    draw_offset,
    effective_end,
    effective_start,
    interval_bounds,
    interval_starts,
    shifted_intervals,
    status_at,
)

T0 = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
MIN = timedelta(minutes=1)
MAX_H = 24


def capacity(start_min: int, end_min: int | None, value: float) -> SignalInterval:
    end = None if end_min is None else T0 + end_min * MIN
    return SignalInterval("LOAD_CONTROL", "x-loadControlCapacity", T0 + start_min * MIN, end, value)


def two_interval_event(**kw) -> Event:
    # 0..15 min at 0.5, 15..30 min at 0.2
    return Event(
        event_id="e1",
        modification_number=0,
        start=T0,
        end=T0 + 30 * MIN,
        intervals=[capacity(0, 15, 0.5), capacity(15, 30, 0.2)],
        **kw,
    )


def open_event(**kw) -> Event:
    return Event("e2", 0, T0, None, [capacity(0, None, 0.3)], **kw)


# --- offsets ------------------------------------------------------------------------------------


def test_draw_offset_zero_window():
    assert draw_offset(timedelta(0), random.Random(1)) == 0.0


def test_draw_offset_is_reproducible_from_the_rng():
    a = draw_offset(timedelta(minutes=2), random.Random(42))
    b = draw_offset(timedelta(minutes=2), random.Random(42))
    assert a == b
    assert 0 <= a <= 120


@given(seconds=st.floats(0, 86_400), seed=st.integers(0, 2**32))
def test_draw_offset_within_window(seconds, seed):
    offset = draw_offset(timedelta(seconds=seconds), random.Random(seed))
    assert 0 <= offset <= seconds


def test_draw_offset_spreads():
    rng = random.Random(7)
    draws = {round(draw_offset(timedelta(minutes=10), rng)) for _ in range(50)}
    assert len(draws) > 10


def test_effective_times_move_by_offset():
    event = two_interval_event()
    assert effective_start(event, 90) == T0 + timedelta(seconds=90)
    assert effective_end(event, 90, MAX_H) == T0 + 30 * MIN + timedelta(seconds=90)


def test_shifted_intervals():
    event = two_interval_event()
    shifted = shifted_intervals(event, 60)
    assert [(i.start, i.end, i.value) for i in shifted] == [
        (T0 + MIN, T0 + 16 * MIN, 0.5),
        (T0 + 16 * MIN, T0 + 31 * MIN, 0.2),
    ]
    # The event itself is not mutated.
    assert event.intervals[0].start == T0


def test_open_interval_ends_with_the_event():
    event = Event("e3", 0, T0, T0 + 60 * MIN, [capacity(0, None, 0.5)])
    assert shifted_intervals(event, 30)[0].end == T0 + 60 * MIN + timedelta(seconds=30)
    assert shifted_intervals(open_event(), 30)[0].end is None


# --- open-ended events and the backstop ---------------------------------------------------------


def test_open_ended_event_ends_at_backstop():
    assert effective_end(open_event(), 60, 2) == T0 + timedelta(hours=2, seconds=60)


def test_closed_event_longer_than_backstop_is_cut():
    event = Event("e4", 0, T0, T0 + timedelta(hours=30), [capacity(0, 30 * 60, 0.5)])
    assert effective_end(event, 0, MAX_H) == T0 + timedelta(hours=24)
    assert status_at(event, T0 + timedelta(hours=25), 0, MAX_H) == "completed"
    assert active_intervals(event, T0 + timedelta(hours=25), 0, MAX_H) == []
    assert boundaries(event, 0, MAX_H) == [T0, T0 + timedelta(hours=24)]


def test_open_ended_event_active_until_backstop():
    event = open_event()
    assert active_intervals(event, T0 + timedelta(hours=5), 0, MAX_H)[0].value == 0.3
    assert active_intervals(event, T0 + timedelta(hours=24), 0, MAX_H) == []
    assert boundaries(event, 0, MAX_H) == [T0, T0 + timedelta(hours=24)]


# --- active intervals ---------------------------------------------------------------------------


def test_active_intervals_start_inclusive_end_exclusive():
    event = two_interval_event()
    assert active_intervals(event, T0 - timedelta(seconds=1), 0, MAX_H) == []
    assert [i.value for i in active_intervals(event, T0, 0, MAX_H)] == [0.5]
    assert [i.value for i in active_intervals(event, T0 + 15 * MIN, 0, MAX_H)] == [0.2]
    assert active_intervals(event, T0 + 30 * MIN, 0, MAX_H) == []


def test_active_intervals_respect_offset():
    event = two_interval_event()
    assert active_intervals(event, T0 + timedelta(seconds=30), 60, MAX_H) == []
    active = active_intervals(event, T0 + 15 * MIN + timedelta(seconds=30), 60, MAX_H)
    assert [i.value for i in active] == [0.5]
    assert active[0].start == T0 + MIN


def test_overlapping_signals_all_active():
    event = Event(
        "e5", 0, T0, T0 + 30 * MIN,
        [capacity(0, 30, 0.5), SignalInterval("SIMPLE", "level", T0 + 10 * MIN, T0 + 20 * MIN, 2)],
    )
    assert len(active_intervals(event, T0 + 12 * MIN, 0, MAX_H)) == 2


def test_cancelled_event_has_nothing_active():
    event = two_interval_event(event_status="cancelled")
    assert active_intervals(event, T0 + MIN, 0, MAX_H) == []
    assert boundaries(event, 0, MAX_H) == []


# --- boundaries ---------------------------------------------------------------------------------


def test_boundaries_sorted_unique_with_offset():
    event = two_interval_event()
    off = timedelta(seconds=45)
    assert boundaries(event, 45, MAX_H) == [T0 + off, T0 + 15 * MIN + off, T0 + 30 * MIN + off]


def test_boundaries_include_gaps_and_event_end():
    event = Event("e6", 0, T0, T0 + 60 * MIN, [capacity(0, 10, 0.5), capacity(20, 30, 0.1)])
    assert boundaries(event, 0, MAX_H) == [T0, T0 + 10 * MIN, T0 + 20 * MIN, T0 + 30 * MIN, T0 + 60 * MIN]


def test_boundaries_include_the_event_start_when_an_interval_begins_before_it():
    # Nothing is active before the event starts, so the limit's start is the event's, not the interval's:
    # without a job then, it waited for the next periodic pass.
    event = Event("e7", 0, T0, T0 + 60 * MIN, [capacity(-5, 25, 0.5)])
    assert T0 in boundaries(event, 0, MAX_H)
    assert boundaries(event, 30, MAX_H)[1] == T0 + timedelta(seconds=30)


# --- status -------------------------------------------------------------------------------------


def test_status_transitions():
    event = two_interval_event()
    offset = 120
    assert status_at(event, T0 - MIN, offset, MAX_H) == "pending"
    assert status_at(event, T0 + MIN, offset, MAX_H) == "pending"  # randomised start not reached
    assert status_at(event, T0 + 2 * MIN, offset, MAX_H) == "active"
    assert status_at(event, T0 + 31 * MIN, offset, MAX_H) == "active"
    assert status_at(event, T0 + 32 * MIN, offset, MAX_H) == "completed"


def test_status_cancelled_wins():
    event = two_interval_event(event_status="cancelled")
    assert status_at(event, T0 - MIN, 0, MAX_H) == "cancelled"
    assert status_at(event, T0 + MIN, 0, MAX_H) == "cancelled"


def test_status_ignores_vtn_far_near():
    event = two_interval_event(event_status="far")
    assert status_at(event, T0 + MIN, 0, MAX_H) == "active"


# --- intervals without dtstart ------------------------------------------------------------------


def test_interval_starts_from_durations():
    assert interval_starts(T0, [15 * MIN, 10 * MIN, 5 * MIN]) == [T0, T0 + 15 * MIN, T0 + 25 * MIN]
    assert interval_starts(T0, []) == []


def test_interval_bounds_last_zero_duration_is_open():
    assert interval_bounds(T0, [15 * MIN, timedelta(0)]) == [(T0, T0 + 15 * MIN), (T0 + 15 * MIN, None)]
    assert interval_bounds(T0, [timedelta(0), 15 * MIN]) == [(T0, T0), (T0, T0 + 15 * MIN)]


@hsettings(max_examples=100)
@given(durations=st.lists(st.integers(1, 7200), min_size=1, max_size=10))
def test_interval_starts_are_contiguous(durations):
    tds = [timedelta(seconds=d) for d in durations]
    bounds = interval_bounds(T0, tds)
    assert bounds[0][0] == T0
    for (_, end), (start, _) in zip(bounds, bounds[1:]):
        assert end == start
    assert bounds[-1][1] == T0 + sum(tds, timedelta(0))
