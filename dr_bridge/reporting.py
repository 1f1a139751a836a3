"""Reporting back to the utility: opt-outs to the VTN, telemetry values, and the measured reduction.

The engine records opt-outs (operator or automatic) in the opt_outs table; the Reporter sends every row the
VTN has not acknowledged, retrying with backoff, so a restart still sends what an earlier run could not.
Once an interval is over the Reporter also works out, per resource, what the fleet really drew against its
baseline (performance.py has the maths) and keeps it in the performance table as the event's proof.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Iterable

from dr_bridge import schedule
from dr_bridge.domain import ACTIVE, CANCELLED, COMPLETED, Event, PolicySettings, SignalInterval, Station
from dr_bridge.eventlog import event_from_json, iso
from dr_bridge.performance import HOLD, Sample, limit_kw, mean_power, power_at, reduction
from dr_bridge.policy import UnsupportedSignal, is_cap_signal, station_limit
from dr_bridge.store import EventRow, OptOutRow, PerformanceRow, ReadingRow, Store, utcnow
from dr_bridge.targets import select_stations

log = logging.getLogger("dr_bridge.reporting")

# The schema's optReason values (oadr_ei: OptReasonEnumeratedType); only openadr.py talks openleadr.
OPT_REASONS = ("economic", "emergency", "mustRun", "notParticipating", "outageRunStatus", "overrideStatus",
               "participating", "x-schedule")
GIVE_UP_AFTER = timedelta(days=1)  # an opt the VTN refused for a day is about an event long over


def opt_reason(row: OptOutRow) -> str:
    """The OpenADR optReason a row is sent with."""
    if row.opt_reason in OPT_REASONS:
        return row.opt_reason
    if row.reason in OPT_REASONS:
        return row.reason
    return "overrideStatus" if row.source == "operator" else "notParticipating"


def overlapping(windows: Iterable[OptOutRow], start: datetime, end: datetime | None) -> dict[str, OptOutRow]:
    """resource_id -> the first unavailability window that overlaps [start, end) (end None: open-ended)."""
    found: dict[str, OptOutRow] = {}
    for w in windows:
        if w.resource_id and w.window_start and w.window_end and w.window_end > start \
                and (end is None or w.window_start < end):
            found.setdefault(w.resource_id, w)
    return found


def samples(rows: Iterable[ReadingRow], stations: dict[str, Station]) -> list[Sample]:
    """Readings as kW samples; a reading with only a current is converted with the station's wiring."""
    out = []
    for r in rows:
        kw = r.power_kw
        if kw is None and r.current_a is not None and r.chargestation_id in stations:
            kw = r.current_a * stations[r.chargestation_id].watts_per_amp / 1000.0
        if kw is not None:
            out.append(Sample(r.session_id, r.at, kw))
    return out


def resource_power_kw(store: Store, stations: list[Station], resource_id: str,
                      now: Callable[[], datetime] = utcnow) -> float | None:
    """The resource's real power now, from the stored readings (the telemetry value); None: no data."""
    mine = {s.id: s for s in stations if s.resource_id == resource_id}
    at = now()
    return power_at(samples(store.readings_between(mine, at - HOLD, at), mine), at)


@dataclass(frozen=True)
class _Window:
    interval: SignalInterval  # as the VTN sent it
    start: datetime  # when it was in force
    end: datetime


def _windows(row: EventRow, ev: Event, max_event_hours: float) -> list[_Window]:
    """Each interval's time in force: offset applied, capped by the backstop, cut short by a cancellation."""
    stop = schedule.effective_end(ev, row.offset_s, max_event_hours)
    if row.status == CANCELLED:
        stop = min(stop, row.updated_at)
    out = []
    for original, shifted in zip(ev.intervals, schedule.shifted_intervals(ev, row.offset_s)):
        end = min(shifted.end or stop, stop)
        if shifted.start < end:
            out.append(_Window(original, shifted.start, end))
    return out


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


