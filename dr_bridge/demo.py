"""`dr-bridge demo`: one short event, end to end, on this machine only.

A local openleadr VTN, the eDRV simulator with physical and simulator stations and running sessions, and
the real bridge on a temporary database. The VTN sends a two-interval event (level 1, then level 2); the
demo prints what eDRV receives as it happens and ends with the event log.
"""
from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from rich.console import Console

from dr_bridge.daemon import Bridge
from dr_bridge.eventlog import event_detail
from dr_bridge.rig import Rig, StationSpec, wait_for
from dr_bridge.views import print_event_detail

STATIONS = [
    StationSpec("depot-north-01", sessions=2),
    StationSpec("depot-north-02", sessions=1),
    StationSpec("depot-south-01", phases=1, sessions=1),
    StationSpec("sim-01", simulator=True, sessions=1),
    StationSpec("not-targeted-01", sessions=1),
]
TARGETS = [{"resource_id": r} for r in ("depot-north-01", "depot-north-02", "depot-south-01", "sim-01")]


async def run_demo(console: Console, keep_running: bool = False, debug: bool = False) -> int:
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dr-bridge-demo-") as tmp:
        rig = Rig(Path(tmp), STATIONS, ev_delay_s=1.0)
        await rig.start(webhooks=True)
        bridge = None
        try:
            console.print(f"[bold]eDRV simulator[/bold] at {rig.sim.base_url}: "
                          f"{len(STATIONS)} stations, {sum(s.sessions for s in STATIONS)} charging sessions")
            console.print(f"[bold]OpenADR VTN[/bold] at {rig.vtn.url}")
            bridge = await rig.started_bridge(vtn_backoff_s=0.5, register_within_s=20)
            console.print(f"bridge registered with the VTN as [bold]{bridge.ven.ven_id}[/bold]")
            start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=4)
            event_id = rig.vtn.add_event(bridge.ven.ven_id, targets=TARGETS, intervals=[
                (start, timedelta(seconds=8), 1), (start + timedelta(seconds=8), timedelta(seconds=8), 2)])
            console.print(f"VTN sends event [bold]{event_id}[/bold]: level 1 for 8 s, then level 2 for 8 s, "
                          f"starting {start:%H:%M:%S}Z, targeting {len(TARGETS)} resources")
            await _follow(console, rig, bridge, event_id, start + timedelta(seconds=16))
            await rig.sim.drain_webhooks()  # the chargers' last answers, so the log shows final statuses
            await asyncio.sleep(0.5)
            try:  # the last interval is measured a few seconds after it ends, once its readings are in
                await wait_for(lambda: len(bridge.store.performance(event_id)) >= 2 * len(TARGETS), 8)
            except TimeoutError:
                pass  # the log then says which measurements are missing
            console.print()
            print_event_detail(console, event_detail(bridge.store, event_id))
            limited = bridge.store.session_states(limited_only=True)
            console.print(f"\nsessions still limited: {len(limited)}   "
                          f"demo took {time.monotonic() - t0:.0f} s")
            console.print(f"event log page: [bold]{bridge.http.page_url(event_id)}[/bold]", highlight=False)
            if keep_running:
                console.print(f"simulator {rig.sim.base_url} and the bridge (page above, /healthz, /metrics) "
                              "keep running; Ctrl-C to stop")
                await asyncio.Event().wait()
            console.print("(the page is served while the demo runs: `dr-bridge demo --keep-running` keeps it up)")
            return 0 if not limited else 1
        finally:
            await rig.stop()
            if bridge is not None:
                await bridge.stop()


async def _follow(console: Console, rig: Rig, bridge: Bridge, event_id: str, end: datetime) -> None:
    """Print each call eDRV receives and each VTN answer, until the event is over and restored."""
    names = {sid: spec for spec, ids in rig.sessions.items() for sid in ids}
    seen_calls, seen_answers = 0, 0
    deadline = end + timedelta(seconds=10)
    while True:
        for answer in rig.vtn.responses[seen_answers:]:
            console.print(f"  VTN received {answer['opt_type']} for {answer['event_id']}")
        seen_answers = len(rig.vtn.responses)
        for sid, kind, body in rig.sim.limit_calls()[seen_calls:]:
            what = f"{body['limit']:g} {'A' if body['unit'] == 'current' else 'W'}" if body else "no limit"
            verb = "set_power_limit  " if kind == "set_power_limit" else "clear_power_limit"
            console.print(f"  {datetime.now(timezone.utc):%H:%M:%S}Z eDRV {verb} {names.get(sid, '?'):16} "
                          f"session …{sid[-8:]}: {what}")
        seen_calls = len(rig.sim.limit_calls())
        now = datetime.now(timezone.utc)
        row = bridge.store.get_event(event_id)
        if now > end and row is not None and row.status == "completed" and \
                not bridge.store.session_states(limited_only=True):
            return
        if now > deadline:
            console.print("[red]the event did not finish in time[/red]")
            return
        await asyncio.sleep(0.2)
