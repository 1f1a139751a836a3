"""Desired-state dispatch: make each eDRV session's limit match what the engine wants.

The engine says what a session's limit should be (a Limit, or "restored"); one worker per session makes
eDRV match it with at most one call in flight. A newer desired state supersedes a queued retry, so a
retry waiting out a Retry-After can never land after a restore. Every call is an action row, updated in
place as its outcome arrives; transport retries count as attempts on the same row.

Ahead of an interval start the engine may arm limits (arm()): each session's durable state and action row
are written then, while the bridge is idle, and nothing is sent. A pass at the interval start that wants
the very same limit takes the armed row and sends at once; anything else lets the arming lapse, and its
row reads "skipped". An armed limit is never sent on its own.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Literal

from dr_bridge.domain import Limit, Station
from dr_bridge.edrv.errors import (EdrvError, EdrvNotFound, EdrvRateLimited, EdrvRejected)
from dr_bridge.journal import Journal
from dr_bridge.policy import in_current, lift_limit, restore_plan
from dr_bridge.store import ARMED, Store, utcnow

log = logging.getLogger("dr_bridge.dispatch")

RESTORED = "restored"


@dataclass(frozen=True)
class Desired:
    kind: Literal["limit", "restore"]
    limit: Limit | None = None
    event_id: str | None = None
    dry: bool = False  # plan and log only (dry run, or a test event in "log" mode)

    @property
    def key(self) -> object:
        """What eDRV holds once this desired state is reached; equal keys mean nothing to send."""
        return (self.limit.unit, self.limit.value) if self.kind == "limit" else RESTORED


@dataclass
class _Slot:
    station: Station
    desired: Desired | None = None
    applied: object = None  # key of what eDRV holds: (unit, value), RESTORED, or None (never touched)
    worker: asyncio.Task | None = None
    changed: asyncio.Event | None = None
    ended: bool = False
    rejections: int = 0  # rejected limit calls for the current desired limit
    resent_unanswered: bool = False  # the current desired state was sent again once after going unanswered
    clear_refused: bool = False  # this session's station refused a clear: restore with set max instead
    sent: object = None  # (unit, value) sent for the desired limit: its own, or in current (see _sendable)
    since: float = 0.0  # monotonic time the desired state last changed
    armed: tuple[Desired, int] | None = None  # an armed limit taken up, and its action row (not yet sent)


@dataclass
class _Armed:
    """A limit recorded ahead of its interval start and not sent (see arm())."""
    station: Station
    desired: Desired
    action_id: int | None = None  # once its rows are committed
    lapsed: str | None = None  # why it will not be sent, once that is decided


NonCompliant = Callable[[str, Station, str | None, str], Awaitable[None]]


class Dispatcher:
    """One per kind of plan: the engine keeps the limits it sends apart from those it only logs (dry runs
    and test events), so that a logged limit can never stand for one eDRV holds. A dry-only dispatcher has
    no client at all and persists no session state."""

    def __init__(self, client, store: Store, *, limit_retries: int = 3, backoff_s: float = 1.0,
                 backoff_max_s: float = 60.0, max_wait_s: float = 30.0, on_noncompliant: NonCompliant | None = None,
                 journal: Journal | None = None, dry_only: bool = False):
        self.client = client
        self.dry_only = dry_only
        self.store = store
        self.journal = journal or Journal(store)
        self.limit_retries = limit_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._capped_said_at = float("-inf")  # when a Retry-After longer than max_wait_s was last logged
        # Every wait before a limit or a restore is sent again is at most this (edrv.max_retry_after_s),
        # whatever eDRV's Retry-After or the backoff would make it.
        self.max_wait_s = max_wait_s
        self.on_noncompliant = on_noncompliant
        self._slots: dict[str, _Slot] = {}
        self._armed: dict[str, _Armed] = {}
        self._arming: set[asyncio.Task] = set()
        self._arm_failed = False  # an arming's rows could not be written: said once
        self._current_only: set[str] = set()  # stations of unknown kind that refused a limit in power

    # --- the engine's side ---------------------------------------------------------------------------
    def known(self, session_id: str) -> bool:
        return session_id in self._slots

    def is_armed(self, session_id: str) -> bool:
        return session_id in self._armed

    def holds_limit(self, session_id: str) -> bool:
        slot = self._slots.get(session_id)
        return slot is not None and slot.applied not in (None, RESTORED)

    def wants_limit(self, session_id: str) -> bool:
        slot = self._slots.get(session_id)
        return slot is not None and slot.desired is not None and slot.desired.kind == "limit"

    def desired(self, session_id: str) -> Desired | None:
        slot = self._slots.get(session_id)
        return slot.desired if slot is not None else None

    def held_limit(self, session_id: str) -> Limit | None:
        """The limit eDRV holds for the session as far as we know; None: unlimited or unknown."""
        slot = self._slots.get(session_id)
        if slot is None or slot.applied in (None, RESTORED):
            return None
        unit, value = slot.applied
        return Limit(unit, value)

    def sessions_of_event(self, event_id: str) -> list[str]:
        """Sessions whose desired state came from this event and that still run."""
        return [sid for sid, slot in self._slots.items()
                if not slot.ended and slot.desired is not None and slot.desired.event_id == event_id]

    def station_of(self, session_id: str) -> str:
        return self._slots[session_id].station.id

    def limited_sessions(self) -> list[str]:
        """Sessions that hold, or are about to get, a limit from the bridge."""
        return [sid for sid, slot in self._slots.items()
                if not slot.ended and (slot.applied not in (None, RESTORED) or
                                       (slot.desired is not None and slot.desired.kind == "limit"))]

    def seed(self, session_id: str, station: Station, desired: Desired) -> None:
        """After a restart: what the session should hold, with what eDRV holds unknown. Nothing is sent
        until the engine confirms (or changes) the desired state with want()."""
        slot = self._slot(session_id, station)
        slot.desired, slot.applied = desired, None

    def arm(self, limits: list[tuple[str, Station, Desired]], lapse_in_s: float) -> int:
        """Record these limits now, to be sent the moment a pass wants them (want() with an equal Desired):
        at an interval start the calls then go out without waiting for the event log, and the commits no
        longer share the CPU with them. Only sessions the dispatcher has never handled, whose limit eDRV
        cannot hold yet; the rest are left to the pass. Those not taken up within lapse_in_s lapse.
        Returns how many were armed."""
        fresh = [(sid, st, d) for sid, st, d in limits if d.kind == "limit" and not d.dry and not self.dry_only
                 and sid not in self._slots and sid not in self._armed]
        entries = []
        self._arm_failed = False
        for session_id, station, desired in fresh:
            entry = self._armed[session_id] = _Armed(station, desired)
            entries.append((session_id, entry))
            task = asyncio.create_task(self._record_armed(session_id, entry), name=f"arm-{session_id}")
            self._arming.add(task)
            task.add_done_callback(self._arming.discard)
        if entries:
            asyncio.get_running_loop().call_later(lapse_in_s, self._lapse_all, entries,
                                                  "not wanted at its interval start")
        return len(entries)

    async def _record_armed(self, session_id: str, entry: _Armed) -> None:
        want = entry.desired
        try:
            entry.action_id = await self._record(session_id, entry.station, want, "set_power_limit", "limit",
                                                 want.limit, detail=ARMED,
                                                 state=self._limited_state(entry.station, want))
        except Exception as exc:  # the event log is away: nothing is armed, and the pass sends the usual way
            if not self._arm_failed:  # once per arming, not once per session
                self._arm_failed = True
                log.warning("could not record the limits armed ahead (%s); they go the usual way at the start",
                            str(exc).splitlines()[0][:200])
            if self._armed.get(session_id) is entry:
                del self._armed[session_id]
            return
        if entry.lapsed is not None:  # it lapsed while its rows were being written
            self._unrecord(session_id, entry)

    def disarm(self, reason: str) -> int:
        """Let every armed limit lapse (an event changed, the bridge stops): the pass sends what is wanted."""
        return self._lapse_all(list(self._armed.items()), reason)

    async def disarmed(self) -> None:
        """Wait until every lapsed limit's rows say so in the event log."""
        if self._arming:
            await asyncio.gather(*self._arming, return_exceptions=True)
        await self.journal.flush()

    def _lapse_all(self, entries: list[tuple[str, _Armed]], reason: str) -> int:
        lapsed = 0
        for session_id, entry in entries:
            if self._armed.get(session_id) is entry:  # not taken up, let go, or armed again since
                self._lapse(session_id, entry, reason)
                lapsed += 1
        if lapsed:
            log.info("%d armed limit(s) lapsed unsent: %s", lapsed, reason)
        return lapsed

    def _lapse(self, session_id: str, entry: _Armed, reason: str) -> None:
        del self._armed[session_id]
        entry.lapsed = reason
        if entry.action_id is not None:  # otherwise _record_armed does this once its rows are in
            self._unrecord(session_id, entry)

    def _unrecord(self, session_id: str, entry: _Armed) -> None:
        """The armed row reads skipped; and unless a desired state owns the session's durable state by now
        (a slot: want() makes it before the lapse), the session is not limited: eDRV never got this."""
        writes = [("update_action", entry.action_id, dict(status="skipped", detail=f"armed, not sent: {entry.lapsed}"))]
        if session_id not in self._slots:
            writes.insert(0, ("state", session_id, {"limited": False}))
        self.journal.submit(*writes)

    def want(self, session_id: str, station: Station, desired: Desired) -> None:
        if desired.dry != self.dry_only:
            raise ValueError(f"a {'dry' if desired.dry else 'real'} desired state for session {session_id} "
                             f"handed to the {'dry' if self.dry_only else 'real'} dispatcher")
        # The slot first: an armed limit that lapses here leaves the session's durable state to this desired
        # state (a restore sent again must not find the session marked unlimited behind its back).
        slot = self._slot(session_id, station)
        armed = self._armed.get(session_id)
        if armed is not None:
            if armed.desired == desired and armed.action_id is not None:
                del self._armed[session_id]
                slot.armed = (desired, armed.action_id)
            else:
                self._lapse(session_id, armed, "superseded before it was sent" if armed.desired != desired
                            else "its rows were not written by its interval start")
        if slot.ended:
            return
        if slot.desired != desired:
            if slot.desired is None or slot.desired.key != desired.key:
                slot.rejections, slot.sent = 0, None
                slot.resent_unanswered = False
            slot.desired = desired
            slot.since = time.monotonic()
            slot.changed.set()
        if slot.applied != desired.key:
            self._start(session_id)

    def refused_later(self, session_id: str, purpose: str, key: object) -> None:
        """An outcome webhook said the charger refused a call that eDRV had accepted (HTTP 2xx)."""
        slot = self._slots.get(session_id)
        if slot is None or slot.ended or slot.desired is None:
            return
        if purpose == "restore":
            if slot.desired.kind != "restore":
                return  # refused a restore no longer wanted; it must not count against the new limit
            slot.clear_refused = True
            slot.rejections += 1
            lift = self._plan(slot, slot.desired)[2]
            if lift is not None:  # a lift in power refused: the next one goes in current
                self._refused_power(slot.station, lift)
            if slot.applied == RESTORED:  # retry later, not in a tight loop against a refusing charger
                slot.applied = None
                self._still_limited(session_id)
                asyncio.get_running_loop().call_later(self._backoff(slot.rejections), self._start, session_id)
            return
        elif slot.desired.kind != "limit" or key not in (slot.desired.key, slot.sent):
            return  # refused something no longer wanted
        elif key == slot.sent and self._refused_power(slot.station, Limit(*key)):
            pass  # sent again at once, in current: not counted against the limit
        else:
            slot.rejections += 1
            if slot.rejections > self.limit_retries:
                if self.on_noncompliant is not None:
                    asyncio.create_task(self.on_noncompliant(session_id, slot.station, slot.desired.event_id,
                                                             f"limit refused {slot.rejections} times"))
                return
        slot.applied = None
        self._start(session_id)

    def unanswered(self, session_id: str, purpose: str, key: object) -> bool:
        """No outcome webhook in time for a call eDRV accepted (HTTP 2xx). Not a refusal: nothing eDRV offers
        says whether the charger holds it (a session read has no limit field), and when eDRV's webhooks stop,
        every call goes unanswered. Sent once more, in case it was lost on its way; unanswered again, it is
        taken as done, not re-sent in a loop. True when it is sent again."""
        slot = self._slots.get(session_id)
        if slot is None or slot.ended or slot.desired is None or slot.resent_unanswered:
            return False
        if purpose == "limit" and (slot.desired.kind != "limit" or key not in (slot.desired.key, slot.sent)):
            return False  # an answer to something no longer wanted
        if purpose == "restore" and slot.desired.kind != "restore":
            return False
        slot.resent_unanswered = True
        if purpose == "restore" and slot.applied == RESTORED:
            self._still_limited(session_id)
        self.forget(session_id)
        return True

    def _still_limited(self, session_id: str) -> None:
        """A restore that eDRV accepted (HTTP 2xx) did not take at the charger: the session is limited again
        as far as the database knows, so that a restart, or a stop that restores, still lifts it."""
        if not self.dry_only:
            self.journal.submit(("state", session_id, {"limited": True}))

    def forget(self, session_id: str) -> None:
        """What eDRV holds is unknown again (a charger reconnected, an answer never came): send again."""
        slot = self._slots.get(session_id)
        if slot is not None and not slot.ended:
            slot.applied = None
            slot.changed.set()
            self._start(session_id)

    def _start(self, session_id: str) -> None:
        slot = self._slots[session_id]
        if not slot.ended and (slot.worker is None or slot.worker.done()):
            slot.worker = asyncio.create_task(self._work(session_id), name=f"dispatch-{session_id}")

    def overdue(self, after_s: float) -> list[str]:
        """Sessions whose restore has been pending longer than after_s."""
        now = time.monotonic()
        return [sid for sid, slot in self._slots.items()
                if not slot.ended and slot.desired is not None and slot.desired.kind == "restore"
                and slot.applied != RESTORED and now - slot.since > after_s]

    def drop_finished(self) -> int:
        """Forget ended sessions whose worker is done, so memory does not grow with every session ever seen."""
        done = [sid for sid, slot in self._slots.items()
                if slot.ended and (slot.worker is None or slot.worker.done())]
        for sid in done:
            del self._slots[sid]
        return len(done)

    def session_ended(self, session_id: str) -> None:
        armed = self._armed.get(session_id)
        if armed is not None:
            self._lapse(session_id, armed, "the session ended")
        slot = self._slots.get(session_id)
        if slot is not None:
            slot.ended = True
            slot.changed.set()
        if self.dry_only:
            return
        # Not awaited: should it be lost, a restart tries to restore the session and eDRV says it ended.
        self.journal.submit(("state", session_id, {"ended": True, "limited": False}))

    def pending(self) -> int:
        return sum(1 for s in self._slots.values() if s.worker is not None and not s.worker.done())

    async def drain(self, timeout: float | None = None, session_ids: list[str] | None = None) -> bool:
        """Wait until dispatch is idle (or only the given sessions are); False on timeout."""
        slots = self._slots.values() if session_ids is None else [
            self._slots[sid] for sid in session_ids if sid in self._slots]
        tasks = [s.worker for s in slots if s.worker is not None and not s.worker.done()]
        if not tasks:
            return True
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    async def stop(self) -> None:
        self.disarm("the bridge stopped")
        await self.disarmed()
        tasks = [s.worker for s in self._slots.values() if s.worker is not None and not s.worker.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.journal.flush()

    # --- the worker ----------------------------------------------------------------------------------
    def _slot(self, session_id: str, station: Station) -> _Slot:
        slot = self._slots.get(session_id)
        if slot is None:
            slot = self._slots[session_id] = _Slot(station=station, changed=asyncio.Event())
        slot.station = station
        return slot

    async def _work(self, session_id: str) -> None:
        slot = self._slots[session_id]
        try:
            while not slot.ended and slot.desired is not None and slot.applied != slot.desired.key:
                slot.changed.clear()
                want = slot.desired
                armed_id = self._take_armed(slot, want, "superseded before it was sent")
                if want.dry:
                    await self._record(session_id, slot.station, want, *self._plan(slot, want), status="dry_run",
                                       detail="dry run: not sent")
                    slot.applied = want.key
                elif want.kind == "limit":
                    await self._apply_limit(session_id, slot, want, armed_id)
                else:
                    await self._apply_restore(session_id, slot, want)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug here must not kill dispatch for the other sessions
            log.exception("dispatch for session %s failed", session_id)
        finally:  # taken up, then not sent after all
            self._take_armed(slot, None, "the session ended" if slot.ended else "dispatch stopped first")

    def _take_armed(self, slot: _Slot, want: Desired | None, why: str) -> int | None:
        """The armed row taken up for this limit, if it is the one wanted; otherwise it reads skipped."""
        armed, slot.armed = slot.armed, None
        if armed is None:
            return None
        if armed[0] == want:
            return armed[1]
        self.journal.submit(("update_action", armed[1], dict(status="skipped", detail=f"armed, not sent: {why}")))
        return None

    def _plan(self, slot: _Slot, want: Desired) -> tuple[str, str, Limit | None]:
        if want.kind == "limit":
            return "set_power_limit", "limit", want.limit
        how, limit = restore_plan(slot.station)
        if how == "clear" and slot.clear_refused:
            how, limit = "set", lift_limit(slot.station)
        kind = "clear_power_limit" if how == "clear" else "set_power_limit"
        return kind, "restore", self._sendable(slot.station, limit)

    def _sendable(self, station: Station, limit: Limit | None) -> Limit | None:
        """The limit in a unit the station takes: one of unknown kind that refused power gets current."""
        if limit is not None and limit.unit == "power" and station.id in self._current_only:
            return in_current(limit, station)
        return limit

    def _refused_power(self, station: Station, sent: Limit) -> bool:
        """eDRV refused a limit in power for a station whose kind it has not told: as eDRV simulator stations
        take current only, the station gets current from now on (True: send again at once, in current)."""
        if sent.unit != "power" or station.simulator is not None:
            return False
        if station.id not in self._current_only:  # its other sessions' calls in power may be under way
            self._current_only.add(station.id)
            log.warning("chargestation %s refused a limit in power and eDRV does not say what kind it is (an "
                        "eDRV simulator takes current only): it is sent limits in current from now on", station.id)
        return True

    async def _record(self, session_id: str, station: Station, want: Desired, kind: str, purpose: str,
                      limit: Limit | None, status: str = "planned", detail: str = "",
                      state: dict | None = None) -> int:
        """The action row (and with `state`, the session's durable state first), committed before the call;
        its id."""
        row = dict(event_id=want.event_id, session_id=session_id, chargestation_id=station.id,
                   resource_id=station.resource_id, kind=kind, purpose=purpose,
                   unit=limit.unit if limit else None, limit=limit.value if limit else None, status=status,
                   detail=detail)
        writes = ([("state", session_id, state)] if state else []) + [("add_action", row, {})]
        return (await self.journal.write(*writes))[-1]

    async def _update(self, action_id: int, pending: dict, **changes) -> None:
        """Write these changes, and those pending for the row (then no longer pending)."""
        merged = {**pending, **changes}
        pending.clear()
        await self.journal.write(("update_action", action_id, merged))

    @staticmethod
    def _limited_state(station: Station, want: Desired) -> dict:
        return dict(chargestation_id=station.id, resource_id=station.resource_id, event_id=want.event_id,
                    limited=True, ended=False, unit=want.limit.unit, limit=want.limit.value)

    async def _apply_limit(self, session_id: str, slot: _Slot, want: Desired, armed_id: int | None) -> None:
        sent = self._sendable(slot.station, want.limit)
        if armed_id is not None:
            # Recorded ahead (arm()), the session's state included; the row's time becomes the call's.
            action_id, first = armed_id, {"at": utcnow()}
            if sent != want.limit:
                first.update(unit=sent.unit, limit=sent.value)
        else:
            # Persist before acting: a crash after the POST must still find this session to restore.
            action_id = await self._record(session_id, slot.station, want, "set_power_limit", "limit", sent,
                                           state=self._limited_state(slot.station, want))
            first = {}
        slot.sent = (sent.unit, sent.value)
        outcome = await self._call(session_id, slot, want, action_id,
                                   lambda: self.client.set_power_limit(session_id, sent.unit, sent.value,
                                                                       max_retries=0), first)
        if outcome == "rejected" and self._refused_power(slot.station, sent):
            return  # the worker sends it again at once, in current
        if outcome == "ok":
            slot.applied = want.key
        elif outcome in ("rejected", "failed"):
            slot.rejections += 1
            if slot.rejections > self.limit_retries:
                slot.applied = want.key  # stop re-sending; the engine decides what non-compliance means
                if self.on_noncompliant is not None:
                    await self.on_noncompliant(session_id, slot.station, want.event_id,
                                               f"limit not applied after {slot.rejections} attempts")
            else:
                await self._wait(slot, self._backoff(slot.rejections))

    async def _apply_restore(self, session_id: str, slot: _Slot, want: Desired) -> None:
        kind, _, limit = self._plan(slot, want)
        failures = 0
        while not slot.ended and slot.desired is want:
            if kind == "clear_power_limit":
                action_id = await self._record(session_id, slot.station, want, kind, "restore", None)
                outcome = await self._call(session_id, slot, want, action_id,
                                           lambda: self.client.clear_power_limit(session_id, max_retries=0))
                if outcome == "rejected":
                    # eDRV simulator stations, and some physical ones, refuse clears: lift the limit instead.
                    slot.clear_refused = True
                    kind, limit = "set_power_limit", self._sendable(slot.station, lift_limit(slot.station))
                    continue
            else:
                action_id = await self._record(session_id, slot.station, want, kind, "restore", limit)
                outcome = await self._call(session_id, slot, want, action_id,
                                           lambda: self.client.set_power_limit(session_id, limit.unit, limit.value,
                                                                               max_retries=0))
                if outcome == "rejected" and self._refused_power(slot.station, limit):
                    limit = in_current(limit, slot.station)
                    continue
            if outcome == "ok":
                slot.applied = RESTORED
                await self.journal.write(("state", session_id, {"limited": False}))
                return
            if outcome in ("superseded", "ended"):
                return
            failures += 1  # a failed restore is retried until it succeeds or the session ends
            log.warning("restore of session %s not done yet (attempt %d); retrying", session_id, failures)
            if await self.session_gone(session_id):
                return
            await self._wait(slot, self._backoff(failures))

    async def _call(self, session_id: str, slot: _Slot, want: Desired, action_id: int, send,
                    first: dict | None = None) -> str:
        """One call with its own transport retries; returns ok | rejected | failed | superseded | ended.
        `first`: changes to the row that go with its first update, whichever it is."""
        attempts = 0
        pending = dict(first or {})
        while True:
            if slot.desired is not want or slot.ended:
                await self._update(action_id, pending, status="skipped", attempts=attempts,
                                   detail="superseded" if not slot.ended else "session ended")
                return "ended" if slot.ended else "superseded"
            attempts += 1
            try:
                action = await send()
            except EdrvRateLimited as exc:
                delay = exc.retry_after if exc.retry_after is not None else self._backoff(attempts)
                if delay > self.max_wait_s:
                    # At most once a minute at WARNING: a 429 storm over thousands of sessions is one story.
                    now = time.monotonic()
                    loud = now - self._capped_said_at >= 60
                    self._capped_said_at = now if loud else self._capped_said_at
                    log.log(logging.WARNING if loud else logging.DEBUG,
                            "eDRV rate-limits session %s and asks for %.0f s; the %s is sent again in %g s "
                            "(edrv.max_retry_after_s)", session_id, delay,
                            "restore" if want.kind == "restore" else "limit", self.max_wait_s)
                    delay = self.max_wait_s
                await self._update(action_id, pending, attempts=attempts,
                                   detail=f"rate limited; retry in {delay:.1f}s")
                await self._wait(slot, delay)
                continue
            except EdrvNotFound:
                await self._update(action_id, pending, status="skipped", attempts=attempts,
                                   detail="session not found")
                self.session_ended(session_id)
                return "ended"
            except EdrvRejected as exc:
                await self._update(action_id, pending, status="rejected", attempts=attempts, detail=exc.message[:500])
                if await self.session_gone(session_id):
                    return "ended"
                return "rejected"
            except EdrvError as exc:  # server or transport: retry with backoff, then give up on this action
                # The call may have reached the charger all the same (a timeout, a 5xx from a gateway): what
                # eDRV holds is unknown now, so whatever is wanted next is sent, a restore included.
                slot.applied = None
                if attempts >= 5:
                    await self._update(action_id, pending, status="failed", attempts=attempts, detail=str(exc)[:500])
                    return "failed"
                await self._update(action_id, pending, attempts=attempts, detail=f"{exc}; retrying"[:500])
                await self._wait(slot, self._backoff(attempts))
                continue
            # Not awaited (it shares a later commit): nothing waits on it, a restart re-sends what a limited
            # session should hold whatever its action row says, and an outcome webhook that comes first is
            # looked up again shortly (Engine._action_outcome).
            self.journal.submit(("update_action", action_id, dict(pending, status="requested", attempts=attempts,
                                                                  edrv_action_id=action.id, detail="")))
            return "ok"

    async def session_gone(self, session_id: str) -> bool:
        """eDRV's word on a session: True (and the session let go) when it has ended or is unknown to eDRV;
        False while it runs, or when eDRV could not be asked."""
        try:
            session = await self.client.get_session(session_id)
        except EdrvNotFound:
            self.session_ended(session_id)
            return True
        except EdrvError:
            return False
        if not session.running:
            self.session_ended(session_id)
            return True
        return False

    def _backoff(self, n: int) -> float:
        base = min(self.backoff_max_s, self.backoff_s * 2 ** max(0, n - 1))
        return min(self.max_wait_s, base * random.uniform(0.8, 1.2))

    async def _wait(self, slot: _Slot, seconds: float) -> None:
        """Sleep, but wake as soon as a newer desired state arrives (or forget() asks to send again now).
        Never longer than max_wait_s: this is the wait before a limit or restore is sent again."""
        try:
            await asyncio.wait_for(slot.changed.wait(), timeout=min(self.max_wait_s, max(0.0, seconds)))
        except asyncio.TimeoutError:
            pass
        # Woken once: the callers look at the desired state itself. Left set, every later wait of this worker
        # would return at once, and a retry loop would ignore its backoff and eDRV's Retry-After.
        slot.changed.clear()
