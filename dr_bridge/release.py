"""`dr-bridge release-all`: restore every session the bridge still limits, without the VTN.

An emergency release must hold: restored sessions limited again by the events still running would undo
it, the next time a session starts on a station, at the next interval or at the next start. So it is also
the operator's opt-out of every live event the bridge opted in to, recorded in the database as
`dr-bridge opt-out` records one. A running daemon takes the opt-outs up within seconds, restores the
sessions itself, never limits again in those events and tells the VTN; a stopped one does so when it
starts, before its first pass. The VTN is not needed here.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from rich.console import Console
from rich.table import Table

from dr_bridge.config import Config
from dr_bridge.domain import ACTIVE, COMPLETED, PENDING
from dr_bridge.edrv.client import EdrvClient
from dr_bridge.engine import OPT_IN, Engine
from dr_bridge.eventlog import iso
from dr_bridge.instance import InstanceLock
from dr_bridge.optout import opt_out_of_event
from dr_bridge.store import OptOutRow, SessionState, SharedLimit, Store, is_outage

REASON = "emergency release-all by the operator"
HANDOVER_S = 20.0  # how long a running daemon gets to take up the opt-outs, and then to restore
POLL_S = 0.25


async def release_all(cfg: Config, api_key: str, console: Console, timeout: float = 120.0,
                      handover_s: float = HANDOVER_S) -> list[str]:
    """Returns the sessions still limited afterwards (empty on success)."""
    store = Store.for_config(cfg)
    try:
        return await _release_all(cfg, store, api_key, console, timeout, handover_s)
    finally:
        store.close()


async def _release_all(cfg: Config, store: Store, api_key: str, console: Console, timeout: float,
                       handover_s: float) -> list[str]:
    todo = store.session_states(limited_only=True)
    running = await asyncio.to_thread(daemon_runs, cfg)
    events = opt_out_of_live_events(cfg, store)
    for event_id in events:
        over = (row := store.get_event(event_id)) is not None and row.status == COMPLETED
        console.print(f"opted out of event {event_id} ({REASON}): "
                      + ("it is over, so the VTN is not told; the rest of its staggered restore goes now" if over
                         else "the running bridge tells the VTN" if running else
                         "the VTN is told when the bridge next runs; it limits nothing more in this event"),
                      markup=False, highlight=False)
    if running and events:
        await _hand_over(store, events, console, handover_s)
        todo += [s for s in store.session_states(limited_only=True) if s.session_id not in
                 {t.session_id for t in todo}]
    handed: dict[str, SharedLimit] = {}
    if store.session_states(limited_only=True):
        # What the daemon has not restored (an event's staggered restore still under way, a shared station,
        # or no daemon at all) is restored from here.
        console.print(f"restoring {len(store.session_states(limited_only=True))} session(s)...")
        async with EdrvClient(cfg.edrv.base_url, api_key, timeout_s=cfg.edrv.request_timeout_s,
                              max_concurrency=cfg.edrv.max_concurrency,
                              backoff_max_s=cfg.edrv.max_retry_after_s) as client:
            engine = Engine(cfg, store, client)
            handed = await engine.release_all(timeout=timeout)
            await engine.dispatcher.stop()
    if not todo:
        console.print("no session is limited by the bridge")
        return []
    left = {s.session_id for s in store.session_states(limited_only=True)}
    t = Table(title="release-all")
    for col in ("session", "station", "resource", "result"):
        t.add_column(col)
    for s in todo:
        t.add_row(s.session_id, s.chargestation_id, s.resource_id, _result(s, left, handed, store))
    console.print(t)
    return sorted(left)


def daemon_runs(cfg: Config) -> bool:
    """Whether `dr-bridge run` runs for this bridge: it holds the instance lock as long as it runs."""
    lock = InstanceLock.for_config(cfg)
    if not lock.acquire(0):
        return True
    lock.release()
    return False


def opt_out_of_live_events(cfg: Config, store: Store) -> list[str]:
    """Record the operator's opt-out of every pending or active event the bridge opted in to for real, and
    of every completed one whose staggered restore still holds a session limited (recorded for the daemon
    and the event log; the VTN is not told of an event that is over). Returns those newly opted out."""
    spreading = {s.event_id for s in store.session_states(limited_only=True) if s.event_id}
    rows = store.events(statuses=[PENDING, ACTIVE])
    rows += [r for r in map(store.get_event, sorted(spreading)) if r is not None and r.status == COMPLETED]
    done = []
    for row in rows:
        if row.opt != OPT_IN or row.dry_run:
            continue  # nothing is limited for it
        if any(o.resource_id is None and not is_outage(o) for o in store.opt_outs(row.event_id)):
            continue  # already opted out as a whole
        if row.status == COMPLETED:
            store.add_opt_out(OptOutRow(event_id=row.event_id, modification_number=row.modification_number,
                                        reason=f"{REASON}, during its staggered restore", source="operator",
                                        opt_reason="overrideStatus"))
        else:
            opt_out_of_event(cfg, store, row.event_id, [], REASON)
        done.append(row.event_id)
    return done


async def _hand_over(store: Store, events: list[str], console: Console, handover_s: float) -> None:
    """Wait for the running daemon to take up the opt-outs and restore the sessions of those events, so the
    two processes do not restore the same sessions twice."""
    def taken_up() -> bool:
        return all(o.applied for e in events for o in store.opt_outs(e) if o.resource_id is None)

    def restored() -> bool:
        return not any(s.event_id in events for s in store.session_states(limited_only=True))

    console.print("the running bridge takes up the opt-out(s) and restores...")
    if not await _poll(taken_up, handover_s):
        console.print(f"the running bridge has not taken up the opt-out(s) within {handover_s:g} s: "
                      "restoring from here (it limits nothing more in those events once it does)",
                      markup=False, highlight=False)
        return
    if not await _poll(restored, handover_s):
        console.print(f"the running bridge has not restored every session within {handover_s:g} s: "
                      "restoring the rest from here", markup=False, highlight=False)


async def _poll(predicate: Callable[[], bool], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


def _result(state: SessionState, left: set[str], handed: dict[str, SharedLimit], store: Store) -> str:
    if state.session_id in handed and state.session_id in left:
        # A shared station another bridge still wants limited: lifting it would silently break that
        # bridge's event, which believes eDRV still holds its limit.
        wish = handed[state.session_id]
        return f"STILL LIMITED for bridge {wish.bridge} (event {wish.event_id or '-'}, until {iso(wish.until)})"
    if state.session_id in left:
        return "STILL LIMITED"
    return "ended" if (store.get_session_state(state.session_id) or state).ended else "restored"
