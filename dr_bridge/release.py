"""`dr-bridge release-all`: restore every session the bridge still limits, without the VTN."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from dr_bridge.config import Config
from dr_bridge.edrv.client import EdrvClient
from dr_bridge.engine import Engine
from dr_bridge.store import Store


async def release_all(cfg: Config, api_key: str, console: Console, timeout: float = 120.0) -> list[str]:
    """Returns the sessions still limited afterwards (empty on success)."""
    store = Store.for_config(cfg)
    async with EdrvClient(cfg.edrv.base_url, api_key, timeout_s=cfg.edrv.request_timeout_s,
                          max_concurrency=cfg.edrv.max_concurrency) as client:
        engine = Engine(cfg, store, client)
        todo = store.session_states(limited_only=True)
        if not todo:
            console.print("no session is limited by the bridge")
            store.close()
            return []
        console.print(f"restoring {len(todo)} session(s)...")
        await engine.release_all(timeout=timeout)
        await engine.dispatcher.stop()
    left = {s.session_id for s in store.session_states(limited_only=True)}
    t = Table(title="release-all")
    for col in ("session", "station", "resource", "result"):
        t.add_column(col)
    for s in todo:
        t.add_row(s.session_id, s.chargestation_id, s.resource_id, "STILL LIMITED" if s.session_id in left else
                  ("ended" if (store.get_session_state(s.session_id) or s).ended else "restored"))
    console.print(t)
    store.close()
    return sorted(left)
