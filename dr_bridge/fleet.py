"""What runs where: the configured stations (each one's kind read from eDRV where the config leaves it
open), the sessions running on each as last listed or told by webhook, and the energy each still wants.

The engine decides with this picture; the Fleet only keeps it current. It owns no limits: a session that
ended is reported back, and the engine tells the dispatcher.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from functools import partial

from dr_bridge.domain import Station
from dr_bridge.edrv.errors import EdrvAuthError, EdrvError
from dr_bridge.edrv.models import Session

log = logging.getLogger("dr_bridge.fleet")


class Fleet:
    def __init__(self, stations: list[Station], client) -> None:
        self.client = client
        self.stations: dict[str, Station] = {s.id: s for s in stations}
        self.running: dict[str, list[str]] = {}  # station id -> running session ids, as last seen
        self.energy_needs: dict[str, float] = {}  # session id -> kWh still wanted, where eDRV reports a target
        self.listed_at: float | None = None  # monotonic time of the last listing of running sessions
        self._resolving: dict[str, asyncio.Task] = {}  # station id -> its kind being read from eDRV
        self._unsaid: set[str] = set()  # stations eDRV answered for without saying their kind: not asked again

    # --- running sessions ----------------------------------------------------------------------------
    async def list_running(self, station_ids: list[str]) -> tuple[set[str], set[str]] | None:
        """Ask eDRV which sessions run now on these stations: the ids of those running, and the stations whose
        sessions differ from the picture before (a session that started or ended without a webhook); None
        when eDRV did not answer (the last known list stands)."""
        try:
            # One paginated listing filtered here, rather than one query per station on every pass.
            sessions = await self.client.list_running_sessions(None if len(station_ids) > 4 else station_ids)
        except EdrvAuthError as exc:  # readiness says it once, with what to do; this comes every pass
            log.debug("could not list running sessions (%s); using the last known list", exc)
            return None
        except EdrvError as exc:
            log.warning("could not list running sessions (%s); using the last known list", exc)
            return None
        self.listed_at = time.monotonic()
        running: dict[str, list[str]] = {sid: [] for sid in station_ids}
        for s in sessions:
            if s.chargestation_id in running:
                running[s.chargestation_id].append(s.id)
                self.note_need(s)
        changed: set[str] = set()
        for sid in station_ids:
            running[sid].sort()
            if self.running.get(sid, []) != running[sid]:
                changed.add(sid)
            self.running[sid] = running[sid]
        alive = {x for ids in self.running.values() for x in ids}
        self.energy_needs = {k: v for k, v in self.energy_needs.items() if k in alive}
        return {x for ids in running.values() for x in ids}, changed

    def started(self, station_id: str, session_id: str) -> bool:
        """A webhook says this session runs; True when it is new to us."""
        known = self.running.setdefault(station_id, [])
        if session_id in known:
            return False
        known.append(session_id)
        known.sort()
        return True

    def ended(self, station_id: str, session_id: str) -> bool:
        """A webhook says this session is over; True when we had it as running."""
        self.energy_needs.pop(session_id, None)
        if session_id not in self.running.get(station_id, []):
            return False
        self.running[station_id].remove(session_id)
        return True

    def note_need(self, session: Session) -> None:
        need = session.energy_need_kwh
        if need is not None:
            self.energy_needs[session.id] = need

    def need_weights(self, sessions: dict[str, list[str]]) -> dict[str, float]:
        """Each session's share of a cap by the energy it still wants. A session whose target is met still
        counts a little, so it keeps its minimum rather than less."""
        return {sid: max(0.1, self.energy_needs[sid]) for ids in sessions.values() for sid in ids
                if sid in self.energy_needs}

    # --- station kinds -------------------------------------------------------------------------------
    async def resolve_all(self, station_ids: list[str], wait_s: float | None = None) -> None:
        """Read from eDRV the kind of each station whose config leaves it open, all at once (under a 429
        storm each read may take seconds). Waits at most wait_s: a limit does not need the kind (it goes in
        current, which every station accepts), only the restore does, so a pass does not hold its limits
        back for long; the reads go on, and a later pass uses what they found."""
        pending = self.start_resolving(station_ids)
        if pending:
            await asyncio.wait(pending, timeout=wait_s)

    def start_resolving(self, station_ids: list[str]) -> list[asyncio.Task]:
        for sid in station_ids:
            if self.stations[sid].simulator is None and sid not in self._resolving and sid not in self._unsaid:
                task = self._resolving[sid] = asyncio.create_task(self.resolve(self.stations[sid]))
                task.add_done_callback(partial(self._resolved, sid))
        return [self._resolving[sid] for sid in station_ids if sid in self._resolving]

    def _resolved(self, station_id: str, task: asyncio.Task) -> None:
        self._resolving.pop(station_id, None)
        if not task.cancelled() and task.exception() is None:
            self.stations[station_id] = task.result()

    async def resolve(self, station: Station) -> Station:
        """The station with its simulator flag filled in from eDRV, when the config leaves it to eDRV."""
        if station.simulator is not None:
            return station
        try:
            cs = await self.client.get_chargestation(station.id)
        except EdrvError as exc:
            # A refusal is said once by readiness, with what to do; this would come for every station each pass.
            log.log(logging.DEBUG if isinstance(exc, EdrvAuthError) else logging.WARNING,
                    "could not read chargestation %s (%s); treating its kind as unknown", station.id, exc)
            return station
        if cs.is_simulator is None:
            if station.id in self._unsaid:
                return station
            self._unsaid.add(station.id)
            log.warning("eDRV does not say whether chargestation %s is an eDRV simulator: it is sent limits in its "
                        "configured limit_unit (current where none is set), in current after a refusal; set "
                        "`simulator` in its config to say", station.id)
            return station
        return replace(station, simulator=cs.is_simulator)

    async def stop(self) -> None:
        for task in list(self._resolving.values()):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
