"""The bridge's HTTP server (aiohttp): eDRV webhooks, /healthz and Prometheus /metrics."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aiohttp import web

from dr_bridge.eventlog import iso

if TYPE_CHECKING:
    from dr_bridge.daemon import Bridge

log = logging.getLogger("dr_bridge.http")


class HttpServer:
    def __init__(self, cfg, bridge: "Bridge"):
        self.cfg = cfg
        self.bridge = bridge
        self.app = web.Application()
        self.app.router.add_get("/healthz", self.healthz)
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.http.host, self.cfg.http.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for
        log.info("HTTP on http://%s:%s (webhooks at %s)", self.cfg.http.host, self.port, self.cfg.http.webhook_path)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        engine = self.bridge.engine
        active = [e.event.event_id for e in engine.events.values() if e.status == "active" and e.acting]
        body = {"vtn_registered": self.bridge.ven.registered, "ven_id": engine.ven_id,
                "last_edrv_ok": iso(engine.last_edrv_ok), "active_events": active,
                "restores_pending": engine.dispatcher.pending()}
        return web.json_response(body)
