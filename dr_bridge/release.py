"""`dr-bridge release-all`: restore every session the bridge still limits, without the VTN."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from dr_bridge.config import Config
from dr_bridge.edrv.client import EdrvClient
from dr_bridge.engine import Engine
from dr_bridge.eventlog import iso
from dr_bridge.store import SessionState, SharedLimit, Store


async def release_all(cfg: Config, api_key: str, console: Console, timeout: float = 120.0) -> list[str]:
    """Returns the sessions still limited afterwards (empty on success)."""
    store = Store.for_config(cfg)
    async with EdrvClient(cfg.edrv.base_url, api_key, timeout_s=cfg.edrv.request_timeout_s,
                          max_concurrency=cfg.edrv.max_concurrency,
                          backoff_max_s=cfg.edrv.max_retry_after_s) as client:
        engine = Engine(cfg, store, client)
        todo = store.session_states(limited_only=True)
        if not todo:
            console.print("no session is limited by the bridge")
            store.close()
            return []
        console.print(f"restoring {len(todo)} session(s)...")
        handed = await engine.release_all(timeout=timeout)
        await engine.dispatcher.stop()
    left = {s.session_id for s in store.session_states(limited_only=True)}
    t = Table(title="release-all")
    for col in ("session", "station", "resource", "result"):
        t.add_column(col)
    for s in todo:
        t.add_row(s.session_id, s.chargestation_id, s.resource_id, _result(s, left, handed, store))
    console.print(t)
    store.close()
    return sorted(left)


def _result(state: SessionState, left: set[str], handed: dict[str, SharedLimit], store: Store) -> str:
    if state.session_id in handed and state.session_id in left:
        # A shared station another bridge still wants limited: lifting it would silently break that
        # bridge's event, which believes eDRV still holds its limit.
        wish = handed[state.session_id]
        return f"STILL LIMITED for bridge {wish.bridge} (event {wish.event_id or '-'}, until {iso(wish.until)})"
    if state.session_id in left:
        return "STILL LIMITED"
    return "ended" if (store.get_session_state(state.session_id) or state).ended else "restored"
