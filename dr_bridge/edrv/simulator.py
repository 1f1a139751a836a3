"""The eDRV simulator: a local stand-in for the eDRV API v1.1, for rehearsals, the demo and tests.

It hosts physical-like stations (set and clear, current or power) and eDRV "simulator" stations
(is_simulator: set with unit current only, no clear), answers in eDRV's `{ok, message, result}` envelope,
sends the webhooks a real account would, and models each EV's draw so that a limit shows up in the power
reports a few seconds later. Everything random comes from RNGs seeded with `seed`, so a run repeats.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import aiohttp
from aiohttp import web

log = logging.getLogger("dr_bridge.edrv.simulator")

API_PREFIX = "/v1.1"
_KEEP = 50_000  # recorded requests/webhooks kept, so a long rehearsal does not grow without bound
Naming = Literal["accepted", "completed"]
Refuse = Literal["http", "webhook"] | None


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _epoch(t: float | datetime) -> float:
    return t.timestamp() if isinstance(t, datetime) else float(t)


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    json: Any
    at: float  # unix seconds
    status: int | None = None  # the HTTP status the simulator answered
    headers: dict[str, str] = field(default_factory=dict)  # as sent, but for Authorization


@dataclass
class Faults:
    """Injected misbehaviour. Rates are probabilities per API request (or per webhook)."""

    latency_s: float = 0.0
    error_rate: float = 0.0  # answer 503
    rate_limit_rate: float = 0.0  # answer 429 with Retry-After
    retry_after_s: float = 1.0
    drop_webhook_rate: float = 0.0
    methods: tuple[str, ...] | None = None  # e.g. ("POST",): faults hit only limit calls, not listings
    _fail_next: list[int] = field(default_factory=list)
    _fail_after_next: list[int] = field(default_factory=list)
    _drop_next: int = 0

    def fail_next(self, n: int = 1, status: int = 503) -> None:
        """The next n API requests fail with `status` (429 carries Retry-After), before any effect."""
        self._fail_next.extend([status] * n)

    def fail_after_effect_next(self, n: int = 1, status: int = 504) -> None:
        """The next n API requests take effect, then fail with `status`: a gateway that gave up waiting on a
        backend that did the work. The client cannot tell whether its call landed."""
        self._fail_after_next.extend([status] * n)

    def drop_next_webhooks(self, n: int = 1) -> None:
        self._drop_next += n

    def update(self, **values: Any) -> None:
        for key in ("latency_s", "error_rate", "rate_limit_rate", "retry_after_s", "drop_webhook_rate"):
            if values.get(key) is not None:
                setattr(self, key, float(values[key]))


@dataclass
class _Station:
    id: str
    simulator: bool
    protocol: str
    max_current: float
    phases: int
    voltage: float
    connectors: list[str]
    naming: Naming
    refuse: Refuse
    online: bool
    watts_style: bool  # energy reports in W strings instead of kW numbers, as some accounts do
    created: float


@dataclass
class _Session:
    id: str
    station_id: str
    connector_id: str
    ev_max_current: float | None
    started: float
    status: str = "Started"
    ended: float | None = None
    limit_a: float | None = None  # what the EV obeys now; None: no limit
    target_energy_kwh: float | None = None  # the driver's energy target, if any
    pending: list[tuple[float, float | None]] = field(default_factory=list)  # (effective at, limit_a)
    history: list[tuple[float, float]] = field(default_factory=list)  # (unix s, kW), a step function
    updated: float = 0.0


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _envelope(ok: bool, message: str, result: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.json_response({"ok": ok, "message": message, "result": result}, status=status, headers=headers)


class EdrvSimulator:
    def __init__(self, api_key: str = "sim-key", *, webhook_url: str | None = None,
                 webhook_secret: str | None = None, signature_style: Literal["v1", "sha256"] = "v1",
                 seed: int = 0, ev_delay_s: float = 2.0, report_interval_s: float = 5.0,
                 page_size_max: int = 1000, page_flags: bool = True, report_is_simulator: bool = True,
                 simulator_power_refusal: Literal["http", "webhook"] = "http", outcome_delay_s: float = 0.05,
                 ignore_session_filters: bool = False,
                 status_case: Literal["title", "lower", "upper"] = "title") -> None:
        self.api_key = api_key
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.signature_style = signature_style
        self.ev_delay_s = ev_delay_s
        self.report_interval_s = report_interval_s
        self.page_size_max = page_size_max  # eDRV serves at most this many items a page, whatever is asked
        self.page_flags = page_flags  # list responses carry hasNext/hasPrevious, as eDRV's v1 lists did
        self.report_is_simulator = report_is_simulator  # chargestations carry is_simulator (newer eDRV docs only)
        # How simulator stations refuse a limit in power: HTTP 400 at once, or accepted, then a .rejected webhook
        self.simulator_power_refusal = simulator_power_refusal
        self.outcome_delay_s = outcome_delay_s  # the charge point's answer trails the .requested webhook
        self.ignore_session_filters = ignore_session_filters  # pretend eDRV ignores ?status=&chargestation=
        self.status_case = status_case  # eDRV's docs show both "Started" and "started"
        # Running sessions that listings leave out, as a listing by page number does when another session
        # ends between two of its pages; they are still there to GET and to limit.
        self.unlisted: set[str] = set()
        self.faults = Faults()
        self.requests: list[RecordedRequest] = []
        self.webhooks_sent: list[dict[str, Any]] = []
        self.webhooks_dropped: list[dict[str, Any]] = []
        self.base_url = ""
        self.port = 0
        self._ids = random.Random(f"{seed}-ids")
        self._fault_rng = random.Random(f"{seed}-faults")
        self._ev_rng = random.Random(f"{seed}-ev")
        self._stations: dict[str, _Station] = {}
        self._sessions: dict[str, _Session] = {}
        self._queue: asyncio.Queue[tuple[float, dict[str, Any]]] = asyncio.Queue()
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._http: aiohttp.ClientSession | None = None
        self._delivery_failing = False

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_routes([
            web.get(API_PREFIX + "/chargestations", self._list_stations),
            web.get(API_PREFIX + "/chargestations/{id}", self._get_station),
            web.get(API_PREFIX + "/sessions", self._list_sessions),
            web.get(API_PREFIX + "/sessions/{id}", self._get_session),
            web.post(API_PREFIX + "/sessions/{id}/set_power_limit", self._set_limit),
            web.post(API_PREFIX + "/sessions/{id}/clear_power_limit", self._clear_limit),
            web.get(API_PREFIX + "/sessions/{id}/stop", self._stop_session),
            web.post("/_admin/stations", self._admin_add_station),
            web.post("/_admin/stations/{id}/{state:online|offline}", self._admin_online),
            web.post("/_admin/sessions", self._admin_start_session),
            web.post("/_admin/sessions/{id}/end", self._admin_end_session),
            web.get("/_admin/requests", self._admin_requests),
            web.get("/_admin/state", self._admin_state),
            web.post("/_admin/faults", self._admin_faults),
        ])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{self.port}{API_PREFIX}"
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._tasks = [asyncio.create_task(self._deliver_forever()), asyncio.create_task(self._report_forever())]
        return self.base_url

    async def stop(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await self.drain_webhooks(timeout=1.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._http:
            await self._http.close()
            self._http = None
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> EdrvSimulator:
        if not self.base_url:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def drain_webhooks(self, timeout: float = 5.0) -> None:
        """Wait until every queued webhook has been delivered (or dropped)."""
        await asyncio.wait_for(self._queue.join(), timeout)

    # --- admin Python API -------------------------------------------------------------------------

    def _new_id(self) -> str:
        return f"{self._ids.getrandbits(96):024x}"

    def add_station(self, station_id: str | None = None, *, simulator: bool = False, protocol: str = "ocpp1.6",
                    max_current: float = 32, phases: int = 3, voltage: float = 230, connectors: int = 2,
                    naming: Naming = "accepted", refuse: Refuse = None, online: bool = True) -> str:
        if naming not in ("accepted", "completed") or refuse not in (None, "http", "webhook"):
            raise ValueError(f"bad naming {naming!r} or refuse {refuse!r}")
        sid = station_id or self._new_id()
        if sid in self._stations:
            raise ValueError(f"station {sid} exists")
        self._stations[sid] = _Station(
            id=sid, simulator=simulator, protocol=protocol, max_current=float(max_current), phases=int(phases),
            voltage=float(voltage), connectors=[self._new_id() for _ in range(max(1, connectors))],
            naming=naming, refuse=refuse, online=online, watts_style=len(self._stations) % 2 == 1,
            created=time.time())
        return sid

    def start_session(self, station_id: str, *, ev_max_current: float | None = None,
                      target_energy_kwh: float | None = None, send_webhook: bool = True) -> str:
        station = self._stations[station_id]
        busy = {s.connector_id for s in self._sessions.values() if s.station_id == station_id and s.ended is None}
        free = [c for c in station.connectors if c not in busy]
        if not free:
            raise ValueError(f"station {station_id} has no free connector")
        now = time.time()
        session = _Session(id=self._new_id(), station_id=station_id, connector_id=free[0],
                           ev_max_current=ev_max_current, started=now, updated=now,
                           target_energy_kwh=target_energy_kwh)
        self._sessions[session.id] = session
        session.history.append((now, self._draw_kw(session)))
        if send_webhook:
            self._webhook("session", "session.started", self._session_json(session))
        return session.id

    def end_session(self, session_id: str, send_webhook: bool = True) -> None:
        session = self._sessions[session_id]
        if session.ended is not None:
            return
        now = time.time()
        self._advance(session, now)
        session.status, session.ended, session.updated, session.pending = "Ended", now, now, []
        session.history.append((now, 0.0))
        if send_webhook:
            self._webhook("session", "session.ended", self._session_json(session))

    def set_online(self, station_id: str, online: bool, send_webhook: bool = True) -> None:
        station = self._stations[station_id]
        station.online = online
        if send_webhook:
            kind = "online" if online else "offline"
            self._webhook("chargestation", f"chargestation.{kind}", self._station_json(station))

    def set_refuse(self, station_id: str, refuse: Refuse) -> None:
        """From now on the station refuses limit calls (by HTTP 400 or by outcome webhook), or obeys again."""
        if refuse not in (None, "http", "webhook"):
            raise ValueError(f"bad refuse {refuse!r}")
        self._stations[station_id].refuse = refuse

    def clear_requests(self) -> None:
        self.requests.clear()

    def limit_calls(self) -> list[tuple[str, str, Any]]:
        """Every set/clear POST received, as (session_id, "set_power_limit"|"clear_power_limit", body)."""
        calls = []
        for r in self.requests:
            parts = r.path.split("/")  # ["", "v1.1", "sessions", id, kind]
            if r.method == "POST" and len(parts) == 5 and parts[4] in ("set_power_limit", "clear_power_limit"):
                calls.append((parts[3], parts[4], r.json))
        return calls

    def station_ids(self) -> list[str]:
        return list(self._stations)

    def station_info(self, station_id: str) -> dict[str, Any]:
        st = self._stations[station_id]
        return {"id": st.id, "simulator": st.simulator, "protocol": st.protocol, "max_current": st.max_current,
                "phases": st.phases, "voltage": st.voltage, "online": st.online, "naming": st.naming,
                "refuse": st.refuse}

    def session_ids(self, station_id: str | None = None, running_only: bool = True) -> list[str]:
        return [s.id for s in self._sessions.values() if (station_id is None or s.station_id == station_id)
                and (not running_only or s.ended is None)]

    def session_limit(self, session_id: str) -> float | None:
        """The limit (A per phase) the EV obeys right now; None when unlimited."""
        session = self._sessions[session_id]
        self._advance(session, time.time())
        return session.limit_a

    def session_power_kw(self, session_id: str) -> float:
        session = self._sessions[session_id]
        self._advance(session, time.time())
        return self._draw_kw(session)

    def station_power_kw(self, station_id: str) -> float:
        return sum(self.session_power_kw(s.id) for s in self._sessions.values() if s.station_id == station_id)

    def mean_power_kw(self, station_id: str, t_from: float | datetime, t_to: float | datetime) -> float:
        """Time-weighted mean of the station's recorded power between two instants (unix s or datetime)."""
        start, end = _epoch(t_from), _epoch(t_to)
        if end <= start:
            raise ValueError("t_to must be after t_from")
        sessions = [s for s in self._sessions.values() if s.station_id == station_id]
        for s in sessions:
            self._advance(s, min(end, time.time()))
        return sum(_integrate(s.history, start, end) for s in sessions) / (end - start)

    # --- EV model ---------------------------------------------------------------------------------

    def _draw_kw(self, session: _Session) -> float:
        if session.ended is not None:
            return 0.0
        station = self._stations[session.station_id]
        amps = min(x for x in (station.max_current, session.ev_max_current, session.limit_a) if x is not None)
        return round(max(0.0, amps) * station.voltage * station.phases / 1000.0, 3)

    def _advance(self, session: _Session, now: float) -> None:
        """Apply the limits whose EV reaction time has passed, recording the step at its own instant."""
        while session.pending and session.pending[0][0] <= now and session.ended is None:
            at, limit = session.pending.pop(0)
            session.limit_a = limit
            session.history.append((at, self._draw_kw(session)))

    def _schedule_limit(self, session: _Session, limit_a: float | None) -> None:
        at = time.time() + self.ev_delay_s * self._ev_rng.uniform(0.8, 1.2)
        if session.pending:  # keep them in order even when the jitter would swap two
            at = max(at, session.pending[-1][0])
        session.pending.append((at, limit_a))

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(self.report_interval_s)
            now = time.time()
            for session in list(self._sessions.values()):
                if session.ended is None:
                    self._advance(session, now)
                    if session.history[-1][1] != self._draw_kw(session):  # a step function needs only changes
                        session.history.append((now, self._draw_kw(session)))
                    session.updated = now
                    self._webhook("session", "session.updated", self._session_json(session))

    # --- JSON shapes ------------------------------------------------------------------------------

    def _station_json(self, station: _Station) -> dict[str, Any]:
        busy = {s.connector_id for s in self._sessions.values() if s.station_id == station.id and s.ended is None}
        power_kw = round(station.max_current * station.voltage * station.phases / 1000.0, 1)
        kind = {"is_simulator": station.simulator} if self.report_is_simulator else {}
        return {
            "_id": station.id, "protocol": station.protocol, "online": station.online, "active": True,
            "public": False, **kind, "model": "dr-bridge-sim",
            "endpoint": f"sim-{station.id[-6:]}",
            "connectors": [{"_id": c, "chargestation": station.id, "active": True, "type": "Type2",
                            "format": "SOCKET", "power": power_kw,
                            "power_type": "AC_3_PHASE" if station.phases == 3 else "AC_1_PHASE",
                            "status": "Charging" if c in busy else "Available"} for c in station.connectors],
            "createdAt": iso(station.created), "updatedAt": iso(station.created),
        }

    def _session_json(self, session: _Session) -> dict[str, Any]:
        station = self._stations[session.station_id]
        kw = self._draw_kw(session)
        amps = round(kw * 1000.0 / (station.voltage * station.phases), 2)
        if station.watts_style:
            report = {"power": {"value": f"{kw * 1000:.0f}", "unit": "W"}, "current": {"value": f"{amps}", "unit": "A"}}
        else:
            report = {"power": {"value": kw, "unit": "kW"}, "current": {"value": amps, "unit": "A"}}
        energy_wh = _integrate(session.history, session.started, session.ended or time.time()) / 3.6  # kW*s -> Wh
        state = "Charging" if kw else "SuspendedEVSE"
        return {
            "_id": session.id, "user": None, "chargestation": station.id, "connector": session.connector_id,
            "status": getattr(session.status, self.status_case)(), "reservation": None,
            "target": {} if session.target_energy_kwh is None else {"energy": session.target_energy_kwh},
            "configurations": {"include_raw_energy_report": False},
            "metrics": {"chargingStart": iso(session.started),
                        "chargingStop": iso(session.ended) if session.ended else None,
                        "energyConsumed": round(energy_wh, 1), "chargingState": state},
            "energy_report": {"timestamp": iso(session.updated), **report},
            "createdAt": iso(session.started), "updatedAt": iso(session.updated),
        }

    # --- webhooks ---------------------------------------------------------------------------------

    def _webhook(self, obj: str, type_: str, data: dict[str, Any], delay_s: float = 0.0) -> None:
        now = time.time()
        envelope = {"_id": self._new_id(), "object": obj, "type": type_, "data": data, "createdAt": iso(now)}
        self._queue.put_nowait((now + delay_s, envelope))

    def _sign(self, body: bytes) -> dict[str, str]:
        if not self.webhook_secret:
            return {}
        key = self.webhook_secret.encode()
        if self.signature_style == "sha256":
            return {"edrv-signature": "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()}
        t = str(int(time.time()))
        digest = hmac.new(key, t.encode() + b"." + body, hashlib.sha256).hexdigest()
        return {"edrv-signature": f"t={t},v1={digest}"}

    async def _deliver_forever(self) -> None:
        # One queue, one worker: webhooks leave in the order they were raised, as eDRV's FIFO events do.
        while True:
            not_before, envelope = await self._queue.get()
            try:
                await asyncio.sleep(max(0.0, not_before - time.time()))
                await self._deliver(envelope)
            except Exception as exc:  # a receiver being down must not stop the simulator
                # warn once per outage, not once per webhook, so a rehearsal without a bridge stays readable
                level = logging.DEBUG if self._delivery_failing else logging.WARNING
                log.log(level, "webhook %s to %s not delivered: %r", envelope["type"], self.webhook_url, exc)
                self._delivery_failing = True
            finally:
                self._queue.task_done()

    async def _deliver(self, envelope: dict[str, Any]) -> None:
        f = self.faults
        if f._drop_next > 0 or (f.drop_webhook_rate and self._fault_rng.random() < f.drop_webhook_rate):
            f._drop_next = max(0, f._drop_next - 1)
            _keep(self.webhooks_dropped, envelope)
            return
        _keep(self.webhooks_sent, envelope)
        if not self.webhook_url or self._http is None:
            return
        body = json.dumps(envelope).encode()  # ensure_ascii: eDRV signs the escaped-unicode form
        headers = {"Content-Type": "application/json", **self._sign(body)}
        async with self._http.post(self.webhook_url, data=body, headers=headers) as resp:
            if self._delivery_failing:
                log.warning("webhook delivery to %s works again", self.webhook_url)
                self._delivery_failing = False
            if resp.status >= 300:
                log.warning("webhook %s: receiver answered HTTP %d", envelope["type"], resp.status)

    # --- HTTP: auth, recording, faults ------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if request.path.startswith("/_admin"):
            return await self._guard(request, handler)  # the operator's own tool: not recorded, no auth
        body: Any = None
        if request.body_exists:
            try:
                body = await request.json()
            except ValueError:
                body = "<invalid json>"
        record = RecordedRequest(request.method, request.path, dict(request.query), body, time.time(),
                                 headers={k: v for k, v in request.headers.items() if k.lower() != "authorization"})
        _keep(self.requests, record)
        response = await self._api(request, handler, body)
        record.status = response.status
        if request.method == "POST":  # limit calls are what an operator watches during a rehearsal
            log.info("%s %s %s -> %d", request.method, request.path, json.dumps(body), response.status)
        return response

    async def _api(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                   body: Any) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return _envelope(False, "unauthorized", None, 401)
        if not hmac.compare_digest(auth[7:].strip().encode(), self.api_key.encode()):
            return _envelope(False, "jwt expired", None, 401)
        f = self.faults
        if f.methods is not None and request.method not in f.methods:
            return await self._guard(request, handler)
        if f.latency_s:
            await asyncio.sleep(f.latency_s)
        status = f._fail_next.pop(0) if f._fail_next else None
        if status is None and f.rate_limit_rate and self._fault_rng.random() < f.rate_limit_rate:
            status = 429
        if status is None and f.error_rate and self._fault_rng.random() < f.error_rate:
            status = 503
        if status == 429:
            return _envelope(False, "Too many requests", None, 429, {"Retry-After": f"{f.retry_after_s:g}"})
        if status is not None:
            return _envelope(False, "Service unavailable (injected)", None, status)
        if body == "<invalid json>":
            return _envelope(False, "Invalid JSON body", None, 400)
        response = await self._guard(request, handler)
        if f._fail_after_next:
            return _envelope(False, "Gateway timeout (injected, after the effect)", None, f._fail_after_next.pop(0))
        return response

    @staticmethod
    async def _guard(request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Reject as exc:
            return _envelope(False, exc.message, None, exc.status)
        except web.HTTPNotFound:
            return _envelope(False, "Not found", None, 404)
        except web.HTTPMethodNotAllowed:
            return _envelope(False, "Method not allowed", None, 405)

    # --- HTTP: eDRV API ---------------------------------------------------------------------------

    def _page(self, request: web.Request, items: list[Any], to_json: Callable[[Any], Any]) -> web.Response:
        """One page of items; only that page is serialised, so listing 10,000 sessions stays linear."""
        try:
            limit = min(self.page_size_max, max(1, int(request.query.get("paginate_limit", 20))))
            page = max(1, int(request.query.get("paginate_page", 1)))
        except ValueError:
            raise _Reject(400, "paginate_limit and paginate_page must be integers") from None
        chunk = [to_json(item) for item in items[(page - 1) * limit: page * limit]]
        flags = {"hasNext": page * limit < len(items), "hasPrevious": page > 1} if self.page_flags else {}
        return web.json_response({"ok": True, "message": "", "result": chunk, **flags})

    def _station(self, request: web.Request) -> _Station:
        station = self._stations.get(request.match_info["id"])
        if station is None:
            raise _Reject(404, "Chargestation not found")
        return station

    def _session(self, request: web.Request) -> _Session:
        session = self._sessions.get(request.match_info["id"])
        if session is None:
            raise _Reject(404, "Session not found")
        self._advance(session, time.time())
        return session

    async def _list_stations(self, request: web.Request) -> web.Response:
        return self._page(request, list(self._stations.values()), self._station_json)

    async def _get_station(self, request: web.Request) -> web.Response:
        return _envelope(True, "", self._station_json(self._station(request)))

    async def _list_sessions(self, request: web.Request) -> web.Response:
        status = request.query.get("status")
        station = request.query.get("chargestation")
        sessions = [s for s in self._sessions.values() if s.id not in self.unlisted]
        if not self.ignore_session_filters:
            sessions = [s for s in sessions if (not status or s.status.lower() == status.lower())
                        and (not station or s.station_id == station)]
        now = time.time()

        def to_json(session: _Session) -> dict[str, Any]:
            self._advance(session, now)
            return self._session_json(session)

        return self._page(request, sessions, to_json)

    async def _get_session(self, request: web.Request) -> web.Response:
        return _envelope(True, "", self._session_json(self._session(request)))

    async def _stop_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        if session.ended is not None:
            raise _Reject(400, "Session has already ended")
        self.end_session(session.id)
        return _envelope(True, "Session stop requested", None)

    def _limit_target(self, request: web.Request) -> tuple[_Session, _Station]:
        session = self._session(request)
        station = self._stations[session.station_id]
        if session.ended is not None:
            raise _Reject(400, "Session is not running")
        if not station.online:
            raise _Reject(400, "Chargestation is offline")
        return session, station

    async def _set_limit(self, request: web.Request) -> web.Response:
        session, station = self._limit_target(request)
        body = await request.json() if request.body_exists else None  # aiohttp kept the bytes
        unit = body.get("unit") if isinstance(body, dict) else None
        limit = body.get("limit") if isinstance(body, dict) else None
        if unit not in ("current", "power") or isinstance(limit, bool) or not isinstance(limit, (int, float)) \
                or limit < 0:
            raise _Reject(400, "Body must be {unit: 'current'|'power', limit: number >= 0}")
        refused = station.simulator and unit != "current"
        if refused and self.simulator_power_refusal == "http":
            raise _Reject(400, "eDRV Simulators currently only support set_power_limit with unit = current")
        limit_a = float(limit) if unit == "current" else float(limit) / (station.voltage * station.phases)
        return self._act(session, station, "set_power_limit", {"unit": unit, "limit": limit}, limit_a, refused)

    async def _clear_limit(self, request: web.Request) -> web.Response:
        session, station = self._limit_target(request)
        if station.simulator:
            raise _Reject(400, "Clear Power Limit is only available on physical chargestations")
        return self._act(session, station, "clear_power_limit", {}, None)

    def _act(self, session: _Session, station: _Station, kind: str, data: dict[str, Any],
             limit_a: float | None, refused: bool = False) -> web.Response:
        if station.refuse == "http":
            raise _Reject(400, "Chargestation rejected the request")
        now = iso(time.time())
        action = {"_id": self._new_id(), "type": f"session.{kind}", "status": "requested",
                  "chargestation": station.id, "connector": session.connector_id, "session": session.id,
                  "data": data, "response_data": {}, "createdAt": now, "updatedAt": now}
        self._webhook("action", f"session.{kind}.requested", dict(action))
        refused = refused or station.refuse == "webhook"
        suffix = {("accepted", False): "accepted", ("completed", False): "completed",
                  ("accepted", True): "rejected", ("completed", True): "failed"}[(station.naming, refused)]
        outcome = {**action, "status": "failed" if refused else "completed",
                   "response_data": {"status": "Rejected" if refused else "Accepted"}}
        self._webhook("action", f"session.{kind}.{suffix}", outcome, delay_s=self.outcome_delay_s)
        if not refused:
            self._schedule_limit(session, limit_a)
        message = "Session Set Power Limit Requested" if kind == "set_power_limit" else \
            "Session Clear Power Limit Requested"
        return _envelope(True, message, action, 201)

    # --- HTTP: admin (loopback tool, no auth) -----------------------------------------------------

    async def _admin_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json() if request.body_exists else {}
        except ValueError:
            raise _Reject(400, "Invalid JSON body") from None
        if not isinstance(body, dict):
            raise _Reject(400, "expected a JSON object")
        return body

    async def _admin_add_station(self, request: web.Request) -> web.Response:
        body = await self._admin_body(request)
        allowed = {"station_id", "simulator", "protocol", "max_current", "phases", "voltage", "connectors",
                   "naming", "refuse", "online"}
        if set(body) - allowed:
            raise _Reject(400, f"unknown fields: {sorted(set(body) - allowed)}")
        try:
            sid = self.add_station(**body)
        except (TypeError, ValueError) as exc:
            raise _Reject(400, str(exc)) from None
        return _envelope(True, "", self._station_json(self._stations[sid]), 201)

    async def _admin_online(self, request: web.Request) -> web.Response:
        station = self._station(request)
        self.set_online(station.id, request.match_info["state"] == "online")
        return _envelope(True, "", self._station_json(station))

    async def _admin_start_session(self, request: web.Request) -> web.Response:
        body = await self._admin_body(request)
        if body.get("station_id") not in self._stations:
            raise _Reject(404, "Chargestation not found")
        try:
            sid = self.start_session(body["station_id"], ev_max_current=body.get("ev_max_current"))
        except ValueError as exc:
            raise _Reject(400, str(exc)) from None
        return _envelope(True, "", self._session_json(self._sessions[sid]), 201)

    async def _admin_end_session(self, request: web.Request) -> web.Response:
        session = self._session(request)
        self.end_session(session.id)
        return _envelope(True, "", self._session_json(session))

    async def _admin_requests(self, request: web.Request) -> web.Response:
        return _envelope(True, "", [{"method": r.method, "path": r.path, "query": r.query, "json": r.json,
                                     "at": iso(r.at), "status": r.status} for r in self.requests])

    async def _admin_state(self, request: web.Request) -> web.Response:
        sessions = [{**self._session_json(s), "limit_a": s.limit_a} for s in self._sessions.values()]
        return _envelope(True, "", {"stations": [self._station_json(s) for s in self._stations.values()],
                                    "sessions": sessions})

    async def _admin_faults(self, request: web.Request) -> web.Response:
        body = await self._admin_body(request)
        self.faults.update(**body)
        if body.get("fail_next"):
            spec = body["fail_next"]
            self.faults.fail_next(int(spec.get("n", 1)), int(spec.get("status", 503)))
        if body.get("drop_next_webhooks"):
            self.faults.drop_next_webhooks(int(body["drop_next_webhooks"]))
        f = self.faults
        return _envelope(True, "", {"latency_s": f.latency_s, "error_rate": f.error_rate,
                                    "rate_limit_rate": f.rate_limit_rate, "retry_after_s": f.retry_after_s,
                                    "drop_webhook_rate": f.drop_webhook_rate})


def _integrate(history: list[tuple[float, float]], start: float, end: float) -> float:
    """Integral (kW*s) of a step function given as sorted (t, kW) change points, 0 before the first."""
    total = 0.0
    for i, (t, value) in enumerate(history):
        t_next = history[i + 1][0] if i + 1 < len(history) else end
        a, b = max(t, start), min(t_next, end)
        if b > a:
            total += value * (b - a)
    return total


def _keep(log_list: list, item: Any) -> None:
    log_list.append(item)
    if len(log_list) > _KEEP:
        del log_list[: len(log_list) - _KEEP // 2]
