"""The OpenADR 2.0b VEN adapter: the only VEN-side module that imports openleadr.

openleadr (0.5.36) does the XML, polling and event bookkeeping; this module adds what the bridge needs on
top of it: a registration loop that survives a VTN that is down, a copy of each event into domain types,
implied-cancellation detection, single-resource opt-outs and TELEMETRY_USAGE reports.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

from lxml import etree
from lxml.etree import XMLSyntaxError
from openleadr import OpenADRClient, enums, objects, utils
from openleadr import client as openleadr_client

from dr_bridge.domain import Event, SignalInterval
from dr_bridge.targets import UNREADABLE

log = logging.getLogger(__name__)

# openleadr's client.py sets its own logger to INFO on import, which floods the daemon's log.
openleadr_log = logging.getLogger("openleadr")
openleadr_log.setLevel(logging.WARNING)

OPT_TYPES = ("optIn", "optOut")


def refusing_doctype(validate: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """openleadr's schema validation, but a message with a document type declaration is refused first.

    The lxml wheels (libxml2 2.14) crash the process (SIGSEGV: no restore, no log line) validating a
    message that uses an internal entity; OpenADR messages never need one. Refused as a malformed message
    is (XMLSyntaxError): openleadr logs one warning and drops it, and the VEN goes on polling.
    """
    def guarded(content: Any) -> Any:
        try:
            text = content.decode("utf-8") if isinstance(content, bytes) else str(content)
        except UnicodeDecodeError:  # openleadr itself reads messages as UTF-8 only
            raise XMLSyntaxError("refused a message that is not UTF-8", 0, 1, 1) from None
        if "<!DOCTYPE" in text or "<!ENTITY" in text:
            raise XMLSyntaxError("refused a message with a DOCTYPE or ENTITY declaration (not allowed in "
                                 "OpenADR; it could crash the XML parser)", 0, 1, 1)
        return validate(content)

    guarded.__wrapped__ = validate  # type: ignore[attr-defined]
    return guarded


# The client's only way into lxml for what the VTN sends (OpenADRClient._perform_request); LocalVtn guards
# the VTN side likewise.
if not hasattr(openleadr_client.validate_xml_schema, "__wrapped__"):
    openleadr_client.validate_xml_schema = refusing_doctype(openleadr_client.validate_xml_schema)

OnEvent = Callable[[Event], Awaitable[tuple[str, str]]]
OnRegistered = Callable[[str, str], Awaitable[None] | None]
OnEventList = Callable[[set[str]], Awaitable[None] | None]

WATCH_S = 5.0  # how often a registered VEN checks that it still polls (a lost registration is told at once)
# A VTN that answered none of this many polls in a row, and for at least SILENT_MIN_S, is reported silent.
SILENT_POLLS = 3
SILENT_MIN_S = 10.0
TELEMETRY_REPORT_ID = "dr-bridge-telemetry-usage"  # stable, so a VTN sees the same report after a restart


@dataclass(frozen=True)
class Telemetry:
    """TELEMETRY_USAGE offered to the VTN: real power in kW per resource, sent at the rate the VTN asks for
    within [min_sampling, max_sampling]. read_kw(resource_id) gives the power now, None when unknown."""

    resource_ids: list[str]
    read_kw: Callable[[str], float | None]
    min_sampling: timedelta = timedelta(seconds=10)
    max_sampling: timedelta = timedelta(hours=1)


# --------------------------------------------------------------------------------------------------------
# Normalisation: openleadr's event dict -> domain.Event
# --------------------------------------------------------------------------------------------------------

def _as_utc(value: Any) -> datetime:
    """An aware UTC datetime from a datetime or an ISO 8601 string (naive means UTC)."""
    if isinstance(value, str):
        # openleadr only parses timestamps ending in Z and passes any other one on as the raw string.
        value = datetime.fromisoformat(value.strip())
    if not isinstance(value, datetime):
        raise ValueError(f"not a timestamp: {value!r}")
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _as_timedelta(value: Any) -> timedelta:
    if value is None:
        return timedelta(0)
    if isinstance(value, timedelta):
        return value
    return utils.parse_duration(str(value))


def _optional_timedelta(value: Any) -> timedelta | None:
    return None if value is None else _as_timedelta(value)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        # OpenADR rule 006: every testEvent value other than "false" means a test event.
        return value.strip().lower() != "false"
    return bool(value)


# openleadr's name of each EMIX location target -> the bridge's (targets.LOCATION_KINDS) and the key of its id.
_LOCATIONS = {"aggregated_pnode": ("aggregatedPnode", "node"), "end_device_asset": ("endDeviceAsset", "mrid"),
              "meter_asset": ("meterAsset", "mrid"), "pnode": ("pnode", "node"),
              "service_area": ("serviceArea", "id"), "service_delivery_point": ("serviceDeliveryPoint", "node"),
              "service_location": ("serviceLocation", "id")}
_PLAIN_TARGETS = ("resource_id", "group_id", "group_name", "ven_id", "party_id")


def _targets(d: dict) -> dict[str, list[str]]:
    """{kind: ids}; a target no id could be read from is listed by kind under targets.UNREADABLE, so it
    selects no station rather than, read as no target at all, every one."""
    by_type = d.get("targets_by_type")
    if not by_type:
        by_type = {}
        for target in d.get("targets") or []:
            for kind, value in (target or {}).items():
                if value is not None:
                    by_type.setdefault(kind, []).append(value)
    result: dict[str, list[str]] = {}
    for kind, values in by_type.items():
        name, key = _LOCATIONS.get(kind, (kind, None))
        for value in values if isinstance(values, list) else [values]:
            if value is None:
                continue
            ident = value.get(key) if key is not None and isinstance(value, dict) else value
            if kind in _PLAIN_TARGETS or key is not None:
                if isinstance(ident, (str, int)) and str(ident).strip():
                    result.setdefault(name, []).append(str(ident).strip())
                    continue
            result.setdefault(UNREADABLE, []).append(_camel(name))
    return result


def _camel(kind: str) -> str:
    head, *rest = kind.split("_")
    return head + "".join(part.capitalize() for part in rest)


_NS = {"ei": "http://docs.oasis-open.org/ns/energyinterop/201110", "gml": "http://www.opengis.net/gml/3.2",
       "emix": "http://docs.oasis-open.org/ns/emix/2011/06", "power": "http://docs.oasis-open.org/ns/emix/2011/06/power"}
_FEATURE_TARGETS = (("service_area", "ei:eiTarget/emix:serviceArea/gml:FeatureCollection"),
                    ("service_location", "ei:eiTarget/power:serviceLocation/gml:FeatureCollection"))
_SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def feature_ids(xml: str) -> dict[str, dict[str, list[str | None]]]:
    """{event_id: {"service_area"|"service_location": [gml:id of each FeatureCollection, None without]}}.

    openleadr drops XML attributes, and with them the only id an area or a location has.
    """
    if "FeatureCollection" not in xml:
        return {}
    found: dict[str, dict[str, list[str | None]]] = {}
    for event in etree.fromstring(xml.encode(), _SAFE_PARSER).iterfind(".//ei:eiEvent", _NS):
        event_id = event.findtext("ei:eventDescriptor/ei:eventID", namespaces=_NS)
        for kind, path in _FEATURE_TARGETS:
            ids = [fc.get(f"{{{_NS['gml']}}}id") for fc in event.iterfind(path, _NS)]
            if ids and event_id is not None:
                found.setdefault(event_id, {})[kind] = ids
    return found


def _signals(d: dict) -> list[dict]:
    signals = d.get("event_signals") or []
    if isinstance(signals, dict):  # openleadr itself allows this nesting (client._on_event)
        signals = signals.get("event_signals") or []
    return signals


# Setpoints are amounts in the signal's item base; the domain keeps them in kW.
_SETPOINTS = {("LOAD_CONTROL", "x-loadControlSetpoint"), ("LOAD_DISPATCH", "setpoint")}
_WATT_UNITS = {"W": 1.0, "kW": 1e3, "MW": 1e6}
_SI_SCALE = {"p": 1e-12, "n": 1e-9, "micro": 1e-6, "m": 1e-3, "c": 1e-2, "d": 1e-1, "none": 1.0,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _watts_per_unit(measurement: Any) -> float | None:
    """Watts per unit of a setpoint value, from the item base (powerReal W with an SI scale code); kW when
    there is none. None when the item base is not a power."""
    if not isinstance(measurement, dict):
        return 1000.0  # no item base: the bridge reads setpoints as kW
    unit = str(measurement.get("unit") or "").strip()
    scale = str(measurement.get("scale") or "none").strip()
    if unit not in _WATT_UNITS or scale not in _SI_SCALE:
        return None
    return _WATT_UNITS[unit] * _SI_SCALE[scale]


def _intervals(signal: dict, event_start: datetime) -> list[SignalInterval]:
    result = []
    cursor = event_start
    signal_type = str(signal.get("signal_type"))
    watts = None  # per unit of the value, for setpoints only
    if (str(signal.get("signal_name")), signal_type) in _SETPOINTS:
        watts = _watts_per_unit(signal.get("measurement"))
        if watts is None:
            # Kept (the event log shows what arrived) under a type no policy acts on, so the event is
            # answered optOut with this type as the reason rather than read in the wrong unit.
            measurement = signal.get("measurement") or {}
            scale = "" if measurement.get("scale") in (None, "none") else str(measurement["scale"])
            signal_type = f"{signal_type} in {scale}{measurement.get('unit') or '?'}"
    intervals = signal.get("intervals") or []
    for i, interval in enumerate(intervals):
        # Third-party VTNs often send intervals without dtstart: they follow each other from the event start.
        start = _as_utc(interval["dtstart"]) if interval.get("dtstart") is not None else cursor
        duration = _as_timedelta(interval.get("duration"))
        if duration < timedelta(0):
            raise ValueError(f"interval {i} of {signal.get('signal_name')} has a negative duration ({duration})")
        # Zero means open-ended only on the last interval (schedule.interval_bounds); earlier, it is empty.
        end = start + duration if duration > timedelta(0) or i < len(intervals) - 1 else None
        value = float(interval.get("signal_payload") or 0.0)
        result.append(SignalInterval(signal_name=str(signal.get("signal_name")), signal_type=signal_type,
                                     start=start, end=end, value=value if watts is None else value * watts / 1000))
        cursor = start + duration
    return result


def event_from_openleadr(d: dict) -> Event:
    """Copy the event dict openleadr hands to on_event into a domain Event.

    openleadr keeps and later mutates that dict (event_status), so nothing of it is shared.
    """
    d = copy.deepcopy(d)
    descriptor = d.get("event_descriptor") or {}
    period = d.get("active_period") or {}
    start = _as_utc(period["dtstart"])
    duration = _as_timedelta(period.get("duration"))
    if duration < timedelta(0):
        raise ValueError(f"the event's duration is negative ({duration})")  # answered optOut, and logged
    intervals = [iv for signal in _signals(d) for iv in _intervals(signal, start)]
    tolerance = period.get("tolerance") or {}
    start_after = (tolerance.get("tolerate") or {}).get("startafter") or tolerance.get("startafter")
    return Event(
        event_id=str(descriptor["event_id"]),
        modification_number=int(descriptor.get("modification_number") or 0),
        start=start,
        end=start + duration if duration > timedelta(0) else None,
        intervals=intervals,
        targets=_targets(d),
        event_status=str(descriptor.get("event_status") or "far"),
        test_event=_as_bool(descriptor.get("test_event", False)),
        priority=int(descriptor.get("priority") or 0),
        market_context=descriptor.get("market_context"),
        start_after=_as_timedelta(start_after),
        # The VTN side calls them ramp_up_period/recovery_period; the VEN receives ramp_up/recovery.
        ramp_up=_optional_timedelta(period.get("ramp_up", period.get("ramp_up_period"))),
        recovery=_optional_timedelta(period.get("recovery", period.get("recovery_period"))),
        response_required=str(d.get("response_required") or "always"),
    )


def _repair_timestamps(event: dict) -> None:
    """Turn openleadr's raw-string timestamps into datetimes, in place, before openleadr uses them.

    Without this a non-Z timestamp makes determine_event_status raise: no oadrCreatedEvent is sent,
    and during the first poll client.run() itself raises.
    """
    def fix(holder: dict, key: str) -> None:
        if isinstance(holder.get(key), str):
            try:
                holder[key] = _as_utc(holder[key])
            except ValueError:
                log.warning("unparseable timestamp %r in event", holder[key])

    descriptor = event.get("event_descriptor") or {}
    fix(descriptor, "created_date_time")
    fix(descriptor, "modification_date_time")
    fix(event.get("active_period") or {}, "dtstart")
    for signal in _signals(event):
        for interval in signal.get("intervals") or []:
            fix(interval, "dtstart")


def _restore_feature_ids(event: dict, found: dict[str, dict[str, list[str | None]]]) -> None:
    """Give each serviceArea/serviceLocation target of the event the id openleadr dropped, in place."""
    by_type = event.get("targets_by_type")
    ids = found.get(str((event.get("event_descriptor") or {}).get("event_id")))
    if not ids or not isinstance(by_type, dict):
        return
    for kind, feature in ids.items():
        if kind in by_type:
            by_type[kind] = [{"id": i} for i in feature]


async def _maybe_await(result: Any) -> Any:
    if inspect.isawaitable(result):
        return await result
    return result


# --------------------------------------------------------------------------------------------------------
# The VEN
# --------------------------------------------------------------------------------------------------------

class _HeldRecords(logging.Filter):
    """Holds back openleadr's log records during a registration attempt."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        self.messages.append(record.getMessage())
        return False

    def reason(self) -> str:
        useful = [m for m in self.messages if "aborting" not in m and not m.startswith("Could not connect")]
        return (useful[-1] if useful else "no answer")[:200]

    def replay(self) -> None:
        for record in self.records:
            openleadr_log.handle(record)