class Reporter:
    """Sends opt-outs to the VTN and measures each finished interval. Start it after the VEN."""

    def __init__(self, cfg, store: Store, ven, *, dry_run: bool = False, tick_s: float = 1.0,
                 settle_s: float = 3.0, backoff_initial_s: float = 2.0, backoff_max_s: float = 300.0,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.cfg = cfg
        self.store = store
        self.ven = ven
        self.dry_run = dry_run or cfg.bridge.dry_run
        self.stations: list[Station] = cfg.stations()
        self.settings: PolicySettings = cfg.policy()
        self.tick_s = tick_s
        self.settle_s = settle_s  # readings trail the moment they describe
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self._next_try: dict[int, float] = {}  # opt row id -> monotonic time of its next attempt
        self._given_up: set[int] = set()
        self._measured: dict[str, tuple[int, int]] = {}  # event_id -> (modification, windows measured)
        self._done: set[str] = set()  # events whose every interval is measured
        self._first_pass = True
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        if self.dry_run:
            log.info("dry run: opt-outs are recorded but not sent to the VTN")
        self._task = asyncio.create_task(self._loop(), name="reporter")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            for step in (self.send_opts, self.measure):
                try:
                    await step()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("reporting step %s failed; will retry", step.__name__)
            await asyncio.sleep(self.tick_s)

    # --- opt-outs to the VTN -----------------------------------------------------------------------------
    async def send_opts(self) -> None:
        if self.dry_run or not self.ven.registered:
            return
        for row in self.store.opt_outs(unacknowledged=True):
            if row.id in self._given_up or self._next_try.get(row.id, 0.0) > time.monotonic():
                continue
            event = self.store.get_event(row.event_id) if row.event_id else None
            if event is not None and event.dry_run:
                # Taken during a dry run (which sends the VTN nothing): a later real run must not send it.
                log.info("opt-out %d belongs to dry-run event %s: not sent", row.id, row.event_id)
                self._given_up.add(row.id)
                continue
            if event is not None and row.resource_id is None and event.status == COMPLETED and \
                    event.end is not None and row.at >= event.end:
                # Taken after the event was over (release-all during its staggered restore): the VTN no
                # longer counts the event, so there is nothing to tell it; the event log keeps the row.
                log.info("opt-out %d of event %s came after its end: not sent", row.id, row.event_id)
                self._given_up.add(row.id)
                continue
            if row.at < self.clock() - GIVE_UP_AFTER:
                log.error("opt-out %d (event %s, resource %s) was never acknowledged by the VTN; giving up",
                          row.id, row.event_id, row.resource_id)
                self._given_up.add(row.id)
                continue
            try:
                acknowledged, what = await self._send(row, event)
            except Exception:  # counted as a failed attempt, so a bad row cannot spin
                log.exception("sending opt-out %d failed", row.id)
                acknowledged, what = False, f"opt-out {row.id}"
            attempts = row.attempts + 1
            self.store.update_opt_out(row.id, sent=True, acknowledged=acknowledged, attempts=attempts)
            if acknowledged:
                self._next_try.pop(row.id, None)
                log.info("VTN acknowledged %s", what)
                continue
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempts - 1))
            delay = random.uniform(delay / 2, delay)
            self._next_try[row.id] = time.monotonic() + delay
            log.warning("VTN did not acknowledge %s (attempt %d); retrying in %.0f s", what, attempts, delay)

    async def _send(self, row: OptOutRow, event: EventRow | None) -> tuple[bool, str]:
        reason = opt_reason(row)
        opt_id = f"dr-bridge-opt-{row.id}"
        if row.event_id is None:
            what = f"unavailability of {row.resource_id} from {iso(row.window_start)} until {iso(row.window_end)}"
            return await self.ven.send_availability(row.resource_id, row.window_start, row.window_end, reason,
                                                    opt_id=opt_id), what
        # The VTN judges an opt against the event as it is now, so a later modification number wins.
        number = max(row.modification_number or 0, event.modification_number if event else 0)
        if number != row.modification_number:
            self.store.update_opt_out(row.id, modification_number=number)
        if row.resource_id is None:
            what = f"optOut of the whole event {row.event_id} (oadrCreatedEvent)"
            return await self.ven.send_created_event(row.event_id, number, "optOut"), what
        what = f"optOut of {row.resource_id} in event {row.event_id} ({reason})"
        return await self.ven.send_opt(row.event_id, number, row.resource_id, reason, opt_id=opt_id), what

    # --- measured reduction ------------------------------------------------------------------------------
    async def measure(self) -> None:
        """Measure every interval that ended at least settle_s ago and is not measured yet."""
        now = self.clock()
        # After a start, look back as far as readings are kept; then a day is plenty.
        days = self.cfg.bridge.readings_retention_days if self._first_pass else 1
        self._first_pass = False
        for row in self.store.events(statuses=[ACTIVE, COMPLETED, CANCELLED], since=now - timedelta(days=days)):
            if row.event_id not in self._done:
                # Seconds of work at thousands of stations, due just after a boundary: off the event loop,
                # which is sending that boundary's limits.
                await asyncio.to_thread(self._measure_event, row, now)

    def _measure_event(self, row: EventRow, now: datetime) -> None:
        ev = event_from_json(row.event_json)
        windows = _windows(row, ev, self.cfg.bridge.max_event_hours)
        ended = [w for w in windows if w.end + timedelta(seconds=self.settle_s) <= now]
        key = (row.modification_number, len(ended))
        if ended and self._measured.get(row.event_id) != key:
            # A window measured once keeps its figures (after a restart too): its readings may have been
            # pruned since, and the stored figures are the proof. A modification changes the schedule, so it
            # is measured afresh.
            stored = self.store.performance(row.event_id)
            kept = [p for p in stored if p.modification_number == row.modification_number]
            done = {(p.interval_start, p.signal_name, p.signal_type) for p in kept}
            todo = [w for w in ended if (w.interval.start, w.interval.signal_name, w.interval.signal_type) not in done]
            if todo or len(kept) != len(stored):
                rows = [PerformanceRow(**p.model_dump(exclude={"id"})) for p in kept]
                self.store.save_performance(row.event_id, rows + (self._rows(row, ev, todo) if todo else []))
            self._measured[row.event_id] = key
        if len(ended) == len(windows) and row.status in (COMPLETED, CANCELLED):
            self._done.add(row.event_id)

    def _rows(self, row: EventRow, ev: Event, windows: list[_Window]) -> list[PerformanceRow]:
        stations = select_stations(ev, self.stations, row.ven_id)
        if not stations:
            return []
        by_id = {s.id: s for s in stations}
        by_resource: dict[str, list[Station]] = defaultdict(list)
        for s in stations:
            by_resource[s.resource_id].append(s)
        start = schedule.effective_start(ev, row.offset_s)
        base_from = start - timedelta(minutes=self.cfg.bridge.baseline_minutes)
        readings: dict[str, list] = defaultdict(list)  # by station: one pass, not one per resource
        for r in self.store.reading_log(by_id, base_from - HOLD, max(w.end for w in windows)):
            readings[r.chargestation_id].append(r)
        out = []
        for resource_id, mine in sorted(by_resource.items()):
            data = samples(sorted((r for s in mine for r in readings.get(s.id, ())), key=lambda r: r.at), by_id)
            baseline = mean_power(data, base_from, start) if base_from < start else None
            for w in windows:
                if is_cap_signal(w.interval.signal_name, w.interval.signal_type):
                    requested = None  # one cap over every targeted station: no share of it is this resource's
                else:
                    try:
                        limits = [limit_kw(station_limit(w.interval, s, self.settings), s) for s in mine]
                    except UnsupportedSignal:
                        continue  # a signal the bridge does not act on promises nothing
                    requested = None if all(x is None for x in limits) else sum(x for x in limits if x is not None)
                mean = mean_power(data, w.start, w.end)
                baseline_kw, mean_kw = (baseline.kw if baseline else None), (mean.kw if mean else None)
                reduction_kw, reduction_pct = reduction(baseline_kw, mean_kw)
                out.append(PerformanceRow(
                    event_id=row.event_id, modification_number=row.modification_number, resource_id=resource_id,
                    signal_name=w.interval.signal_name, signal_type=w.interval.signal_type,
                    interval_start=w.interval.start, window_start=mean.start if mean else w.start,
                    window_end=w.end, baseline_start=baseline.start if baseline else None,
                    baseline_end=baseline.end if baseline else None, baseline_kw=_r(baseline_kw),
                    mean_kw=_r(mean_kw), reduction_kw=_r(reduction_kw), reduction_pct=_r(reduction_pct, 1),
                    requested_kw=_r(requested)))
        return out
