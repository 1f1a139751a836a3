"""A local OpenADR 2.0b VTN on openleadr's own OpenADRServer, for the tests and `dr-bridge demo`.

It is the stock openleadr VTN plus what the stock one lacks: an EiOpt service that accepts opts, a record of
every oadrCreatedEvent answer and of every telemetry value, event modification and silent removal, and empty
event distributions.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import io
import logging
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import TypeVar

import ephemeral_port_reserve
from aiohttp import web
from openleadr import OpenADRServer, enums, errors, objects, utils
from openleadr.service import OptService, VTNService, handler, vtn_service

from dr_bridge.openadr import refusing_doctype

log = logging.getLogger(__name__)

# What VENs send is validated with the same lxml: a DOCTYPE is answered 400, as openleadr answers any
# malformed message, instead of crashing the process (the demo's, say).
if not hasattr(vtn_service.validate_xml_schema, "__wrapped__"):
    vtn_service.validate_xml_schema = refusing_doctype(vtn_service.validate_xml_schema)

IntervalSpec = tuple[datetime, timedelta, float]  # (start, duration, value); duration 0 = open-ended
T = TypeVar("T")


def reserve_port(host: str) -> int:
    """A port for a server that binds it later. A port merely found free can be handed out again (to an
    outgoing connection or another bind to port 0) before that server binds it; a reserved one is left in
    TIME_WAIT, which the kernel skips when choosing ports and servers binding with SO_REUSEADDR do not mind."""
    return ephemeral_port_reserve.reserve(host)


def _signal(name: str, kind: str, specs: list[IntervalSpec], unit: str | None = None) -> objects.EventSignal:
    # SIMPLE signals carry current_value 0 until active (rule 14); openleadr warns and forces it otherwise.
    return objects.EventSignal(intervals=_intervals(specs), signal_name=name, signal_type=kind,
                               signal_id=utils.generate_id(), current_value=0.0 if name == "SIMPLE" else None,
                               measurement=_item_base(unit))


def _item_base(unit: str | None) -> objects.Measurement | None:
    """The signal's item base: "W", "kW" or "MW" (powerReal with an SI scale), or "A" (current)."""
    if unit is None:
        return None
    # A copy: openleadr's MEASUREMENTS are shared objects that a scale= would change for the whole process.
    if unit in ("W", "kW", "MW"):
        return dataclasses.replace(enums.MEASUREMENTS.REAL_POWER, scale={"W": "none", "kW": "k", "MW": "M"}[unit])
    if unit == "A":
        return dataclasses.replace(enums.MEASUREMENTS.CURRENT, scale="none")
    raise ValueError(f"unsupported item base {unit!r}: W, kW, MW or A")


def _intervals(specs: list[IntervalSpec]) -> list[dict]:
    if not specs:
        raise ValueError("an event needs at least one interval")
    return [{"dtstart": start.astimezone(timezone.utc), "duration": duration, "signal_payload": float(value),
             "uid": i} for i, (start, duration, value) in enumerate(specs)]


def _span(intervals: list[dict]) -> tuple[datetime, timedelta]:
    start = min(iv["dtstart"] for iv in intervals)
    if any(iv["duration"] == timedelta(0) for iv in intervals):
        return start, timedelta(0)  # open-ended
    return start, max(iv["dtstart"] + iv["duration"] for iv in intervals) - start


def _resource_ids(payload: dict) -> list[str]:
    by_type = payload.get("targets_by_type") or {}
    if by_type.get("resource_id"):
        return list(by_type["resource_id"])
    return [t["resource_id"] for t in payload.get("targets") or [] if t.get("resource_id")]


def _vavailability(payload: dict) -> list[dict] | None:
    vavailability = payload.get("vavailability")
    if not vavailability:
        return None
    available = (vavailability.get("components") or {}).get("available") or []
    if isinstance(available, dict):  # openleadr gives a dict, not a list, for a single window
        available = [available]
    return [{"dtstart": a.get("dtstart"), "duration": a.get("duration")} for a in available]


