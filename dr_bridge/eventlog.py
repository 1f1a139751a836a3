"""The event log as operators and scripts read it: CONTRACT.md's JSON shapes, built from the store.

Also the codec that keeps a normalised Event in the events table, so schedules can be rebuilt after a restart.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Any

from dr_bridge.domain import Event, SignalInterval
from dr_bridge.store import EventRow, Store


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 UTC with a Z, as everywhere in the product."""
    if dt is None:
        return None
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


# --- Event <-> JSON ---------------------------------------------------------------------------------
def event_to_json(ev: Event) -> str:
    def conv(v: Any) -> Any:
        if isinstance(v, datetime):
            return iso(v)
        if isinstance(v, timedelta):
            return v.total_seconds()
        return v

    d = {k: conv(v) for k, v in asdict(ev).items() if k != "intervals"}
    d["intervals"] = [{k: conv(v) for k, v in asdict(iv).items()} for iv in ev.intervals]
    return json.dumps(d, sort_keys=True)


def event_from_json(text: str) -> Event:
    d = json.loads(text)
    secs = lambda v: None if v is None else timedelta(seconds=v)  # noqa: E731
    return Event(
        event_id=d["event_id"], modification_number=d["modification_number"], start=parse_iso(d["start"]),
        end=parse_iso(d["end"]), targets=d.get("targets") or {}, event_status=d.get("event_status", "far"),
        test_event=d.get("test_event", False), priority=d.get("priority", 0), market_context=d.get("market_context"),
        start_after=secs(d.get("start_after")) or timedelta(0), ramp_up=secs(d.get("ramp_up")),
        recovery=secs(d.get("recovery")), response_required=d.get("response_required", "always"),
        intervals=[SignalInterval(iv["signal_name"], iv["signal_type"], parse_iso(iv["start"]), parse_iso(iv["end"]),
                                  iv["value"]) for iv in d["intervals"]])


# --- the read model -----------------------------------------------------------------------------------
def event_summary(row: EventRow) -> dict[str, Any]:
    return {
        "event_id": row.event_id, "ven_id": row.ven_id, "modification_number": row.modification_number,
        "status": row.status, "opt": row.opt, "opt_reason": row.opt_reason, "start": iso(row.start),
        "end": iso(row.end), "effective_start": iso(row.effective_start), "test_event": row.test_event,
        "dry_run": row.dry_run, "received_at": iso(row.received_at),
    }


def event_detail(store: Store, event_id: str) -> dict[str, Any] | None:
    row = store.get_event(event_id)
    if row is None:
        return None
    out = event_summary(row)
    out["intervals"] = [{"start": iso(i.start), "end": iso(i.end), "signal_name": i.signal_name,
                         "signal_type": i.signal_type, "value": i.value} for i in store.intervals(event_id)]
    out["actions"] = [{"at": iso(a.at), "session_id": a.session_id, "chargestation_id": a.chargestation_id,
                       "resource_id": a.resource_id, "kind": a.kind, "purpose": a.purpose, "unit": a.unit,
                       "limit": a.limit, "status": a.status, "attempts": a.attempts, "detail": a.detail,
                       "edrv_action_id": a.edrv_action_id} for a in store.actions(event_id=event_id)]
    out["opt_outs"] = [{"at": iso(o.at), "resource_id": o.resource_id, "reason": o.reason, "source": o.source,
                        "sent": o.sent, "acknowledged": o.acknowledged, "opt_reason": o.opt_reason,
                        "modification_number": o.modification_number, "attempts": o.attempts}
                       for o in store.opt_outs(event_id)]
    out["performance"] = [{"resource_id": p.resource_id, "interval_start": iso(p.interval_start),
                           "baseline_kw": p.baseline_kw, "mean_kw": p.mean_kw, "reduction_kw": p.reduction_kw,
                           "reduction_pct": p.reduction_pct, "requested_kw": p.requested_kw,
                           "signal_name": p.signal_name, "signal_type": p.signal_type,
                           "window_start": iso(p.window_start), "window_end": iso(p.window_end),
                           "baseline_start": iso(p.baseline_start), "baseline_end": iso(p.baseline_end)}
                          for p in store.performance(event_id)]
    return out


def list_events(store: Store, *, since: datetime | None = None, status: str | None = None,
                resource: str | None = None) -> list[dict[str, Any]]:
    rows = store.events(statuses=[status] if status else None, since=since)
    if resource:
        touched = {a.event_id for a in store.actions() if a.resource_id == resource}
        rows = [r for r in rows if r.event_id in touched or resource in json.loads(r.event_json)
                .get("targets", {}).get("resource_id", [])]
    return [event_summary(r) for r in rows]
