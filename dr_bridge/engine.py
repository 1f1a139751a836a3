"""The orchestrator: OpenADR events in, desired session limits out, restored after.

It ties the adapters together and owns no policy of its own: targets.py picks stations, schedule.py says
which intervals are in force, policy.py turns them into per-session limits, and the Dispatcher makes eDRV
match. Everything it decides is persisted first; `start()` rebuilds the picture from the database, so a
restart (even after SIGKILL) resumes an event or restores one that ended while the bridge was down.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Iterator

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from dr_bridge import schedule, sharing
from dr_bridge.dispatch import Desired, Dispatcher
from dr_bridge.domain import ACTIVE, CANCELLED, COMPLETED, PENDING, Cap, Event, Limit, SignalInterval, Station
from dr_bridge.edrv.errors import EdrvError, EdrvNotFound
from dr_bridge.edrv.models import Session
from dr_bridge.edrv.webhooks import Envelope, action_status
from dr_bridge.edrvwatch import ACCEPTED, EdrvWatch
from dr_bridge.eventlog import event_from_json, event_to_json, iso
from dr_bridge.fleet import Fleet
from dr_bridge.health import Readiness, Reason
from dr_bridge.journal import Journal, database_away
from dr_bridge.policy import (PERCENT_OFFSET, UnsupportedSignal, cap_watts, is_cap_signal, is_supported,
                              session_limits, station_limits, to_watts, unusable)
from dr_bridge.performance import HOLD, mean_power
from dr_bridge.reporting import overlapping, samples
from dr_bridge.store import (EventRow, IntervalRow, OptOutRow, SessionState, SharedLimit, Store, is_outage,
                             utcnow)
from dr_bridge.targets import select_stations, why_none

log = logging.getLogger("dr_bridge.engine")

OPT_IN, OPT_OUT = "optIn", "optOut"
RETRY_RECOMPUTE_S = 1.0
# Running sessions are listed this long before an interval starts or ends, so the pass at the boundary
# sends its limits at once instead of after a fleet-wide listing (ten pages at 10,000 sessions).
PREFETCH_S = 5.0
DATABASE_CHECK_S = 5.0  # how often a database said to be unreachable is asked whether it answers again
REFUSING_CONFIRM_S = 5.0  # eDRV must refuse the bridge this long before the VTN hears its resources opted out
ARM_LAPSE_S = 10.0  # how long after its interval start a limit armed for it waits to be taken up
FOLLOW_UP_S = 5.0  # the longest the fresh listing after such a boundary waits for its limits to go out
RESOLVE_WAIT_S = 1.0  # the longest a pass waits for eDRV to say what kind a station is (see Fleet.resolve_all)
SHARE_RECHECK_S = 1.0  # after this bridge's wish for a shared station changed, it looks at the others' again
# The reason of the opt-outs the bridge reports while eDRV refuses it (outageRunStatus, until eDRV accepts again).
REFUSED_OPT_OUT = "eDRV refuses the bridge's API key (HTTP 401/403): it can neither limit nor restore"


@dataclass
class LiveEvent:
    event: Event
    offset_s: float
    opt: str
    reason: str
    status: str
    dry: bool
    station_ids: set[str]
    opted_out: set[str] = field(default_factory=set)  # resource_ids no longer limited in this event
    offline: set[str] = field(default_factory=set)  # opted out only while their station is offline
    baselines_w: dict[frozenset[str], float] = field(default_factory=dict)  # pre-event power per station set
    restore_order: list[str] | None = None  # sessions in the order the staggered restore lifts them
    released: bool = False  # the operator released it during its staggered restore: the rest restore at once

    @property
    def acting(self) -> bool:
        return self.opt == OPT_IN or self.dry


class Engine:
    def __init__(self, cfg, store: Store, client, *, dry_run: bool = False,
                 clock: Callable[[], datetime] = utcnow, rng: random.Random | None = None,
                 readiness: Readiness | None = None):
        self.cfg = cfg
        self.readiness = readiness or Readiness()
        self.readiness.add_probe(self._restores_probe)
        self.store = store
        self.client = client
        self.dry_run = dry_run or cfg.bridge.dry_run
        self.clock = clock
        self.rng = rng or random.Random()
        self.settings = cfg.policy()
        self.fleet = Fleet(cfg.stations(), client)  # what runs where
        self.ven_id: str | None = cfg.vtn.ven_id or None
        self.events: dict[str, LiveEvent] = {}
        self.journal = Journal(store, readiness=self.readiness)  # the group commit of dispatch and webhooks
        self.dispatcher = Dispatcher(client, store, limit_retries=cfg.edrv.limit_retries,
                                     backoff_s=cfg.edrv.retry_backoff_s, max_wait_s=cfg.edrv.max_retry_after_s,
                                     on_noncompliant=self._noncompliant,
                                     journal=self.journal)
        # What dry runs and logged test events would do: kept apart, so a logged limit never stands in for
        # one that eDRV holds (nor a logged restore for a real one). It has no eDRV client to call.
        self.dry_dispatcher = Dispatcher(None, store, journal=self.journal, dry_only=True)
        self.scheduler = AsyncIOScheduler(timezone="UTC")
        self.last_edrv_ok: datetime | None = None
        self.edrv = EdrvWatch(self.readiness, key_env=cfg.edrv.api_key_env, base_url=cfg.edrv.base_url,
                              unreachable_after_s=cfg.edrv.reconcile_interval_s)
        self._refusal_marks = False  # opt-outs stand that were reported because eDRV refused the bridge
        self.last_webhook_at: datetime | None = None
        self._refused_since: datetime | None = None  # webhooks refused for their signature, none accepted since
        self._tasks: set[asyncio.Task] = set()
        self._dirty = asyncio.Event()
        self._full = False  # the next pass looks at every station and lists running sessions
        self._only: set[str] = set()  # otherwise, the stations a webhook told us about
        self._ahead: set[datetime] = set()  # boundaries whose sessions were listed just ahead of them
        self._follow_up_task: asyncio.Task | None = None
        self._finalising: set[int] = set()  # actions whose final outcome is on its way to the database
        self._expiring: set[int] = set()  # actions counted as unanswered, that mark on its way to the database
        self._wished: dict = {}  # what this bridge last published of the stations it shares
        self._offline: set[str] = set()  # stations eDRV said went offline and has not said are back
        self._idle = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # --- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Rebuild from the database: live events, their jobs, and what each session holds."""
        self.ven_id = self.store.ven_state().ven_id or self.ven_id
        if interrupted := self.store.fail_interrupted_actions():
            log.warning("%d call(s) of the last run have no recorded outcome (it stopped meanwhile): marked failed; "
                        "what is still wanted is sent again", interrupted)
        for row in self.store.events(statuses=[PENDING, ACTIVE]) + self._spreading_events():
            ev = event_from_json(row.event_json)
            live = LiveEvent(ev, row.offset_s, row.opt or OPT_OUT, row.opt_reason or "", row.status, row.dry_run,
                             {s.id for s in select_stations(ev, list(self.fleet.stations.values()), self.ven_id)})
            live.opted_out, live.offline = self._resource_opt_outs(ev.event_id)
            self._refusal_marks |= any(self._refusal_opt_outs(ev.event_id))
            self.events[ev.event_id] = live
            log.info("resuming event %s (%s, modification %d)", ev.event_id, row.status, ev.modification_number)
        for st in self.store.session_states(limited_only=True):
            station = self.fleet.stations.get(st.chargestation_id)
            if station is None:
                log.warning("session %s is limited on unconfigured station %s; use release-all",
                            st.session_id, st.chargestation_id)
                continue
            # What eDRV holds is not known after a crash (a call may have been cut short), so the first pass
            # re-sends the limit if the event still runs, or restores the session if it ended meanwhile.
            self.dispatcher.seed(st.session_id, station, Desired("limit", Limit(st.unit, st.limit), st.event_id))
        self.scheduler.start()
        for live in self.events.values():
            self._schedule(live)
        self.scheduler.add_job(self._scheduled_kick, "interval", seconds=self.cfg.edrv.reconcile_interval_s,
                               id="reconcile", replace_existing=True)
        self.scheduler.add_job(self._apply_operator_opt_outs, "interval", seconds=2, id="opt-outs",
                               replace_existing=True)
        check_s = max(0.5, min(10.0, self.cfg.edrv.action_timeout_s / 4))
        self.scheduler.add_job(self._expire_unanswered, "interval", seconds=check_s, id="action-timeouts",
                               replace_existing=True)
        self.scheduler.add_job(self._check_edrv, "interval", seconds=self.cfg.edrv.reconcile_interval_s,
                               id="edrv-check", replace_existing=True)
        self.scheduler.add_job(self._check_database, "interval", seconds=DATABASE_CHECK_S, id="database-check",
                               replace_existing=True)
        self.scheduler.add_job(self._prune, "interval", hours=1, id="retention", replace_existing=True,
                               next_run_time=self.clock())
        # Opt-outs the operator recorded while the bridge was stopped, before the first pass: otherwise it
        # would send the event's limits again and lift them two seconds later.
        await self._apply_operator_opt_outs()
        self._loop_task = asyncio.create_task(self._loop(), name="engine-loop")
        self.kick()

    async def stop(self, restore: bool = False, timeout: float = 8.0) -> list[str]:
        """Stop; with restore=True lift every limit first. Returns the sessions left limited."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        for task in (self._loop_task, self._follow_up_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.fleet.stop()
        if restore:
            await self.release_all(timeout=timeout)
        await self.dry_dispatcher.stop()
        await self.dispatcher.stop()
        return [s.session_id for s in self.store.session_states(limited_only=True)]

    async def release_all(self, timeout: float | None = None) -> dict[str, SharedLimit]:
        """Restore every session this bridge limits, except on a shared station another bridge still wants
        limited: there the session gets that bridge's share instead, since the other bridge believes eDRV
        still holds its limit and would not send it again. Returns those sessions and whose wish they hold."""
        # Limits recorded ahead of an interval and never sent need no restore.
        self.dispatcher.disarm("every limit is being released")
        await self.dispatcher.disarmed()
        # This bridge no longer wants any shared station limited: the others stop holding them on its behalf.
        self.store.set_shared_limits({})
        self._wished = {}
        handed: dict[str, SharedLimit] = {}
        todo: list[tuple[SessionState, Station]] = []
        for st in self.store.session_states(limited_only=True):
            station = self.fleet.stations.get(st.chargestation_id)
            if station is None:
                # Without the station's max_current a fallback "restore" could only re-send the old limit.
                log.error("session %s is limited on station %s, which is no longer configured: add the station "
                          "back to the config to restore it", st.session_id, st.chargestation_id)
                continue
            todo.append((st, await self.fleet.resolve(station)))
        shares = await self._others_shares([(st.session_id, station) for st, station in todo])
        for st, station in todo:
            if not self.dispatcher.known(st.session_id):
                self.dispatcher.seed(st.session_id, station,
                                     Desired("limit", Limit(st.unit, st.limit), st.event_id))
            share = shares.get(st.session_id)
            if share is None:
                self.dispatcher.want(st.session_id, station, Desired("restore", event_id=st.event_id))
                continue
            limit, wish = share
            handed[st.session_id] = wish
            log.warning("session %s on shared station %s is held at %s for bridge %s (event %s, until %s), not "
                        "restored: release it there too to lift it", st.session_id, station.id, _shown(limit),
                        wish.bridge, wish.event_id or "-", iso(wish.until))
            self.dispatcher.want(st.session_id, station, Desired("limit", limit, wish.event_id or wish.bridge))
        await self.dispatcher.drain(timeout)
        return handed

    async def _others_shares(self, limited: list[tuple[str, Station]]) -> dict[str, tuple[Limit, SharedLimit]]:
        """session id -> (its share of the strictest other bridge's wish, that wish), for the given sessions
        on shared stations that another bridge still wants limited."""
        shared = sorted({station.id for _, station in limited if station.shared})
        wishes = self.store.others_shared_limits(shared, self.clock()) if shared else []
        if not wishes:
            return {}
        wanted = {w.chargestation_id for w in wishes}
        stations = {station.id: station for _, station in limited if station.id in wanted}
        try:  # the share is the wish split over every running session, not only those this bridge limits
            running = await self.client.list_running_sessions(list(stations))
            sessions = {sid: [x.id for x in running if x.chargestation_id == sid] for sid in stations}
        except EdrvError as exc:
            log.warning("could not list the sessions on shared stations (%s): sharing the other bridges' wishes "
                        "over this bridge's sessions only", exc)
            sessions = {}
        for session_id, station in limited:
            if station.id in stations and session_id not in sessions.setdefault(station.id, []):
                sessions[station.id].append(session_id)
        by_owner = {(w.event_id or w.bridge, False): w for w in wishes}
        merged = sharing.with_others({}, [(w.chargestation_id, w.watts, (w.event_id or w.bridge, False))
                                          for w in wishes], stations)
        plan = session_limits(merged, [], stations, sessions, self.settings, self._cap_weights(sessions))
        mine = {session_id for session_id, _ in limited}
        return {session_id: (limit, by_owner[owner]) for session_id, (limit, owner) in plan.items()
                if session_id in mine and limit is not None and owner in by_owner}

    def _retry_soon(self) -> None:
        """Another pass in a second, rather than at the next reconcile interval."""
        asyncio.get_running_loop().call_later(RETRY_RECOMPUTE_S, self.kick)

    def kick(self) -> None:
        """Ask for a full recompute (every station, with a fresh listing); bursts coalesce into one pass."""
        self._full = True
        self._idle.clear()
        self._dirty.set()

    async def _scheduled_kick(self) -> None:
        """kick(), as a scheduler job. A coroutine, so APScheduler runs it on the event loop: a plain function
        it would run in a worker thread, whose flag and Event writes could race the engine's loop and lose
        a boundary's pass."""
        self.kick()

    def kick_stations(self, station_ids: set[str]) -> None:
        """Ask for a pass over these stations only, trusting what webhooks said ran there: a session starting
        mid-event gets its limit without a fleet-wide listing and plan."""
        self._only |= station_ids
        self._idle.clear()
        self._dirty.set()

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until the latest recompute ran, dispatch is idle and its event log written (tests and the demo)."""
        await asyncio.wait_for(self._idle.wait(), timeout)
        await self.dry_dispatcher.drain(timeout)
        await self.dispatcher.drain(timeout)
        await asyncio.wait_for(self.journal.flush(), timeout)

    async def _loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            only = None if self._full else self._only
            self._full, self._only = False, set()
            try:
                await self.recompute(only)
            except Exception as exc:
                if database_away(exc):  # the pass's own writes (an event's status): said once, not a trace a second
                    self.journal.away(exc)
                    log.debug("recompute failed (the database is away); retrying in %g s", RETRY_RECOMPUTE_S)
                else:
                    log.exception("recompute failed; retrying in %g s", RETRY_RECOMPUTE_S)
                self._retry_soon()

            if not self._dirty.is_set():
                self._idle.set()

    # --- OpenADR side --------------------------------------------------------------------------------
    def registered(self, ven_id: str, registration_id: str | None) -> None:
        self.ven_id = ven_id
        self.store.save_ven_state(ven_id, registration_id, self.cfg.vtn.url)
        log.info("registered with the VTN as %s", ven_id)

    async def handle_event(self, ev: Event) -> tuple[str, str]:
        async with self._lock:
            return self._handle_event(ev)

    def _handle_event(self, ev: Event) -> tuple[str, str]:
        prev = self.events.get(ev.event_id)
        row = self.store.get_event(ev.event_id)
        # Listed again unchanged and not cancelled after its absence from a list was taken for a cancellation:
        # to the VTN it runs, so it is taken up again.
        relisted = row is not None and row.modification_number == ev.modification_number and \
            row.status == CANCELLED and not ev.cancelled
        if row is not None and row.modification_number == ev.modification_number and not relisted:
            # A re-sent event: the same answer. A re-sent cancellation changes nothing either, and rewriting
            # the row would move the time it records for the cancellation.
            return row.opt or OPT_OUT, row.opt_reason or "already answered"
        # A modification keeps the offset drawn first, but never beyond its own randomisation window: an
        # event escalated to start at once must not start late.
        offset = min(row.offset_s, ev.start_after.total_seconds()) if row is not None \
            else schedule.draw_offset(ev.start_after, self.rng)
        stations = select_stations(ev, list(self.fleet.stations.values()), self.ven_id)
        dry = self.dry_run or (ev.test_event and self.cfg.bridge.test_events == "log")
        if ev.cancelled:
            opt, reason = (row.opt if row and row.opt else OPT_IN), "cancelled by the VTN"
        elif not stations:
            opt, reason = OPT_OUT, why_none(ev.targets)
        elif not any(is_supported(i.signal_name, i.signal_type) for i in ev.intervals):
            names = sorted({f"{i.signal_name}/{i.signal_type}" for i in ev.intervals}) or ["none"]
            opt, reason = OPT_OUT, f"no supported signal ({', '.join(names)})"
        elif (problem := unusable(ev.intervals, stations, self.settings)) is not None:
            opt, reason = OPT_OUT, f"no usable interval: {problem}"
        elif any(o.resource_id is None for o in self.store.opt_outs(ev.event_id)):
            opt, reason = OPT_OUT, "opted out by the operator"  # a modification does not undo that
        elif self.dry_run:
            opt = OPT_IN if self.cfg.bridge.dry_run_opt == "in" else OPT_OUT
            reason = "dry run: planned, not sent"
        elif ev.test_event and self.cfg.bridge.test_events == "log":
            opt, reason = OPT_IN, "test event: planned, not sent"
        else:
            opt, reason = OPT_IN, f"{len(stations)} station(s) targeted"
        status = schedule.status_at(ev, self.clock(), offset, self.cfg.bridge.max_event_hours)
        if prev is not None:
            opted_out, offline = prev.opted_out, prev.offline
        else:  # new, or resumed after it was forgotten: the operator's opt-outs stand
            opted_out, offline = self._resource_opt_outs(ev.event_id) if row else (set(), set())
        live = LiveEvent(ev, offset, opt, reason, status, dry, {s.id for s in stations}, opted_out, offline)
        # In the database before the engine acts on it: should the database fail here, the VTN is answered
        # optOut, and the bridge must not limit for an event it has neither recorded nor opted in to.
        self._skip_unavailable(live, self.store.availability_windows(ev.start))
        self._persist(live)
        self.events[ev.event_id] = live
        verb = "received" if row is None else ("cancelled" if ev.cancelled else
                                               "listed again: resumed" if relisted else "modified")
        log.info("event %s %s (modification %d): %s, %s; %s", ev.event_id, verb, ev.modification_number,
                 opt, reason, self._describe(live))
        if ev.recovery and ev.recovery > self._restore_spread(ev):
            log.warning("event %s asks for a %.0f s recovery; its restores are spread over %g s at most "
                        "(bridge.max_restore_spread_s)", ev.event_id, ev.recovery.total_seconds(),
                        self.cfg.bridge.max_restore_spread_s)
        self._schedule(live)
        if live.acting:
            self.fleet.start_resolving(sorted(live.station_ids))  # long before the boundary needs them, if we can
            if self.edrv.refusing:
                self._spawn(self._opt_out_refused([live]))
        self.kick()
        return opt, reason

    def _resource_opt_outs(self, event_id: str) -> tuple[set[str], set[str]]:
        """The resources opted out of an event, and those of them opted out until they are back online."""
        rows = [o for o in self.store.opt_outs(event_id) if o.resource_id]
        standing = {o.resource_id for o in rows if not is_outage(o)}
        offline = {o.resource_id for o in rows if is_outage(o) and o.window_end is None} - standing
        return standing | offline, offline

    async def handle_event_list(self, event_ids: set[str]) -> None:
        """An event that disappears from the VTN's list counts as cancelled (OpenADR implied cancel), unless
        its end has passed: a VTN stops listing an event once it completes, and it completes here on its own
        schedule (its randomisation offset and staggered restore included)."""
        now = self.clock()
        async with self._lock:
            for live in list(self.events.values()):
                if live.status in (PENDING, ACTIVE) and live.event.event_id not in event_ids \
                        and (live.event.end is None or live.event.end > now):
                    log.warning("event %s is no longer listed by the VTN: treating it as cancelled",
                                live.event.event_id)
                    live.event.event_status = "cancelled"
                    live.status = CANCELLED
                    self._persist(live)
                    self._schedule(live)
            self.kick()

    def _describe(self, live: LiveEvent) -> str:
        ev = live.event
        end = iso(ev.end) if ev.end else "open-ended"
        return (f"start {iso(ev.start)} (+{live.offset_s:.0f}s), end {end}, "
                f"{len(ev.intervals)} interval(s), stations {sorted(live.station_ids) or '-'}")

    def _persist(self, live: LiveEvent) -> None:
        ev = live.event
        row = self.store.get_event(ev.event_id) or EventRow(event_id=ev.event_id, start=ev.start,
                                                            effective_start=ev.start)
        row.ven_id, row.modification_number, row.status = self.ven_id, ev.modification_number, live.status
        row.opt, row.opt_reason, row.start, row.end = live.opt, live.reason, ev.start, ev.end
        row.effective_start = schedule.effective_start(ev, live.offset_s)
        row.offset_s, row.test_event, row.dry_run, row.event_json = live.offset_s, ev.test_event, live.dry, \
            event_to_json(ev)
        intervals = [IntervalRow(event_id=ev.event_id, start=i.start, end=i.end, signal_name=i.signal_name,
                                 signal_type=i.signal_type, value=i.value) for i in ev.intervals]
        self.store.save_event(row, intervals)

    def _schedule(self, live: LiveEvent) -> None:
        """One APScheduler job per boundary; a modification replaces the event's jobs."""
        if not self.scheduler.running:
            return
        prefix = f"{live.event.event_id}@"
        # The limits armed for a coming interval start assumed the events as they were: the pass at the
        # boundary sends what is wanted then, the usual way.
        self.dispatcher.disarm(f"event {live.event.event_id} changed")
        for job in self.scheduler.get_jobs():
            if job.id.startswith(prefix):
                job.remove()
        if not live.acting:
            return
        now = self.clock()
        stations = sorted(live.station_ids)
        for i, t in enumerate(schedule.boundaries(live.event, live.offset_s, self.cfg.bridge.max_event_hours)):
            if t > now:
                self.scheduler.add_job(self._scheduled_kick, "date", run_date=t, id=f"{prefix}{i}",
                                       misfire_grace_time=None)
            if t - timedelta(seconds=PREFETCH_S) > now:
                self.scheduler.add_job(self._prefetch, "date", run_date=t - timedelta(seconds=PREFETCH_S),
                                       args=[stations, t], id=f"{prefix}{i}-prefetch", misfire_grace_time=1)

    # --- the decision pass ---------------------------------------------------------------------------
    async def recompute(self, only: set[str] | None = None) -> None:
        """One decision pass: every station (only=None), or just these stations and whatever shares a cap or
        a shared-station wish with them."""
        now = self.clock()
        budgets: dict[str, list[tuple[Limit | None, tuple[str, bool]]]] = {}
        caps: list[tuple[Cap, tuple[str, bool]]] = []
        # The limits only to log (dry runs, test events in "log" mode) are planned apart from those to send,
        # each as if the other were not.
        dry_budgets: dict[str, list[tuple[Limit | None, tuple[str, bool]]]] = {}
        dry_caps: list[tuple[Cap, tuple[str, bool]]] = []
        for live in self.events.values():
            self._update_status(live, now)
            if not live.acting or live.status != ACTIVE:
                continue
            # Offline since before the event began: an outage from its start, not a refusal found calls later.
            for sid in sorted(live.station_ids & self._offline):
                await self._outage(live, self.fleet.stations[sid])
            owner = (live.event.event_id, live.dry)
            own_budgets, own_caps = (dry_budgets, dry_caps) if live.dry else (budgets, caps)
            targeted = self._targeted(live)
            for iv, limits in self._limits_at(live, now, targeted):
                if limits is None:
                    cap = self._cap(live, iv, targeted)
                    if cap is not None:
                        own_caps.append((cap, owner))
                    continue
                for sid, limit in limits.items():
                    own_budgets.setdefault(sid, []).append((limit, owner))
            for sid in targeted:
                own_budgets.setdefault(sid, [])

        held = {d.station_of(s) for d in (self.dispatcher, self.dry_dispatcher) for s in d.limited_sessions()}
        scope = sorted(set(budgets) | set(dry_budgets) | {s for s in held if s in self.fleet.stations})
        if only is not None:
            scope = self._narrow(scope, only, caps + dry_caps)
        if not scope:
            return
        if only is None:
            await self._list_running(scope)
        await self.fleet.resolve_all(scope, wait_s=RESOLVE_WAIT_S)
        stations = {sid: self.fleet.stations[sid] for sid in scope}
        sessions = {sid: self.fleet.running.get(sid, []) for sid in scope}
        station_of = {x: stations[sid] for sid, ids in sessions.items() for x in ids}
        plan = session_limits(budgets, caps, stations, sessions, self.settings, self._cap_weights(sessions))
        shared = [sid for sid in scope if stations[sid].shared]
        if shared:
            plan = self._share(plan, budgets, caps, stations, sessions, shared, now)
        await self._apply(plan, station_of, now, self.dispatcher)
        if dry_budgets or dry_caps or self.dry_dispatcher.limited_sessions():
            dry_plan = session_limits(dry_budgets, dry_caps, stations, sessions, self.settings,
                                      self._cap_weights(sessions))
            await self._apply(dry_plan, station_of, now, self.dry_dispatcher)

    def _targeted(self, live: LiveEvent) -> list[str]:
        """The event's stations, bar the resources opted out of it."""
        return sorted(sid for sid in live.station_ids if self.fleet.stations[sid].resource_id not in live.opted_out)

    def _limits_at(self, live: LiveEvent, at: datetime,
                   station_ids: list[str]) -> Iterator[tuple[SignalInterval, dict[str, Limit | None] | None]]:
        """Each interval of the event in force at `at`, with its limit per station; None for a site cap,
        which is shared over the stations instead (_cap). Intervals of unsupported signals are left out."""
        for iv in schedule.active_intervals(live.event, at, live.offset_s, self.cfg.bridge.max_event_hours):
            if is_cap_signal(iv.signal_name, iv.signal_type):
                yield iv, None
                continue
            try:
                limits = station_limits(iv, [self.fleet.stations[sid] for sid in station_ids], self.settings)
            except UnsupportedSignal:
                continue
            yield iv, limits

    def _narrow(self, scope: list[str], only: set[str], caps: list[tuple[Cap, tuple[str, bool]]]) -> list[str]:
        """The stations a pass over `only` must look at: a cap is shared by all its stations, and this
        bridge's wishes for shared stations are published all together."""
        wanted = set(only) & set(scope)
        shared = {sid for sid in scope if self.fleet.stations[sid].shared}
        grown = True
        while grown:  # until nothing is added: a cap may reach another only through a third, or a shared station
            before = len(wanted)
            for cap, _ in caps:
                if cap.station_ids & wanted:
                    wanted |= cap.station_ids
            if wanted & shared:
                wanted |= shared
            grown = len(wanted) > before
        return [sid for sid in scope if sid in wanted]

    async def _list_running(self, scope: list[str]) -> None:
        """Fresh running sessions for a full pass. The pass at a boundary listed for just ahead (PREFETCH_S)
        uses that listing and sends at once. Once those calls are through (or after FOLLOW_UP_S), another
        pass with a fresh listing follows, for a session whose webhook was lost meanwhile; a session that
        ended meanwhile is answered 404 and forgotten."""
        due = {b for b in self._ahead if b <= self.clock() + timedelta(seconds=0.5)}
        self._ahead -= due
        if due and self.fleet.listed_at is not None and time.monotonic() - self.fleet.listed_at < PREFETCH_S + 2:
            self._follow_up_task = asyncio.create_task(self._follow_up(), name="engine-follow-up")
            return
        if not await self._refresh_sessions(scope):
            self._retry_soon()  # limits are due and eDRV would not say which sessions run

    async def _follow_up(self) -> None:
        await self.dispatcher.drain(FOLLOW_UP_S)
        self.kick()

    async def _prefetch(self, station_ids: list[str], boundary: datetime) -> None:
        """Ahead of a boundary: which sessions run, and what kind each station is, so the pass at the
        boundary asks eDRV nothing before sending."""
        await self.fleet.resolve_all(station_ids)
        if await self._refresh_sessions(station_ids, replan=True):
            self._ahead.add(boundary)
            self._arm(boundary)

    def _arm(self, boundary: datetime) -> None:
        """Record now the limits the pass at the boundary will send to sessions not limited yet (an event's
        start, mostly), so that their calls go out at once then (Dispatcher.arm). Planned as that pass
        plans them, on the same listing; left to the pass when a cap or a station shared with another bridge
        is involved, since those depend on more than this listing."""
        budgets: dict[str, list[tuple[Limit | None, tuple[str, bool]]]] = {}
        for live in self.events.values():
            if not live.acting or live.dry or schedule.status_at(
                    live.event, boundary, live.offset_s, self.cfg.bridge.max_event_hours) != ACTIVE:
                continue
            targeted = [sid for sid in self._targeted(live) if sid not in self._offline]
            for _, limits in self._limits_at(live, boundary, targeted):
                if limits is None:
                    return
                for sid, limit in limits.items():
                    budgets.setdefault(sid, []).append((limit, (live.event.event_id, False)))
        scope = [sid for sid in budgets if not self.fleet.stations[sid].shared]
        stations = {sid: self.fleet.stations[sid] for sid in scope}
        sessions = {sid: self.fleet.running.get(sid, []) for sid in scope}
        plan = session_limits({sid: budgets[sid] for sid in scope}, [], stations, sessions, self.settings,
                              self._cap_weights(sessions))
        station_of = {x: stations[sid] for sid, ids in sessions.items() for x in ids}
        armed = self.dispatcher.arm([(x, station_of[x], Desired("limit", limit, owner[0]))
                                     for x, (limit, owner) in plan.items() if limit is not None],
                                    (boundary - self.clock()).total_seconds() + ARM_LAPSE_S)
        if armed:
            log.info("%d limit(s) recorded ahead of %s, to be sent then", armed, iso(boundary))

    def _share(self, plan, budgets, caps, stations, sessions, shared: list[str], now: datetime):
        """Stations shared with other bridges: publish this bridge's own wish, then hold them no looser than
        the strictest wish of another bridge (sharing.py)."""
        def until(owner: tuple[str, bool] | None) -> datetime | None:
            live = self.events.get(owner[0]) if owner else None
            if live is None or live.dry:
                return None  # a dry run touches nothing, and a wish taken over from another lapses with it
            return schedule.effective_end(live.event, live.offset_s, self.cfg.bridge.max_event_hours)

        wishes = sharing.wishes(plan, stations, sessions, shared, until)
        # published with the event's id (the owner is (event id, dry); a dry run publishes no wish)
        self.store.set_shared_limits({sid: (watts, owner[0], lapse) for sid, (watts, owner, lapse) in wishes.items()})
        if wishes != self._wished:
            # Another bridge may be planning these stations this very moment, before this wish was in the
            # database: its looser limit could land after ours. Both look again shortly and agree then.
            self._wished = wishes
            asyncio.get_running_loop().call_later(SHARE_RECHECK_S, self.kick_stations, set(shared))
        held = self.dispatcher.limited_sessions()
        mine = sharing.interested(plan, {sid: sessions[sid] for sid in shared}, held)
        others = [w for w in self.store.others_shared_limits(shared, now) if w.chargestation_id in mine]
        if not others:
            return plan
        for w in others:
            self._wake_at(w.until, f"{w.bridge}:{w.event_id}")  # its end may free the station: look again then
            log.debug("station %s: bridge %s wants it at %.0f W until %s", w.chargestation_id, w.bridge, w.watts,
                      iso(w.until))
        merged = sharing.with_others(budgets, [(w.chargestation_id, w.watts, (w.event_id or w.bridge, False))
                                               for w in others], {sid: stations[sid] for sid in mine})
        return session_limits(merged, caps, stations, sessions, self.settings, self._cap_weights(sessions))

    async def _apply(self, plan: dict[str, tuple[Limit | None, tuple[str, bool] | None]],
                     station_of: dict[str, Station], now: datetime, dispatcher: Dispatcher) -> None:
        """Hand the plan to the dispatcher: lower limits first, then raises and restores."""
        lowered: list[str] = []
        raises: list[tuple[str, Station, Desired]] = []
        for session_id, (limit, owner) in plan.items():
            station = station_of[session_id]
            if limit is not None:
                desired = Desired("limit", limit, owner[0], owner[1])
                if self._lowers(dispatcher, session_id, station, limit):
                    dispatcher.want(session_id, station, desired)
                    lowered.append(session_id)
                else:
                    raises.append((session_id, station, desired))
            elif dispatcher.holds_limit(session_id) or dispatcher.wants_limit(session_id):
                prev = dispatcher.desired(session_id)
                due = self._restore_due(session_id, prev.event_id)
                if due is not None and due > now + timedelta(milliseconds=10):
                    self._wake_at(due, prev.event_id)
                    continue  # keeps its limit until its turn in the staggered restore
                raises.append((session_id, station, Desired("restore", event_id=prev.event_id, dry=prev.dry)))
        if lowered and raises:
            # When shares move within a cap, the limits eDRV holds must not add up to more than the cap on
            # the way: the raises wait (briefly) until the lowered limits are through.
            await dispatcher.drain(min(5.0, self.cfg.edrv.request_timeout_s), lowered)
        for session_id, station, desired in raises:
            dispatcher.want(session_id, station, desired)

    def _cap_weights(self, sessions: dict[str, list[str]]) -> dict[str, float] | None:
        if self.cfg.bridge.cap_sharing != "energy_need":
            return None
        return self.fleet.need_weights(sessions)

    @staticmethod
    def _lowers(dispatcher: Dispatcher, session_id: str, station: Station, limit: Limit) -> bool:
        held = dispatcher.held_limit(session_id)
        now_w = to_watts(held, station) if held is not None else station.max_power_w
        return to_watts(limit, station) < now_w

    def _cap(self, live: LiveEvent, interval: SignalInterval, station_ids: list[str]) -> Cap | None:
        baseline_w = 0.0
        if (interval.signal_name, interval.signal_type) == PERCENT_OFFSET:
            baseline_w = self._baseline_w(live, station_ids)
        try:
            watts = cap_watts(interval, baseline_w)
        except UnsupportedSignal as exc:
            log.warning("event %s: %s; ignoring that interval", live.event.event_id, exc)
            return None
        return None if watts is None else Cap(watts, frozenset(station_ids))

    def _baseline_w(self, live: LiveEvent, station_ids: list[str]) -> float:
        """The power (W) the stations drew before the event: what x-loadControlPercentOffset is relative to.

        The same time-weighted mean as the measured reduction's baseline. Without any reading the stations'
        maximum power stands in for "normal", and the log says so.
        """
        key = frozenset(station_ids)
        if key in live.baselines_w:
            return live.baselines_w[key]
        start = schedule.effective_start(live.event, live.offset_s)
        since = start - timedelta(minutes=self.cfg.bridge.baseline_minutes)
        mine = {sid: self.fleet.stations[sid] for sid in station_ids}
        mean = mean_power(samples(self.store.readings_between(mine, since - HOLD, start), mine), since, start)
        if mean is not None:
            baseline = 1000.0 * mean.kw
        else:
            baseline = sum(self.fleet.stations[sid].max_power_w for sid in station_ids)
            log.warning("event %s: no power readings before the event; its percent offset applies to the "
                        "stations' maximum power (%.1f kW)", live.event.event_id, baseline / 1000)
        live.baselines_w[key] = baseline
        return baseline

    # --- the staggered restore -------------------------------------------------------------------------
    def _restore_due(self, session_id: str, event_id: str | None) -> datetime | None:
        """When a session is restored after its event ended, in the staggered restore. None: at once (no
        spread, a cancellation, an opt-out: those restore immediately)."""
        live = self.events.get(event_id) if event_id else None
        if live is None or live.status != COMPLETED or live.released:
            return None
        spread = self._restore_spread(live.event)
        if spread <= timedelta(0):
            return None
        if live.restore_order is None:
            live.restore_order = self._restore_order(live)
        order = live.restore_order
        rank = order.index(session_id) if session_id in order else len(order) - 1
        end = schedule.effective_end(live.event, live.offset_s, self.cfg.bridge.max_event_hours)
        return schedule.staggered_restore_at(end, spread, rank, len(order))

    def _restore_spread(self, event: Event) -> timedelta:
        return schedule.restore_spread(event, self.cfg.bridge.restore_spread_s, self.cfg.bridge.max_restore_spread_s)

    def _restore_order(self, live: LiveEvent) -> list[str]:
        """Higher-priority stations first, then a fixed order. Built from the persisted session states, so
        a restart mid-spread gives every session the same turn as before."""
        event_id = live.event.event_id
        ids = {st.session_id: st.chargestation_id for st in self.store.session_states() if st.event_id == event_id}
        for dispatcher in (self.dispatcher, self.dry_dispatcher):  # dry runs persist no session state
            for session_id in dispatcher.sessions_of_event(event_id):
                ids.setdefault(session_id, dispatcher.station_of(session_id))

        def key(item: tuple[str, str]) -> tuple[int, str, str]:
            station = self.fleet.stations.get(item[1])
            return (-(station.priority if station else 0), item[1], item[0])

        return [session_id for session_id, _ in sorted(ids.items(), key=key)]

    def _wake_at(self, when: datetime, event_id: str) -> None:
        if self.scheduler.running:
            self.scheduler.add_job(self._scheduled_kick, "date", run_date=when,
                                   id=f"{event_id}@restore-{when.isoformat()}",
                                   replace_existing=True, misfire_grace_time=None)

    def _spreading_events(self) -> list[EventRow]:
        """Completed events whose staggered restore is still under way (to resume after a restart)."""
        now = self.clock()
        rows = []
        for row in self.store.events(statuses=[COMPLETED], since=now - timedelta(days=1)):
            ev = event_from_json(row.event_json)
            end = schedule.effective_end(ev, row.offset_s, self.cfg.bridge.max_event_hours)
            if end + self._restore_spread(ev) > now:
                rows.append(row)
        return rows

    def _update_status(self, live: LiveEvent, now: datetime) -> None:
        status = schedule.status_at(live.event, now, live.offset_s, self.cfg.bridge.max_event_hours)
        if status == live.status:
            return
        backstop = schedule.effective_start(live.event, live.offset_s) + timedelta(
            hours=self.cfg.bridge.max_event_hours)
        if status == COMPLETED and now >= backstop:
            log.warning("event %s reached max_event_hours (%s h): restoring", live.event.event_id,
                        self.cfg.bridge.max_event_hours)
        # The database first: if it is away, the next pass finds the change again and records it then.
        self.store.set_event_status(live.event.event_id, status)
        log.info("event %s is now %s", live.event.event_id, status)
        live.status = status

    async def _refresh_sessions(self, station_ids: list[str], replan: bool = False) -> bool:
        """List the sessions running on these stations; sessions we limited that no longer run are done
        with. With `replan`, a listing that is not itself part of a pass re-plans the stations whose sessions
        it found changed, as a webhook would have: a session that started silently gets its share now, and
        one that left frees its share, rather than at the next boundary. False when eDRV did not answer (the
        last known list stands)."""
        listed = await self.fleet.list_running(station_ids)
        if listed is None:
            return False
        live_ids, changed = listed
        self.last_edrv_ok = utcnow()
        if replan and changed:
            if active := {sid for sid in changed for live in self.events.values()
                          if sid in live.station_ids and live.status == ACTIVE and live.acting}:
                log.info("the listing found the sessions of %d station(s) changed without a webhook: re-planning "
                         "them", len(active))
                self.kick_stations(active)
        listed_ids = set(station_ids)
        for session_id in self.dry_dispatcher.limited_sessions():
            if self.dry_dispatcher.station_of(session_id) in listed_ids and session_id not in live_ids:
                self.dry_dispatcher.session_ended(session_id)
        missing = [sid for sid in self.dispatcher.limited_sessions()
                   if self.dispatcher.station_of(sid) in listed_ids and sid not in live_ids]
        if missing:
            await asyncio.gather(*(self._confirm_ended(sid) for sid in missing))
        return True

    async def _confirm_ended(self, session_id: str) -> None:
        """A session we limited is missing from a listing: ask eDRV about it before letting it go. A listing
        by page number skips a session when another one ends between two pages, and one let go that still
        runs would keep its limit after the event."""
        if await self.dispatcher.session_gone(session_id):
            log.info("session %s has ended; nothing to restore", session_id)
            return
        station_id = self.dispatcher.station_of(session_id)
        log.warning("session %s on %s is missing from eDRV's listing but not known to have ended (it runs, or "
                    "eDRV did not say); it is still planned", session_id, station_id)
        self.fleet.started(station_id, session_id)

    # --- what eDRV tells us by webhook ----------------------------------------------------------------
    async def on_webhook(self, env: Envelope) -> None:
        self.last_webhook_at, self._refused_since = utcnow(), None
        self.readiness.clear(Reason.WEBHOOKS_SILENT, "eDRV's webhooks arrive again")
        kind = env.type
        if kind.startswith(("session.set_power_limit.", "session.clear_power_limit.")):
            self._action_outcome(env)
        elif kind in ("session.started", "session.updated"):
            session = Session.from_json(env.data)
            self._session_seen(session, env)
            if session.status.lower() in ("ended", "cancelled"):
                await self._ended_by_webhook(session, session.energy_report_at or env.created_at or utcnow())
        elif kind in ("session.ended", "session.cancelled"):
            await self._ended_by_webhook(Session.from_json(env.data), env.created_at or utcnow())
        elif kind in ("chargestation.offline", "chargestation.online"):
            await self._station_link(str(env.data.get("_id") or ""), kind.endswith("online"))
        else:
            log.debug("webhook %s ignored", kind)

    def _action_outcome(self, env: Envelope, tries: int = 0) -> None:
        status = action_status(env.type)
        if status in (None, "requested"):
            return
        row = self.store.action_by_edrv_id(str(env.data.get("_id") or ""))
        if row is None:
            # The outcome can overtake eDRV's HTTP answer that tells us the action id: look again shortly.
            if tries < 20:
                asyncio.get_running_loop().call_later(0.25, self._action_outcome, env, tries + 1)
            return
        if row.status in ("accepted", "rejected", "skipped") or row.id in self._finalising:
            return  # a late or duplicate outcome never overwrites a final one
        detail = json.dumps(env.data.get("response_data") or {})[:300] if status == "rejected" else row.detail
        # Group-committed, not on the event loop: every limit at an interval start brings one of these. Until
        # the commit lands, the database does not show the final status yet, so remember it meanwhile.
        self._finalising.add(row.id)
        done = self.journal.submit(("update_action", row.id, {"status": status, "detail": detail}))
        done.add_done_callback(lambda _: self._finalising.discard(row.id))
        if status == "rejected":
            log.warning("charger refused %s for session %s (%s)", row.kind, row.session_id, env.type)
            if row.purpose == "restore" and not self.dispatcher.known(row.session_id):
                self._restore_again(row.session_id, row.chargestation_id, row.event_id, "its restore was refused")
                return
            key = (row.unit, row.limit) if row.purpose == "limit" else None
            self.dispatcher.refused_later(row.session_id, row.purpose, key)

    def _session_seen(self, session: Session, env: Envelope) -> None:
        station_id = session.chargestation_id
        if station_id not in self.fleet.stations or not session.id:
            return
        if session.power_kw is not None or session.current_a is not None:
            self.journal.submit(("reading", dict(at=session.energy_report_at or env.created_at or utcnow(),
                                                 session_id=session.id, chargestation_id=station_id,
                                                 power_kw=session.power_kw, current_a=session.current_a), {}))
        if not session.running:
            return
        self.fleet.note_need(session)
        if self.fleet.started(station_id, session.id):
            if any(station_id in live.station_ids and live.status == ACTIVE for live in self.events.values()):
                log.info("session %s started on %s during an event: sharing its budget", session.id, station_id)
                self.kick_stations({station_id})

    async def _ended_by_webhook(self, session: Session, at: datetime) -> None:
        """A webhook says the session ended. One this bridge limits is let go only on eDRV's own word, a read
        of the session: let go, it would never be restored, and a webhook is not proof (unsigned where the
        operator allows that, or replayed within the signature's window)."""
        sid = session.id
        if sid and (self.dispatcher.holds_limit(sid) or self.dispatcher.wants_limit(sid)
                    or self.dispatcher.is_armed(sid)):
            ended = await self._ended_on_edrv(sid)
            if not ended:
                log.warning("a webhook says limited session %s ended, but eDRV %s: it is still planned, and "
                            "restored when its event ends", sid,
                            "says it is still running" if ended is False else "could not be asked")
                return
        self._session_gone(session, at)

    async def _ended_on_edrv(self, session_id: str) -> bool | None:
        """Whether eDRV says the session ended (or does not know it); None when eDRV could not be asked."""
        try:
            return not (await self.client.get_session(session_id)).running
        except EdrvNotFound:
            return True
        except EdrvError as exc:
            log.debug("could not read session %s from eDRV: %s", session_id, exc)
            return None

    def _session_gone(self, session: Session, at: datetime | None = None) -> None:
        station_id = session.chargestation_id
        if at is not None and station_id in self.fleet.stations and session.id:
            # A 0 kW reading marks the end, so measured power does not hold the last report for a while.
            self.journal.submit(("reading", dict(at=at, session_id=session.id, chargestation_id=station_id,
                                                 power_kw=0.0, current_a=0.0), {}))
        if self.fleet.ended(station_id, session.id):
            self.kick_stations({station_id})  # the remaining sessions get a bigger share
        for dispatcher in (self.dispatcher, self.dry_dispatcher):
            if dispatcher.known(session.id) or dispatcher.is_armed(session.id):
                dispatcher.session_ended(session.id)

    async def _station_link(self, station_id: str, online: bool) -> None:
        station = self.fleet.stations.get(station_id)
        if station is None:
            return
        if online:
            self._offline.discard(station_id)
            log.info("station %s is back online: re-limiting its sessions", station.resource_id)
            for live in self.events.values():
                if station.resource_id in live.offline:
                    live.offline.discard(station.resource_id)
                    live.opted_out.discard(station.resource_id)
                    # Recorded, or a restart would take the station for offline still and leave it unlimited.
                    for row in self.store.opt_outs(live.event.event_id):
                        if is_outage(row) and row.resource_id == station.resource_id and row.window_end is None:
                            back = utcnow()
                            self.store.update_opt_out(row.id, window_start=row.at, window_end=back,
                                                      reason=f"{row.reason}; back online {iso(back)}")
            for session_id in self.fleet.running.get(station_id, []):
                self.dispatcher.forget(session_id)  # a charger that reconnects may have lost its limits
            self.kick()
            return
        # Taken as an outage, it restores the station's sessions and tells the VTN so: on eDRV's own word only,
        # as a webhook is not proof (unsigned where the operator allows that).
        if not await self._offline_on_edrv(station):
            return
        self._offline.add(station_id)
        for live in self.events.values():
            if live.acting and live.status == ACTIVE and station_id in live.station_ids:
                await self._outage(live, station)

    async def _offline_on_edrv(self, station: Station) -> bool:
        try:
            online = (await self.client.get_chargestation(station.id)).online
        except EdrvError as exc:
            log.warning("a webhook says station %s went offline, but eDRV could not be asked (%s): it is still "
                        "limited as before", station.resource_id, exc)
            return False
        if online:
            log.warning("a webhook says station %s went offline, but eDRV says it is online: ignored",
                        station.resource_id)
        return not online

    async def _outage(self, live: LiveEvent, station: Station) -> None:
        """The station is offline during the event: opted out as an outage until it is back online. Already
        opted out (by the operator, an availability window or non-compliance), that stands, and the station's
        return must not undo it."""
        if station.resource_id not in live.opted_out:
            await self._noncompliant("", station, live.event.event_id, "station offline (outageRunStatus)",
                                     opt_reason="outageRunStatus")
            live.offline.add(station.resource_id)

    async def _expire_unanswered(self) -> None:
        """Calls eDRV accepted (HTTP 2xx) whose outcome webhook has not come in time. No answer is not a
        refusal: when eDRV's webhooks stop (the endpoint disabled, a proxy down) every call goes unanswered,
        and counting them refused would opt the whole fleet out. Nor can eDRV be asked: a session read shows
        no limit. So each is sent once more, in case it was lost on its way, and otherwise taken as done;
        when no webhook at all has come since, the webhooks are silent, and readiness says so."""
        timeout_s = self.cfg.edrv.action_timeout_s
        # Skipped: those whose outcome, or whose expiry from the check before, is still on its way to the database.
        rows = [r for r in self.store.unanswered_actions(utcnow() - timedelta(seconds=timeout_s))
                if r.id not in self._finalising and r.id not in self._expiring]
        if not rows:
            return
        # Group-committed, and queued before any outcome that comes later, which then wins: when eDRV's webhooks
        # stop during a large event, thousands of calls expire together, one commit each would stall the loop.
        ids = {r.id for r in rows}
        self._expiring |= ids
        detail = f"no outcome from the charger within {timeout_s:g} s: taken as done (eDRV accepted the call)"
        done = self.journal.submit(*(("update_action", r.id, {"status": "unanswered", "detail": detail})
                                     for r in rows))
        done.add_done_callback(lambda _: self._expiring.difference_update(ids))
        silent = self._webhooks_silent(rows, timeout_s)
        again = sum(1 for row in rows if self._unanswered(row))
        examples = ", ".join(f"{r.kind} on session {r.session_id}" for r in rows[:5])
        # While the webhooks are silent, readiness has said why in one ERROR; each batch is only news.
        log.log(logging.INFO if silent else logging.WARNING,
                "no outcome within %g s for %d call(s), not counted as refused: %d sent once more, the rest taken "
                "as done: %s%s", timeout_s, len(rows), again, examples, ", ..." if len(rows) > 5 else "")

    def _unanswered(self, row) -> bool:
        """One unanswered call; True when it is sent again."""
        if row.purpose == "restore" and not self.dispatcher.known(row.session_id):
            self._restore_again(row.session_id, row.chargestation_id, row.event_id, "its restore went unanswered")
            return True
        return self.dispatcher.unanswered(row.session_id, row.purpose, (row.unit, row.limit))

    def webhook_refused(self, reason: str) -> None:
        """A webhook refused for its signature. Anyone can post to the endpoint, so one proves nothing; but
        refused ones that keep coming for an outcome timeout, none accepted meanwhile, mean that the bridge's
        webhook secret is not eDRV's, and the bridge hears nothing from eDRV."""
        now = utcnow()
        if self._refused_since is None:
            self._refused_since = now
        elif (now - self._refused_since).total_seconds() >= self.cfg.edrv.action_timeout_s:
            self.readiness.raise_(Reason.WEBHOOKS_SILENT, (
                f"eDRV's webhooks reach the bridge but are refused since {iso(self._refused_since)} ({reason}): "
                + (f"{self.cfg.edrv.webhook_secret_env} must hold the signing secret eDRV shows for this webhook "
                   f"endpoint" if self.cfg.edrv.webhook_secret_env else
                   "set edrv.webhook_secret_env to the variable holding the signing secret eDRV shows for this "
                   "webhook endpoint")
                + ". Meanwhile the bridge hears no charger's answer, and finds sessions starting or ending only "
                  "by listing"))

    def _webhooks_silent(self, rows, timeout_s: float) -> bool:
        """No webhook of any kind since the oldest of these calls was answered: eDRV's webhooks do not reach
        the bridge, which then learns nothing of refusals, or of sessions starting and ending, but by listing."""
        since = min(r.updated_at for r in rows)
        if self.last_webhook_at is not None and self.last_webhook_at >= since:
            return False
        if self.readiness.raised(Reason.WEBHOOKS_SILENT):
            return True  # its detail already says why (refused signatures, say)
        last = iso(self.last_webhook_at) if self.last_webhook_at else "the bridge started"
        self.readiness.raise_(Reason.WEBHOOKS_SILENT, (
            f"no webhook from eDRV since {last}, and {len(rows)} call(s) eDRV accepted had no outcome within "
            f"{timeout_s:g} s: check in eDRV that the webhook endpoint is enabled and points at this bridge's "
            f"{self.cfg.http.webhook_path}, and any proxy in between. Meanwhile calls are taken as done, not "
            f"refused, and sessions are found by listing every {self.cfg.edrv.reconcile_interval_s:g} s"))
        return True

    def _restore_again(self, session_id: str, station_id: str, event_id: str | None, why: str) -> None:
        """A restore that did not take, for a session this run has not dispatched: eDRV accepted it before a
        restart, and the charger's answer came after. Limited again as far as the database knows, and
        restored again (an ended session answers 404 and is let go)."""
        station = self.fleet.stations.get(station_id)
        if station is None:
            log.error("session %s may still be limited (%s) on station %s, which is no longer configured: add "
                      "the station back to the config to restore it", session_id, why, station_id)
            return
        log.warning("session %s: %s; restoring it again", session_id, why)
        self.journal.submit(("state", session_id, {"limited": True}))
        self.dispatcher.want(session_id, station, Desired("restore", event_id=event_id))

    async def _prune(self) -> None:
        self.store.prune(utcnow() - timedelta(days=self.cfg.bridge.readings_retention_days))
        self._drop_finished(self.clock())

    def _drop_finished(self, now: datetime) -> None:
        """A bridge runs for months: forget events that are over (their restores included) and sessions that
        ended. The database keeps them; a re-sent event is answered from there."""
        for event_id, live in list(self.events.items()):
            if live.status not in (COMPLETED, CANCELLED) or self.dispatcher.sessions_of_event(event_id) \
                    or self.dry_dispatcher.sessions_of_event(event_id):
                continue
            end = schedule.effective_end(live.event, live.offset_s, self.cfg.bridge.max_event_hours)
            if live.status == CANCELLED or end + self._restore_spread(live.event) < now:
                del self.events[event_id]
        self.dispatcher.drop_finished()
        self.dry_dispatcher.drop_finished()

    # --- health --------------------------------------------------------------------------------------
    def active_event_ids(self) -> list[str]:
        return sorted(e.event.event_id for e in self.events.values() if e.status == ACTIVE and e.acting)

    def limited_sessions(self) -> list[str]:
        return self.dispatcher.limited_sessions()

    def overdue_restores(self) -> list[str]:
        """Restores still not done two outcome-timeouts after they became due."""
        return self.dispatcher.overdue(2 * self.cfg.edrv.action_timeout_s)

    def _restores_probe(self) -> tuple[Reason, str] | None:
        if overdue := self.overdue_restores():
            return Reason.RESTORES_OVERDUE, (f"{len(overdue)} session(s) still limited after their restore was due: "
                                             f"{', '.join(overdue[:5])}{' ...' if len(overdue) > 5 else ''}")
        return None

    # --- eDRV refusing or out of reach ------------------------------------------------------------------
    def observe_edrv(self, op: str, outcome: str) -> None:
        """Every eDRV call's outcome (the client's on_call hook): can the bridge still act through eDRV?"""
        if outcome == "ok":
            self.last_edrv_ok = utcnow()
        change = self.edrv.observe(op, outcome)
        if change == "refusing":
            self._spawn(self._opt_out_refused(list(self.events.values()), confirm_s=REFUSING_CONFIRM_S))
        elif self._refusal_marks and not self.edrv.refusing and outcome in ACCEPTED:
            self._accepted_again()  # tried again on the next accepted call should a write of it fail

    async def _check_database(self) -> None:
        """While the database is said to be unreachable, ask it whether it answers again: a quiet bridge may
        have nothing to write for hours, and readiness must not wait for that to say it is back."""
        if not self.readiness.raised(Reason.DATABASE_UNREACHABLE):
            return
        try:
            await asyncio.to_thread(self.store.ping)
        except Exception as exc:
            log.debug("the database still does not answer: %s", str(exc).splitlines()[0][:200])
            return
        self.journal.answers()

    async def _check_edrv(self) -> None:
        """Ask eDRV one small thing when nothing else has for a reconcile interval, so that a key revoked
        between events shows (in readiness, and to the VTN) before the next event starts, not at its start."""
        self.edrv.check_reach()
        if self.client is None or not self.fleet.stations:
            return
        last = self.edrv.last_call
        if last is not None and time.monotonic() - last < self.cfg.edrv.reconcile_interval_s:
            return
        try:
            await self.client.get_chargestation(next(iter(self.fleet.stations)))
        except EdrvError:
            pass  # its outcome reached observe_edrv like any other call's

    async def _opt_out_refused(self, lives: list[LiveEvent], confirm_s: float = 0.0) -> None:
        """eDRV refuses the bridge: the resources of these events, active or pending, are reported to the VTN
        as opted out (outageRunStatus) rather than left opted in and idle, until eDRV accepts again. With
        confirm_s, only if it still refuses that much later: a single 401 from a gateway in between, or a
        refusal the next call already undoes, must not opt the whole fleet out at the VTN for good."""
        if confirm_s:
            await asyncio.sleep(confirm_s)
        if not self.edrv.refusing:
            return
        for live in lives:
            if live.dry or not live.acting or live.status not in (PENDING, ACTIVE) or live.event.cancelled:
                continue
            ev = live.event
            resources = sorted({self.fleet.stations[sid].resource_id for sid in live.station_ids} - live.opted_out)
            for resource_id in resources:
                # The row first: it is what the Reporter sends to the VTN. Should the database refuse it, the
                # resource stays planned (eDRV refuses its calls anyway) rather than silently unlimited.
                self.store.add_opt_out(OptOutRow(event_id=ev.event_id, modification_number=ev.modification_number,
                                                 resource_id=resource_id, reason=REFUSED_OPT_OUT,
                                                 opt_reason="outageRunStatus", source="automatic", applied=True))
                self._refusal_marks = True
                live.opted_out.add(resource_id)
                live.offline.add(resource_id)  # opted out only until eDRV accepts again
            if resources:
                log.warning("event %s (%s): %d resource(s) reported to the VTN as opted out while eDRV refuses "
                            "the bridge: %s", ev.event_id, live.status, len(resources), ", ".join(resources))
        self.kick()

    def _refusal_opt_outs(self, event_id: str) -> list[OptOutRow]:
        return [o for o in self.store.opt_outs(event_id)
                if is_outage(o) and o.window_end is None and o.reason == REFUSED_OPT_OUT]

    def _accepted_again(self) -> None:
        """eDRV accepts the bridge again: the resources opted out meanwhile are limited again in the events
        still running, as after a station outage. Their opt-out stands at the VTN: for part of the event the
        bridge could not act, and the event log keeps when that ended."""
        back = utcnow()
        offline = {self.fleet.stations[sid].resource_id for sid in self._offline if sid in self.fleet.stations}
        resumed = 0
        for live in self.events.values():
            for row in self._refusal_opt_outs(live.event.event_id):
                self.store.update_opt_out(row.id, window_start=row.at, window_end=back,
                                          reason=f"{row.reason}; accepted again {iso(back)}")
                if row.resource_id in live.offline and row.resource_id not in offline:
                    live.offline.discard(row.resource_id)
                    live.opted_out.discard(row.resource_id)
                    resumed += 1
        self._refusal_marks = False  # only once every row says so: a failed write leaves it for the next call
        if resumed:
            log.info("eDRV accepts the bridge again: %d resource(s) limited again in the events still running",
                     resumed)
        self.kick()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %s", task.get_coro().__qualname__, str(task.exception()).splitlines()[0][:200])

    # --- opt-outs ----------------------------------------------------------------------------------------
    async def _noncompliant(self, session_id: str, station: Station, event_id: str | None, reason: str,
                            opt_reason: str = "notParticipating") -> None:
        live = self.events.get(event_id) if event_id else None
        if live is None or station.resource_id in live.opted_out:
            return
        log.warning("resource %s is non-compliant in event %s (%s): restoring it and reporting an opt-out",
                    station.resource_id, event_id, reason)
        live.opted_out.add(station.resource_id)
        self.store.add_opt_out(OptOutRow(event_id=event_id, modification_number=live.event.modification_number,
                                         resource_id=station.resource_id, reason=reason, opt_reason=opt_reason,
                                         source="automatic", applied=True))
        self.kick()

    async def _apply_operator_opt_outs(self) -> None:
        for row in self.store.opt_outs(unapplied=True):
            live = self.events.get(row.event_id) if row.event_id else None
            if live is not None:
                # The operator's opt-out stands when an offline station comes back: no longer an outage mark.
                if row.resource_id:
                    live.opted_out.add(row.resource_id)
                    live.offline.discard(row.resource_id)
                elif live.status == COMPLETED:
                    # Over at the VTN, so nothing to tell it: what is left of its staggered restore goes now,
                    # and nothing re-sends a limit to a session waiting for its turn (release-all).
                    live.released = True
                else:
                    live.opted_out |= {self.fleet.stations[s].resource_id for s in live.station_ids}
                    live.offline.clear()
                    live.opt, live.reason = OPT_OUT, "opted out by the operator"
                    self._persist(live)
                    self._schedule(live)
                log.info("operator opt-out applied: event %s resource %s", row.event_id, row.resource_id or "(all)")
            elif row.event_id is None and row.window_start is not None:
                for live in self.events.values():
                    if live.status in (PENDING, ACTIVE):
                        self._skip_unavailable(live, [row])
            self.store.update_opt_out(row.id, applied=True)
            self.dispatcher.disarm("the operator opted out")  # armed limits assumed no such opt-out
            self.kick()

    def _skip_unavailable(self, live: LiveEvent, windows: list[OptOutRow]) -> None:
        """Resources the operator declared unavailable during the event are not limited in it; the
        opt-out recorded for the event tells the event log, and the VTN, why."""
        ev = live.event
        start = schedule.effective_start(ev, live.offset_s)
        end = schedule.effective_end(ev, live.offset_s, self.cfg.bridge.max_event_hours)
        targeted = {self.fleet.stations[s].resource_id for s in live.station_ids}
        for resource_id, window in overlapping(windows, start, end).items():
            if resource_id not in targeted or ev.cancelled or (
                    resource_id in live.opted_out and resource_id not in live.offline):
                continue
            live.opted_out.add(resource_id)
            live.offline.discard(resource_id)  # offline now, but unavailable for the event whatever happens
            reason = f"unavailable from {iso(window.window_start)} until {iso(window.window_end)}"
            self.store.add_opt_out(OptOutRow(event_id=ev.event_id, modification_number=ev.modification_number,
                                             resource_id=resource_id, reason=reason, opt_reason=window.opt_reason,
                                             source="operator", applied=True))
            log.info("event %s: resource %s is skipped: %s (operator availability)", ev.event_id, resource_id,
                     reason)


def _shown(limit: Limit) -> str:
    return f"{limit.value:g} {'A' if limit.unit == 'current' else 'W'}"