class _Client(OpenADRClient):
    """OpenADRClient with a registration notice, a re-registration that does not kill the client, and a
    notice when the registration is lost."""

    def __init__(self, *args: Any, after_registration: Callable[[], Awaitable[None]],
                 on_lost: Callable[[str], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._after_registration = after_registration
        self._on_lost = on_lost

    async def create_party_registration(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().create_party_registration(*args, **kwargs)
        if result is None:
            # openleadr keeps the registration id it had when the VTN answers with an error or not at all,
            # so a refused re-registration looked like a registration that still stood.
            self.registration_id = None
        if self.registration_id:
            await self._after_registration()
        return result

    async def on_cancel_party_registration(self, message: dict) -> None:
        # openleadr answers the VTN and removes every job, polling included, and the VEN went deaf.
        await super().on_cancel_party_registration(message)
        if not self.registration_id:
            self._on_lost("the VTN cancelled the registration")

    async def _on_event(self, message: dict) -> None:
        # openleadr forgets its answer to a cancelled or completed event but keeps the event for minutes.
        # Listed again unchanged (our confirmation was lost, or the VTN keeps listing it), it would look that
        # answer up, fail, and opt out of every event in the message, new ones unseen by the bridge. Such
        # an event is handed to the bridge again instead, which answers a repeat from its event log.
        for event in message.get("events") or []:
            d = event.get("event_descriptor") or {}
            self.forget_event(d.get("event_id"), unless_answered=True)
        await super()._on_event(message)

    def forget_event(self, event_id: str | None, unless_answered: bool = False) -> None:
        """openleadr hands an event it holds to the bridge only when its modification number changes; a
        forgotten one is handed over again the next time the VTN lists it."""
        if event_id is None or (unless_answered and event_id in self.responded_events):
            return
        utils.pop_by(self.received_events, "event_descriptor.event_id", event_id)
        self.responded_events.pop(event_id, None)

    async def create_party_reregistration(self, registration_id: str | None = None) -> None:
        # openleadr stops the whole client (scheduler and session) when re-registration fails, so the VEN
        # would never poll again. The Ven registers afresh instead, with backoff.
        await self.create_party_registration(ven_id=self.ven_id,
                                             registration_id=registration_id or self.registration_id)
        if not self.registration_id:
            self._on_lost("the VTN asked for a re-registration, which failed")
            return
        # The VTN asks for reports afresh; the old requests' jobs would keep sending to ids it forgot.
        for request in self.report_requests:
            if request.get("job") is not None:
                with contextlib.suppress(Exception):
                    request["job"].remove()
        self.report_requests.clear()
        if self.reports:
            await self.register_reports(self.reports)
        await self.sync_events()


class Ven:
    """An OpenADR 2.0b VEN on openleadr's OpenADRClient, with its own registration loop.

    Pass the ven_id persisted from on_registered back in after a restart so the VTN sees the same VEN.
    openleadr cannot resume a registration, so each start (and each re-registration the VTN asks for)
    may yield a new registration_id; on_registered reports every new (ven_id, registration_id) pair.
    """

    def __init__(self, *, vtn_url: str, ven_name: str, ven_id: str | None = None,
                 registration_id: str | None = None, cert: str | None = None, key: str | None = None,
                 ca_file: str | None = None, vtn_fingerprint: str | None = None,
                 on_event: OnEvent, on_registered: OnRegistered | None = None,
                 on_event_list: OnEventList | None = None, telemetry: Telemetry | None = None,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0) -> None:
        if cert and not ca_file:
            # openleadr builds its TLS context only when cert is given, and then needs a CA file.
            raise ValueError("a TLS client cert needs ca_file to verify the VTN")
        self.vtn_url = vtn_url
        self.ven_name = ven_name
        self._ven_id = ven_id or None
        self._registration_id = registration_id or None
        self._cert, self._key, self._ca_file = cert or None, key or None, ca_file or None
        self._vtn_fingerprint = vtn_fingerprint or None
        self._on_event = on_event
        self._on_registered = on_registered
        self._on_event_list = on_event_list
        self._telemetry = telemetry
        self._offered: tuple[list, dict] | None = None  # the telemetry reports, built once (see _offer_telemetry)
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._client: _Client | None = None
        self._reported: tuple[str, str] | None = None
        self._polls_in_flight = 0
        self._stopping = asyncio.Event()
        self._lost = asyncio.Event()  # set by the client when the registration is gone
        self._feature_ids: dict[str, dict[str, list[str | None]]] = {}  # of the message being parsed
        self._lost_reason: str | None = None
        self._registered_at = 0.0  # time.monotonic() of the last registration
        self._last_answer = 0.0  # time.monotonic() of the VTN's last answer to a poll
        self._told_silent = False
        self._watcher: asyncio.Task | None = None

    # ---- state ------------------------------------------------------------------------------------------

    @property
    def ven_id(self) -> str | None:
        return self._client.ven_id if self._client and self._client.ven_id else self._ven_id

    @property
    def registration_id(self) -> str | None:
        if self._client and self._client.registration_id:
            return self._client.registration_id
        return self._registration_id

    @property
    def registered(self) -> bool:
        """Registered, and polling: without its poll job the VEN hears no event."""
        client = self._client
        if not (client and client.registration_id and client.scheduler.running):
            return False
        return any(job.func is client._poll for job in client.scheduler.get_jobs())

    def vtn_silent(self) -> float | None:
        """Seconds since the VTN last answered a poll, once that is SILENT_POLLS polls (SILENT_MIN_S at
        least) ago; None while it answers. A registration stands while the VTN is away, but no event can
        arrive meanwhile."""
        client = self._client
        if client is None or not self.registered:
            return None
        silent = time.monotonic() - self._last_answer
        limit = max(SILENT_POLLS * client.poll_frequency.total_seconds(), SILENT_MIN_S)
        return silent if silent > limit else None

    # ---- lifecycle --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Register with the VTN, retrying with backoff until it answers; returns once polling, and from
        then on registers again whenever the registration is lost, until stop()."""
        self._stopping.clear()
        await self._register()
        if self.registered and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="ven-registration")

    async def _watch(self) -> None:
        """Registers again, with backoff, once the VTN cancelled the registration, refused a re-registration
        or polling stopped: /readyz says not registered meanwhile (registered is False)."""
        delay = self._backoff_initial_s
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._lost.wait(), WATCH_S)
            if self._stopping.is_set():
                return
            self._tell_silence()
            if not self._lost.is_set() and self.registered:
                continue
            reason = self._lost_reason or "polling stopped"
            self._lost.clear()
            self._lost_reason = None
            since = time.monotonic() - self._registered_at
            if since > self._backoff_max_s:
                delay = self._backoff_initial_s  # a long-standing registration: not a VTN that keeps cancelling
            wait = random.uniform(delay / 2, delay)
            log.warning("VTN %s: registration lost (%s); registering again in %.1f s", self.vtn_url, reason, wait)
            await self._retire_client()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), wait)
            delay = min(delay * 2, self._backoff_max_s)
            await self._register()

    def _tell_silence(self) -> None:
        silent = self.vtn_silent()
        if silent is not None and not self._told_silent:
            log.warning("VTN %s has answered no poll for %.0f s: no event can reach the bridge until it does",
                        self.vtn_url, silent)
        elif silent is None and self._told_silent:
            log.info("VTN %s answers polls again", self.vtn_url)
        self._told_silent = silent is not None

    def _registration_lost(self, reason: str) -> None:
        self._lost_reason = reason
        self._lost.set()

    async def _register(self) -> None:
        """The registration loop: a new client per attempt, with jittered backoff, until registered."""
        delay = self._backoff_initial_s
        attempt = 0
        while not self._stopping.is_set():
            attempt += 1
            self._client = self._new_client()
            # openleadr logs three or four error lines per failed attempt; hold them back and log one.
            held = _HeldRecords()
            openleadr_log.addFilter(held)
            try:
                await self._client.run()
            except Exception as err:  # openleadr raises from its first poll on some malformed events
                held.messages.append(f"{type(err).__name__}: {err}")
            finally:
                openleadr_log.removeFilter(held)
            if self._stopping.is_set():
                break
            if self.registered:
                held.replay()
                self._registered_at = self._last_answer = time.monotonic()
                log.info("registered with VTN %s as ven_id=%s", self.vtn_url, self.ven_id)
                return
            await self._close_client()
            wait = random.uniform(delay / 2, delay)  # jitter, so a fleet restart does not hit the VTN at once
            log.warning("VTN %s: registration attempt %d failed (%s); retrying in %.1f s",
                        self.vtn_url, attempt, held.reason(), wait)
            with contextlib.suppress(asyncio.TimeoutError):  # stop() cuts the wait short
                await asyncio.wait_for(self._stopping.wait(), wait)
            delay = min(delay * 2, self._backoff_max_s)

    async def stop(self) -> None:
        self._stopping.set()
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await self._retire_client()

    async def _retire_client(self) -> None:
        """Stop the client's jobs (polls, reports) and close its session."""
        client = self._client
        if client is None:
            return
        if client.scheduler.running:
            # Not idempotent: the asyncio scheduler only stops on the next loop turn.
            client.scheduler.shutdown(wait=False)
        if client.report_queue_task is not None:
            client.report_queue_task.cancel()
        # Closing the session under a running poll makes APScheduler log a traceback; let it finish.
        for _ in range(100):
            if self._polls_in_flight == 0:
                break
            await asyncio.sleep(0.05)
        await self._close_client()

    def _new_client(self) -> _Client:
        if self._client is not None and self._client.ven_id:
            self._ven_id = self._client.ven_id  # a VTN-assigned id must survive a retry
        client = _Client(ven_name=self.ven_name, vtn_url=self.vtn_url, ven_id=self._ven_id,
                         cert=self._cert, key=self._key, ca_file=self._ca_file,
                         vtn_fingerprint=self._vtn_fingerprint, show_fingerprint=False,
                         after_registration=self._after_registration, on_lost=self._registration_lost)
        if self._cert:
            with open(self._cert, "rb") as f:
                log.info("VEN certificate fingerprint: %s", utils.certificate_fingerprint(f.read()))
        client.add_handler("on_event", self._handle_event)
        client.add_handler("on_update_event", self._handle_event)
        client.add_hook("before_parse_xml", self._before_parse_xml)
        client.add_hook("after_parse_xml", self._after_parse_xml)
        if self._telemetry is not None:
            self._offer_telemetry(client, self._telemetry)
        openleadr_poll = client._poll

        async def guarded_poll() -> None:
            # Counted so stop() can wait for it; caught so APScheduler logs one line, not a traceback.
            self._polls_in_flight += 1
            try:
                await openleadr_poll()
            except Exception as err:
                log.warning("poll of VTN %s failed: %s: %s", self.vtn_url, type(err).__name__, err)
            finally:
                self._polls_in_flight -= 1

        client._poll = guarded_poll  # run() schedules client._poll, so the instance attribute wins
        openleadr_request = client.poll

        async def timed_request() -> Any:
            result = await openleadr_request()
            # (None, {}): no connection, an HTTP error or a message it refused. None: an empty answer.
            if result is None or result[0] is not None:
                self._last_answer = time.monotonic()
                self._tell_silence()
            return result

        client.poll = timed_request  # what client._poll calls
        return client

    def _offer_telemetry(self, client: _Client, telemetry: Telemetry) -> None:
        # Built once and handed to every new client: add_report costs about 0.2 ms a resource on the event
        # loop, so with 2,000 stations every registration retry (a VTN outage) would stall dispatch for
        # most of a second. openleadr only reads these objects after building them.
        if self._offered is not None:
            reports, callbacks = self._offered
            client.reports, client.report_callbacks = list(reports), dict(callbacks)
            return
        # A private copy: add_report's scale= writes into openleadr's shared enums.MEASUREMENTS object, so
        # otherwise the last scale given anywhere in the process would win for every report.
        measurement = dataclasses.replace(enums.MEASUREMENTS.REAL_POWER, scale="k")
        rate = objects.SamplingRate(min_period=telemetry.min_sampling, max_period=telemetry.max_sampling,
                                    on_change=False)
        # One report with one r_id per resource: openleadr's VEN mixes up the r_ids of several reports.
        for resource_id in telemetry.resource_ids:
            client.add_report(callback=partial(self._telemetry_value, resource_id), resource_id=resource_id,
                              r_id=f"{resource_id}/power", report_specifier_id=TELEMETRY_REPORT_ID,
                              report_name="TELEMETRY_USAGE", measurement=measurement, unit="W", scale="k",
                              sampling_rate=rate, report_duration=timedelta(hours=1))
        self._offered = (list(client.reports), dict(client.report_callbacks))

    def _telemetry_value(self, resource_id: str) -> list[tuple[datetime, float]]:
        """openleadr's report callback: [(now, kW)], or no value at all when the power is unknown."""
        try:
            kw = self._telemetry.read_kw(resource_id) if self._telemetry else None
        except Exception:  # a raising callback would stop the whole report for every resource
            log.exception("reading the power of %s for telemetry failed", resource_id)
            return []
        return [] if kw is None else [(datetime.now(timezone.utc), round(kw, 3))]

    async def _close_client(self) -> None:
        client = self._client
        if client is None:
            return
        if client.client_session is not None and not client.client_session.closed:
            await client.client_session.close()
        # A closed aiohttp session cannot be reused; openleadr only makes a new one when this is None.
        client.client_session = None

    async def _after_registration(self) -> None:
        client = self._client
        if client is None or not client.ven_id or not client.registration_id:
            return
        ids = (client.ven_id, client.registration_id)
        if ids == self._reported:
            return
        self._reported = ids
        self._ven_id, self._registration_id = ids
        if self._on_registered is not None:
            try:
                await _maybe_await(self._on_registered(*ids))
            except Exception:
                log.exception("on_registered failed")

    # ---- incoming events --------------------------------------------------------------------------------

    async def _handle_event(self, d: dict) -> str:
        """openleadr's on_event and on_update_event: never raise, or openleadr opts out of every event."""
        event_id = (d.get("event_descriptor") or {}).get("event_id")
        try:
            event = event_from_openleadr(d)
        except ValueError as exc:  # read, but not an event anyone can act on (a negative duration)
            log.warning("event %s refused: %s; answering optOut", event_id, exc)
            return "optOut"
        try:
            answer = await self._on_event(event)
            opt, reason = answer
            if opt not in OPT_TYPES:
                raise ValueError(f"on_event returned {answer!r}, expected (optIn|optOut, reason)")
            log.info("event %s mod %d (%s): %s (%s)", event.event_id, event.modification_number,
                     event.event_status, opt, reason)
            return opt
        except Exception:
            log.exception("handling event %s failed; answering optOut (it is handled again if re-sent)",
                          event_id)
            if self._client is not None:
                # openleadr would answer every re-send with this optOut without asking again; the database
                # may have been away only for a moment.
                asyncio.get_running_loop().call_soon(self._client.forget_event, event_id)
            return "optOut"

    def _before_parse_xml(self, xml: str) -> None:
        if "oadrDistributeEvent" in xml:
            try:
                self._feature_ids.update(feature_ids(xml))
            except Exception as exc:  # valid against the schema already; whatever it is, never fatal
                log.warning("could not read the location targets of a distributed event: %s", exc)

    async def _after_parse_xml(self, message_type: str, payload: dict) -> None:
        if message_type != "oadrDistributeEvent":
            return
        for event in payload.get("events") or []:
            _repair_timestamps(event)
            _restore_feature_ids(event, self._feature_ids)
        self._feature_ids.clear()
        response_code = (payload.get("response") or {}).get("response_code", 200)
        if response_code != 200 or self._on_event_list is None:
            # An openleadr VTN answers a failed oadrRequestEvent with an empty, non-200 distribution:
            # that is no statement about which events exist.
            return
        # Implied cancellation (openleadr issue #92): each oadrDistributeEvent lists all of the VEN's
        # events, so an id missing from it was cancelled. An openleadr VTN only distributes when its
        # events_updated flag is set for this VEN (a new, modified or cancelled event) and answers a plain
        # oadrResponse when the list is empty, so there a removal shows up only with the next change and
        # the removal of the last event never does.
        ids = {str(e["event_descriptor"]["event_id"]) for e in payload.get("events") or []}
        if self._client is not None:
            # openleadr keeps an event the VTN stopped listing, with its answer: listed again unchanged, it
            # would answer from that cache and never hand the event to the bridge, which took it as cancelled.
            for event in list(self._client.received_events):
                gone = str((event.get("event_descriptor") or {}).get("event_id"))
                if gone not in ids:
                    self._client.forget_event(gone)
        try:
            await _maybe_await(self._on_event_list(ids))
        except Exception:
            log.exception("on_event_list failed")

    # ---- outgoing opts ----------------------------------------------------------------------------------

    async def send_opt(self, event_id: str, modification_number: int, resource_id: str, reason: str,
                       opt_type: str = "optOut", opt_id: str | None = None) -> bool:
        """oadrCreateOpt for one resource of one event; True when the VTN acknowledged it.

        reason must be an OpenADR opt reason (e.g. "notParticipating", "overrideStatus"); other text is sent
        as "notParticipating" since the schema allows nothing else.
        """
        # One target per message: openleadr renders several as several eiTarget elements, which the
        # schema forbids, so a validating VTN rejects the whole opt (HTTP 400).
        return await self._create_opt(opt_type=opt_type, reason=reason,
                                      targets=[{"resource_id": resource_id}], opt_id=opt_id,
                                      event_id=event_id, modification_number=modification_number)

    async def send_availability(self, resource_id: str, start: datetime, end: datetime,
                                reason: str = "notParticipating", opt_id: str | None = None) -> bool:
        """oadrCreateOpt optOut: resource_id is unavailable from start to end (no event id)."""
        start = _as_utc(start)
        window = objects.Vavailability(components=[
            objects.VavailabilityComponent(dtstart=start, duration=_as_utc(end) - start)])
        return await self._create_opt(opt_type="optOut", reason=reason,
                                      targets=[{"resource_id": resource_id}], vavailability=window, opt_id=opt_id)

    async def _create_opt(self, *, opt_type: str, reason: str, targets: list[dict], opt_id: str | None = None,
                          **kwargs: Any) -> bool:
        client = self._client
        if client is None or not client.ven_id:
            log.warning("not registered; opt for %s not sent", targets)
            return False
        if opt_type not in OPT_TYPES:
            raise ValueError(f"opt_type must be optIn or optOut, not {opt_type!r}")
        if reason not in enums.OPT_REASON.values:
            reason = "notParticipating"
        # A caller that retries passes the same opt_id, so a VTN that got an earlier try sees one opt.
        opt_id = opt_id or utils.generate_id()
        try:
            acknowledged = await client.create_opt(opt_type=opt_type, opt_reason=reason, targets=targets,
                                                   opt_id=opt_id, **kwargs)
        except Exception as err:
            log.warning("oadrCreateOpt for %s failed: %s: %s", targets, type(err).__name__, err)
            acknowledged = False
        if not acknowledged:
            # openleadr keeps every opt it tried (for cancel_opt); retries would pile up.
            client.opts = [o for o in client.opts if o.opt_id != opt_id]
        return bool(acknowledged)

    async def send_created_event(self, event_id: str, modification_number: int, opt_type: str) -> bool:
        """A later optIn/optOut for a whole event (oadrCreatedEvent); True when the VTN acknowledged it."""
        client = self._client
        if client is None or not client.ven_id:
            log.warning("not registered; %s for event %s not sent", opt_type, event_id)
            return False
        if opt_type not in OPT_TYPES:
            raise ValueError(f"opt_type must be optIn or optOut, not {opt_type!r}")
        # Same message as client.created_event(), which throws the VTN's answer away; we need it.
        request_id = utils.generate_id()
        message = client._create_message(
            "oadrCreatedEvent", ven_id=client.ven_id,
            response={"response_code": 200, "response_description": "OK", "request_id": request_id},
            event_responses=[{"response_code": 200, "response_description": "OK", "request_id": request_id,
                              "event_id": event_id, "modification_number": modification_number,
                              "opt_type": opt_type}])
        try:
            result = await client._perform_request("EiEvent", message)
        except Exception as err:
            log.warning("oadrCreatedEvent for %s failed: %s: %s", event_id, type(err).__name__, err)
            return False
        if not result or result[0] != "oadrResponse":
            return False
        acknowledged = (result[1].get("response") or {}).get("response_code") == 200
        if acknowledged and event_id in client.responded_events:
            # openleadr answers a re-sent event with what it answered first, without asking the bridge
            client.responded_events[event_id] = opt_type
        return acknowledged
