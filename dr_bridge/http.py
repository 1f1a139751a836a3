"""The bridge's HTTP server (aiohttp): eDRV webhooks, /healthz, Prometheus /metrics and the event-log pages
(pages.py; behind the `http.token_env` token when one is configured).

Webhooks are persisted before they are answered (200, empty body) and processed afterwards, so a crash
between the two loses nothing; bad input gets a 4xx and one log line, never a 5xx. Without a webhook secret
they are refused unless `edrv.allow_unsigned_webhooks` says otherwise: the path is open to whoever reaches it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dr_bridge import pages
from dr_bridge.checkconfig import webhook_warnings
from dr_bridge.edrv.webhooks import BadWebhook, parse, too_old_to_tell, verify
from dr_bridge.eventlog import iso
from dr_bridge.health import Reason
from dr_bridge.store import utcnow

if TYPE_CHECKING:
    from dr_bridge.daemon import Bridge

log = logging.getLogger("dr_bridge.http")
MAX_WEBHOOK_BYTES = 1 << 20
WEBHOOK_TRIES = 3  # handling a webhook, before it is left for the next start to replay
WEBHOOK_RETRY_S = 1.0  # times the attempt number
UNSIGNED_REFUSED = ("unsigned webhooks are refused: no webhook secret is configured (set edrv.webhook_secret_env, "
                    "or edrv.allow_unsigned_webhooks = true to accept them unsigned)")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_events = Gauge("drbridge_active_events", "Events currently limiting stations", registry=r)
        self.actions = Gauge("drbridge_actions", "Action rows by status", ["status"], registry=r)
        self.restores_pending = Gauge("drbridge_restores_pending", "Sessions limited by the bridge", registry=r)
        self.webhook_lag = Histogram("drbridge_webhook_lag_seconds", "eDRV createdAt to receipt",
                                     buckets=(0.1, 0.5, 1, 2, 5, 15, 60, 300), registry=r)
        self.ready = Gauge("drbridge_ready", "1 while the bridge can act, 0 while /readyz answers 503", registry=r)
        self.not_ready = Gauge("drbridge_not_ready", "1 for each reason the bridge cannot act now", ["reason"],
                               registry=r)
        self.edrv_latency = Histogram("drbridge_edrv_call_seconds", "eDRV API call latency", ["op", "outcome"],
                                      registry=r)


class HttpServer:
    def __init__(self, cfg, bridge: "Bridge", metrics: Metrics):
        self.cfg = cfg
        self.bridge = bridge
        self.metrics = metrics
        self.secret = cfg.webhook_secret()
        self.last_webhook = None
        # /metrics stays open like /healthz: aggregate counts and latencies only (no event, resource or session
        # ids), and Prometheus scrapers already pointed at it keep working.
        exempt = {cfg.http.webhook_path, "/healthz", "/livez", "/readyz", "/metrics"}
        self.token_required = bool(cfg.http.token_env)
        token = pages.token_middleware(cfg.http_token(), self.token_required, exempt)
        self.app = web.Application(client_max_size=MAX_WEBHOOK_BYTES, middlewares=[token])
        self.app.router.add_post(cfg.http.webhook_path, self.webhook)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.healthz)
        self.app.router.add_get("/livez", self.livez)
        self.app.router.add_get("/metrics", self.metrics_page)
        pages.mount(self.app, lambda: self.bridge.store, cfg)
        self.runner: web.AppRunner | None = None
        self.port: int | None = None
        self._tasks: set[asyncio.Task] = set()
        self._variants_seen: set[str] = set()
        self._unsigned_refused = 0

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.http.host, self.cfg.http.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        log.info("HTTP on http://%s:%s (webhooks at %s; event log at /events%s)", self.cfg.http.host, self.port,
                 self.cfg.http.webhook_path, ", token required" if self.token_required else "")
        for where, problem in webhook_warnings(self.cfg):
            log.warning("config: %s (%s in %s)", problem, where, self.cfg.path)
        if not self.secret and not self.cfg.edrv.allow_unsigned_webhooks:
            # Safe, but the bridge then hears of sessions only by listing them, and gets no readings.
            log.warning("no webhook secret (edrv.webhook_secret_env): eDRV's webhooks are refused, so a session "
                        "starting mid-event waits for the next listing (edrv.reconcile_interval_s) and there is no "
                        "telemetry; set the secret, or edrv.allow_unsigned_webhooks = true to accept them unsigned")
        if self.token_required and self.cfg.http_token() is None:
            log.warning("http.token_env names %s, which is unset: the event-log pages refuse every request",
                        self.cfg.http.token_env)
        for row in self.bridge.store.unprocessed_webhooks():  # received before a crash, not yet processed
            self._process(row.id, parse(row.body.encode()))

    def page_url(self, event_id: str | None = None) -> str:
        """The event-log page's address, for people (the demo prints it)."""
        from urllib.parse import quote

        host = self.cfg.http.host if ":" not in self.cfg.http.host else f"[{self.cfg.http.host}]"
        return f"http://{host}:{self.port}/events" + (f"/{quote(event_id, safe='')}" if event_id else "")

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.runner is not None:
            await self.runner.cleanup()

    async def webhook(self, request: web.Request) -> web.Response:
        peer = request.remote
        try:
            if request.content_length is not None and request.content_length > MAX_WEBHOOK_BYTES:
                raise BadWebhook(413, f"body of {request.content_length} bytes is too large")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise BadWebhook(413, "body is too large") from None
            variant = None
            if self.secret:
                variant = verify(request.headers.get("edrv-signature"), body, self.secret, time.time())
            elif not self.cfg.edrv.allow_unsigned_webhooks:
                raise BadWebhook(401, UNSIGNED_REFUSED)
            env = parse(body)
            # processed webhooks (the duplicate check) are kept as long as readings
            too_old_to_tell(variant, env.created_at, utcnow(),
                            self.bridge.engine.cfg.bridge.readings_retention_days * 86400)
        except BadWebhook as exc:
            self._refused(peer, exc)
            if exc.status == 401:
                self.bridge.engine.webhook_refused(exc.reason)
            return web.Response(status=exc.status)
        # Stored (committed) before eDRV hears 200, so a crash loses nothing; group-committed with everything
        # else in flight, as energy reports alone come every 30-60 s per session.
        (fresh,) = await self.bridge.engine.journal.write(("webhook", dict(
            id=env.id, type=env.type, created_at=env.created_at, body=body.decode("utf-8", "replace")), {}))
        self.last_webhook = utcnow()
        if env.created_at is not None:
            self.metrics.webhook_lag.observe(max(0.0, (self.last_webhook - env.created_at).total_seconds()))
        if not fresh:
            log.debug("webhook %s (%s) is a duplicate; ignored", env.id, env.type)
        else:
            if variant and variant not in self._variants_seen:
                self._variants_seen.add(variant)  # once per form: which one eDRV really uses is worth knowing
                log.info("webhook signatures verified as %s", variant)
            self._process(env.id, env)
        return web.Response(status=200)

    def _refused(self, peer: str | None, exc: BadWebhook) -> None:
        if exc.reason is not UNSIGNED_REFUSED:
            log.warning("webhook from %s refused (%d): %s", peer, exc.status, exc.reason)
            return
        # Every webhook eDRV sends is refused for the same reason, energy reports every minute per session:
        # said once at WARNING (and at start, by the config warnings), then counted at DEBUG.
        self._unsigned_refused += 1
        log.log(logging.WARNING if self._unsigned_refused == 1 else logging.DEBUG,
                "webhook from %s refused (401): %s (%d refused so far)", peer, exc.reason, self._unsigned_refused)

    def _process(self, webhook_id: str, env) -> None:
        async def run() -> None:
            for attempt in range(1, WEBHOOK_TRIES + 1):
                try:
                    await self.bridge.engine.on_webhook(env)
                except Exception:
                    # Typically the database away for a moment. Marked processed, the webhook (a charger's
                    # answer, a session's start or end) would be lost; left unprocessed, a restart replays it.
                    log.exception("processing webhook %s (%s) failed (attempt %d of %d)", env.id, env.type,
                                  attempt, WEBHOOK_TRIES)
                    if attempt < WEBHOOK_TRIES:
                        await asyncio.sleep(WEBHOOK_RETRY_S * attempt)
                    continue
                self.bridge.engine.journal.submit(("webhook_processed", webhook_id, {}))
                return
            log.error("webhook %s (%s) is left unprocessed: the next start replays it", env.id, env.type)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def health(self) -> tuple[bool, dict]:
        """Readiness: 200 only while the bridge can act; otherwise 503 and every reason it cannot."""
        engine = self.bridge.engine
        not_ready = self.bridge.readiness.not_ready()
        ready = not not_ready
        body = {"ok": ready, "ready": ready,
                "not_ready": [{"reason": str(r), "detail": d} for r, d in not_ready.items()],
                "vtn_registered": self.bridge.ven.registered, "ven_id": engine.ven_id,
                "last_edrv_ok": iso(engine.last_edrv_ok), "last_webhook": iso(self.last_webhook),
                "active_events": engine.active_event_ids(), "restores_pending": len(engine.limited_sessions()),
                "restores_overdue": engine.overdue_restores()}
        return ready, body

    async def healthz(self, request: web.Request) -> web.Response:
        ok, body = self.health()
        return web.json_response(body, status=200 if ok else 503)

    async def livez(self, request: web.Request) -> web.Response:
        """Liveness: the process and its event loop answer. Nothing here may wait on a peer or the database."""
        return web.json_response({"alive": True})

    async def metrics_page(self, request: web.Request) -> web.Response:
        engine = self.bridge.engine
        not_ready = self.bridge.readiness.not_ready()
        self.metrics.ready.set(0 if not_ready else 1)
        for reason in Reason:
            self.metrics.not_ready.labels(reason=reason.name.lower()).set(1 if reason in not_ready else 0)
        self.metrics.active_events.set(len(engine.active_event_ids()))
        self.metrics.restores_pending.set(len(engine.limited_sessions()))
        for status, n in self.bridge.store.action_counts().items():
            self.metrics.actions.labels(status=status).set(n)
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