class _AcceptingOptService(OptService):
    """openleadr's VTN has no working EiOpt (issue #128: handlers are TODO, the route is missing)."""

    def __init__(self, vtn_id: str, record: Callable[[dict], None]):
        super().__init__(vtn_id)
        self._record = record
        self.refuse = 0  # answer the next n opts with HTTP 503

    @handler("oadrCreateOpt")
    async def create_opt(self, payload: dict) -> tuple[str, dict]:
        if self.refuse > 0:
            self.refuse -= 1
            raise errors.HTTPError(503, "opt service unavailable (test)")
        self._record(payload)
        return "oadrCreatedOpt", {"opt_id": payload["opt_id"]}

    @handler("oadrCancelOpt")
    async def cancel_opt(self, payload: dict) -> tuple[str, dict]:
        return "oadrCanceledOpt", {"opt_id": payload["opt_id"]}


@dataclasses.dataclass(frozen=True)
class VtnTls:
    """HTTPS with client certificates: `cert`/`key` serve TLS and sign the VTN's messages (a VEN pins its
    fingerprint); a VEN must present a certificate issued by `ca_file`, whose fingerprint is then bound to
    its registration, and sign its messages with it."""

    cert: str
    key: str
    ca_file: str


class LocalVtn:
    """One in-process VTN. Create, `await start()`, add events for a registered VEN, `await stop()`."""

    def __init__(self, vtn_id: str = "DR-BRIDGE-LOCAL-VTN", host: str = "127.0.0.1", port: int = 0,
                 poll_s: float = 1, telemetry_s: float | None = None, tls: VtnTls | None = None) -> None:
        """telemetry_s: the sampling interval to request for offered TELEMETRY_USAGE; None declines them."""
        if vtn_id.islower():
            # openleadr 0.5.36 VENs answer a lowercase vtnID with eiResponse 452.
            raise ValueError("vtn_id must not be all lowercase")
        self.vtn_id = vtn_id
        self.host = host
        # Chosen now, so the url is known before start() (a VEN may be pointed at a VTN that is still down).
        self.port = port or reserve_port(host)
        self.registrations: list[dict] = []  # every accepted oadrCreatePartyRegistration
        self.opts: list[dict] = []  # every oadrCreateOpt
        self.responses: list[dict] = []  # every oadrCreatedEvent answer: ven_id, event_id, opt_type
        self.telemetry_s = telemetry_s
        self.report_offers: list[dict] = []  # every offered report value: ven_id, resource_id, measurement, ...
        self.telemetry: list[dict] = []  # every received value: ven_id, resource_id, measurement, at, value
        self.cancelled_registrations: list[dict] = []  # every oadrCancelPartyRegistration sent: ven_id, ...
        self._vens: dict[str, dict] = {}
        self._cancelling: set[str] = set()  # VENs whose next poll is answered with oadrCancelPartyRegistration
        self._refuse_registrations = 0
        self._event_ven: dict[str, str] = {}  # event_id -> ven_id
        self._added: dict[str, objects.Event] = {}  # event_id -> the event as last added or changed
        self._started = False
        self._rewrites: list[list] = []  # [rewrite, answers left to rewrite]
        self.rewritten = 0  # answers sent as a rewrite changed them

        with warnings.catch_warnings():
            # openleadr stores itself under a plain string app key, which newer aiohttp warns about.
            warnings.simplefilter("ignore", getattr(web, "NotAppKeyWarning", UserWarning))
            tls_options = {} if tls is None else dict(
                http_cert=tls.cert, http_key=tls.key, http_ca_file=tls.ca_file, cert=tls.cert, key=tls.key,
                show_fingerprint=False)
            self.server = OpenADRServer(vtn_id=vtn_id, http_host=host, http_port=self.port,
                                        requested_poll_freq=timedelta(seconds=poll_s),
                                        ven_lookup=self._ven_lookup, verify_message_signatures=tls is not None,
                                        **tls_options)
        self.tls = tls
        self.server.app.middlewares.append(self._rewriting)  # now: aiohttp freezes middlewares on start
        self.server.add_handler("on_create_party_registration", self._on_create_party_registration)
        self.server.add_handler("on_register_report", self._on_register_report)

        # aiohttp freezes the router on start, so EiOpt must be routed now.
        opt_service = self._opt_service = _AcceptingOptService(vtn_id, self._record_opt)
        self.server.services["opt_service"] = opt_service
        self.server.app.router.add_post(f"{self.server.http_path_prefix}/EiOpt", opt_service.handler)

        signer = VTNService._create_message  # what the constructor just set, with or without a signing cert
        for service in self.server.services.values():
            # openleadr stores ven_lookup, the message signer and signature checking on the VTNService class,
            # shared by every server in the process; instance attributes keep this VTN's own.
            service.ven_lookup = self._ven_lookup
            service._create_message = signer
            service.verify_message_signatures = tls is not None

        event_service = self.server.services["event_service"]
        stock_request_event = event_service.request_event

        async def request_event(payload: dict) -> tuple[str, dict]:
            response_type, response_payload = await stock_request_event(payload)
            if response_type == "oadrResponse":
                # The stock VTN answers "no events" with a bare oadrResponse; a VEN can only see that its
                # last event is gone (implied cancel) from an empty oadrDistributeEvent, which is valid.
                return "oadrDistributeEvent", {"events": []}
            return response_type, response_payload

        # The poll service calls event_service.request_event; a VEN's oadrRequestEvent goes via handlers.
        event_service.request_event = request_event
        event_service.handlers["oadrRequestEvent"] = request_event

        poll_service = self.server.services["poll_service"]
        stock_poll = poll_service.handlers["oadrPoll"]

        async def poll(payload: dict) -> tuple[str, dict]:
            if payload.get("ven_id") in self._cancelling:
                return self._cancel_party_registration(payload["ven_id"])
            return await stock_poll(payload)

        poll_service.handlers["oadrPoll"] = poll
        # The stock VTN has no handler for the VEN's confirmation and answers it with an error.
        self.server.services["registration_service"].handlers["oadrCanceledPartyRegistration"] = \
            self._on_canceled_party_registration

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}{self.server.http_path_prefix}"

    async def start(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):  # openleadr prints a banner on start
            await self.server.run()
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self.server.stop()

    # ---- raw answers ------------------------------------------------------------------------------------

    def rewrite_answers(self, rewrite: Callable[[str], str | None], times: int = 1) -> None:
        """Send the next `times` answers that `rewrite` changes as it changed them (it returns None to leave
        an answer as it is): XML a third-party VTN sends that openleadr's templates cannot render. The
        rewritten XML is not re-signed."""
        self._rewrites.append([rewrite, times])

    @web.middleware
    async def _rewriting(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        response = await handler(request)
        if self._rewrites and isinstance(response, web.Response) and response.text:
            entry = self._rewrites[0]
            text = entry[0](response.text)
            if text is not None:
                response.text = text
                self.rewritten += 1
                entry[1] -= 1
                if entry[1] <= 0:
                    self._rewrites.pop(0)
        return response

    # ---- registration -----------------------------------------------------------------------------------

    def _on_create_party_registration(self, info: dict) -> tuple[str, str]:
        if self._refuse_registrations > 0:
            self._refuse_registrations -= 1
            raise errors.NotAllowedError("registrations are closed (test)")
        ven_id = info.get("ven_id") or f"VEN-{utils.generate_id()[:8]}"
        registration_id = f"REG-{utils.generate_id()[:8]}"
        record = {"ven_id": ven_id, "ven_name": info.get("ven_name"), "registration_id": registration_id,
                  "fingerprint": info.get("fingerprint")}
        self._vens[ven_id] = record
        self.registrations.append(dict(record))
        return ven_id, registration_id

    def forget_ven(self, ven_id: str) -> None:
        """Act like a VTN that lost its registrations: the VEN's next poll gets oadrRequestReregistration."""
        self._vens.pop(ven_id, None)

    def refuse_registrations(self, n: int = 1) -> None:
        """Answer the next n oadrCreatePartyRegistration with an OpenADR error (eiResponse 451, not allowed)."""
        self._refuse_registrations = n

    def cancel_registration(self, ven_id: str) -> None:
        """Cancel the VEN's registration as a VTN operator does: its next poll is answered with
        oadrCancelPartyRegistration, and the VTN forgets the VEN once it confirms."""
        self._cancelling.add(ven_id)

    def _cancel_party_registration(self, ven_id: str) -> tuple[str, dict]:
        self._cancelling.discard(ven_id)
        record = self._vens.get(ven_id) or {}
        cancelled = {"ven_id": ven_id, "registration_id": record.get("registration_id"), "confirmed": False}
        self.cancelled_registrations.append(cancelled)
        return "oadrCancelPartyRegistration", {"request_id": utils.generate_id(), "ven_id": ven_id,
                                               "registration_id": record.get("registration_id")}

    async def _on_canceled_party_registration(self, payload: dict) -> tuple[str, dict]:
        for cancelled in self.cancelled_registrations:
            if cancelled["registration_id"] == payload.get("registration_id"):
                cancelled["confirmed"] = True
                self._vens.pop(cancelled["ven_id"], None)
        return "oadrResponse", {}

    def _ven_lookup(self, ven_id: str) -> dict | None:
        return self._vens.get(ven_id)

    # ---- events -----------------------------------------------------------------------------------------

    def add_event(self, ven_id: str, *, intervals: list[IntervalSpec], signal_name: str = "SIMPLE",
                  signal_type: str = "level", targets: list[dict] | None = None,
                  start_after: timedelta | None = None, recovery: timedelta | None = None,
                  ramp_up: timedelta | None = None, test_event: bool = False, event_id: str | None = None,
                  extra_signals: list[dict] | None = None, unit: str | None = None,
                  market_context: str = "http://dr-bridge.local/programs/demo") -> str:
        """Queue an event for ven_id. unit: the signal's item base (see _item_base).
        extra_signals: [{"signal_name", "signal_type", "intervals": [...], optional "unit"}]."""
        event_id = event_id or f"EVT-{utils.generate_id()[:8]}"
        signals = [_signal(signal_name, signal_type, intervals, unit)]
        signals += [_signal(x["signal_name"], x["signal_type"], x["intervals"], x.get("unit"))
                    for x in extra_signals or []]
        start, duration = _span([iv for s in signals for iv in s.intervals])
        active_period = objects.ActivePeriod(dtstart=start, duration=duration,
                                             tolerance={"startafter": start_after} if start_after else None,
                                             ramp_up_period=ramp_up, recovery_period=recovery)
        descriptor = objects.EventDescriptor(event_id=event_id, modification_number=0,
                                             market_context=market_context, event_status="far",
                                             test_event=test_event)
        event = objects.Event(event_descriptor=descriptor, event_signals=signals,
                              targets=list(targets) if targets else [{"ven_id": ven_id}],
                              active_period=active_period)
        self.server.add_raw_event(ven_id, event, callback=self._response_callback(event))
        # add_raw_event rebuilds active_period from the intervals, dropping tolerance/ramp/recovery (#187).
        event.active_period = active_period
        self._event_ven[event_id] = ven_id
        self._added[event_id] = event
        return event_id

    def modify_event(self, event_id: str, *, intervals: list[IntervalSpec] | None = None,
                     targets: list[dict] | None = None) -> int:
        """Change the first signal's intervals and/or the targets; returns the new modification number."""
        event = self._find(event_id)
        if intervals is not None:
            event.event_signals[0].intervals = _intervals(intervals)
            start, duration = _span([iv for s in event.event_signals for iv in s.intervals])
            event.active_period = dataclasses.replace(event.active_period, dtstart=start, duration=duration)
        if targets is not None:
            event.targets = list(targets)
            event.targets_by_type = utils.group_targets_by_type(event.targets)
        # openleadr has no modify API: edit the stored event, bump its number, flag the VEN for a resend.
        number = utils.increment_event_modification_number(event)
        event.event_descriptor.modification_date_time = datetime.now(timezone.utc)
        self.server.events_updated[self._event_ven[event_id]] = True
        return number

    def cancel_event(self, event_id: str) -> None:
        self.server.cancel_event(self._event_ven[event_id], event_id)

    def relist_event(self, event_id: str) -> None:
        """List an event again as it last was, a cancelled one included: as a VTN does that missed the VEN's
        confirmation, or that lists cancelled events until their end (the stock one drops them once confirmed)."""
        ven_id, event = self._event_ven[event_id], self._added[event_id]
        if event not in self.server.events[ven_id]:
            self.server.events[ven_id].append(event)
        self.server.events_updated[ven_id] = True

    def remove_event(self, event_id: str) -> None:
        """Drop the event without a cancellation: the next distribution simply lacks it (implied cancel)."""
        ven_id = self._event_ven[event_id]
        self.server.events[ven_id].remove(self._find(event_id))
        self.server.events_updated[ven_id] = True

    def _find(self, event_id: str) -> objects.Event:
        for event in self.server.events.get(self._event_ven.get(event_id, ""), []):
            if event.event_descriptor.event_id == event_id:
                return event
        raise KeyError(f"no event {event_id} at this VTN")

    def _response_callback(self, event: objects.Event) -> Callable[..., None]:
        def on_response(ven_id: str, event_id: str, opt_type: str) -> None:
            self.responses.append({"ven_id": ven_id, "event_id": event_id, "opt_type": opt_type})
            # The stock VTN pops the callback after the first answer; re-arm it to see changes of mind.
            self.server.event_callbacks[event_id] = (event, on_response)
        return on_response

    def refuse_opts(self, n: int = 1) -> None:
        """Answer the next n oadrCreateOpt with HTTP 503 (they are not recorded in `opts`)."""
        self._opt_service.refuse = n

    def _record_opt(self, payload: dict) -> None:
        self.opts.append({"ven_id": payload.get("ven_id"), "opt_id": payload.get("opt_id"),
                          "event_id": payload.get("event_id"),
                          "modification_number": payload.get("modification_number"),
                          "opt_type": payload.get("opt_type"), "opt_reason": payload.get("opt_reason"),
                          "resource_ids": _resource_ids(payload),
                          "targets": copy.deepcopy(payload.get("targets")),
                          "vavailability": _vavailability(payload)})

    # ---- reports ----------------------------------------------------------------------------------------

    def _on_register_report(self, ven_id: str, resource_id: str, measurement: str, unit: str | None,
                            scale: str | None, min_sampling_interval: timedelta,
                            max_sampling_interval: timedelta) -> tuple | None:
        # openleadr calls this "compact" form once per offered r_id (it recognises it by the argument names).
        self.report_offers.append({"ven_id": ven_id, "resource_id": resource_id, "measurement": measurement,
                                   "unit": unit, "scale": scale, "min_sampling": min_sampling_interval,
                                   "max_sampling": max_sampling_interval})
        if self.telemetry_s is None or measurement == "Status":
            return None
        wanted = timedelta(seconds=self.telemetry_s)
        sampling = min(max(wanted, min_sampling_interval), max_sampling_interval)
        return partial(self._record_values, ven_id=ven_id, resource_id=resource_id, measurement=measurement), \
            sampling

    def _record_values(self, data: list, ven_id: str, resource_id: str, measurement: str) -> None:
        for at, value in data:
            self.telemetry.append({"ven_id": ven_id, "resource_id": resource_id, "measurement": measurement,
                                   "at": at, "value": value})

    # ---- test helper ------------------------------------------------------------------------------------

    @staticmethod
    async def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
        """Poll predicate until it is truthy and return its value; TimeoutError after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            await asyncio.sleep(interval)
