"""The event log as operators and scripts read it: CONTRACT.md's JSON shapes, built from the store.

Also the codec that keeps a normalised Event in the events table, so schedules can be rebuilt after a restart.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from typing import Any

from dr_bridge.domain import Event, SignalInterval, Station
from dr_bridge.policy import is_cap_signal
from dr_bridge.store import EventRow, Store
from dr_bridge.targets import select_by_targets


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


def event_detail(store: Store, event_id: str, limit: int | None = None, offset: int = 0) -> dict[str, Any] | None:
    """CONTRACT.md's `events show --json` object; `limit` and `offset` page through the actions."""
    row = store.get_event(event_id)
    if row is None:
        return None
    out = event_summary(row)
    out["intervals"] = [{"start": iso(i.start), "end": iso(i.end), "signal_name": i.signal_name,
                         "signal_type": i.signal_type, "value": i.value} for i in store.intervals(event_id)]
    out["actions"] = [{"at": iso(a.at), "session_id": a.session_id, "chargestation_id": a.chargestation_id,
                       "resource_id": a.resource_id, "kind": a.kind, "purpose": a.purpose, "unit": a.unit,
                       "limit": a.limit, "status": a.status, "attempts": a.attempts, "detail": a.detail,
                       "edrv_action_id": a.edrv_action_id} for a in store.action_log(event_id, limit, offset)]
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
                resource: str | None = None, stations: list[Station] | None = None) -> list[dict[str, Any]]:
    """With `resource`: the events that touched it (an action on it) or targeted it: named it, or, given the
    configured stations, selected it as the bridge selects (by its group, or the whole VEN)."""
    rows = store.events(statuses=[status] if status else None, since=since)
    if resource:
        touched = store.event_ids_touching(resource)
        mine = [s for s in stations or [] if s.resource_id == resource]

        def targeted(row) -> bool:
            targets = json.loads(row.event_json).get("targets") or {}
            return resource in (targets.get("resource_id") or []) or bool(
                select_by_targets(targets, mine, row.ven_id))

        rows = [r for r in rows if r.event_id in touched or targeted(r)]
    return [event_summary(r) for r in rows]


# --- the timeline and the auditors' export --------------------------------------------------------------
ACTION_FIELDS = ("at", "session_id", "chargestation_id", "resource_id", "kind", "purpose", "unit", "limit",
                 "status", "attempts", "detail")


def describe_action(a: dict[str, Any]) -> str:
    """What a call asked for, in words: "limit 16 A", "restore (clear)", "restore 32 A"."""
    if a["kind"] == "clear_power_limit":
        return f"{a['purpose']} (clear)"
    return f"{a['purpose']} {a['limit']:g} {'A' if a['unit'] == 'current' else 'W'}"


def timeline(d: dict[str, Any]) -> list[dict[str, Any]]:
    """The event's story in time order: received and answered, each interval, each call and its outcome,
    opt-outs, and the measured reduction once each interval was over. `d` is an `event_detail`."""
    offset = parse_iso(d["effective_start"]) - parse_iso(d["start"])
    rows: list[dict[str, Any]] = []

    def add(at: str | datetime | None, what: str, kind: str, **fields: Any) -> None:
        if at is None:
            return
        at_dt = at if isinstance(at, datetime) else parse_iso(at)
        rows.append({"at": iso(at_dt), "what": what, "kind": kind, "resource_id": None, "session_id": None,
                     "outcome": None, "attempts": None, "detail": "", **fields, "_sort": at_dt})

    # The VEN answers in the same exchange that delivers the event, so both share the receipt time.
    add(d.get("received_at"), f"received, answered {d['opt'] or '-'}", "event",
        detail=f"modification {d['modification_number']}" + (f": {d['opt_reason']}" if d.get("opt_reason") else ""))
    n = len(d["intervals"])
    for k, i in enumerate(d["intervals"], 1):
        until = parse_iso(i["end"])
        begin = parse_iso(i["start"]) + offset
        add(begin, f"interval {k} of {n}", "interval",
            detail=f"{i['signal_name']} {i['signal_type']} = {i['value']:g}"
                   + (f" until {_short(until + offset, begin)}" if until else ", open-ended"))
    if d["end"] and d["status"] != "cancelled":
        add(parse_iso(d["end"]) + offset, "event ends", "event")
    for a in d["actions"]:
        add(a["at"], describe_action(a), "action", resource_id=a["resource_id"], session_id=a["session_id"],
            outcome=a["status"], attempts=a["attempts"], detail=a["detail"])
    for o in d["opt_outs"]:
        outcome = "acknowledged" if o["acknowledged"] else "sent" if o["sent"] else "not sent"
        add(o["at"], f"opt-out ({o['source']})", "opt_out", resource_id=o["resource_id"] or "(whole event)",
            outcome=outcome, detail=o["reason"] or "")
    for p in d["performance"]:
        add(p.get("window_end"), "measured", "performance", resource_id=p["resource_id"],
            detail=describe_performance(p))
    rows.sort(key=lambda r: r.pop("_sort"))
    return rows


def describe_performance(p: dict[str, Any]) -> str:
    def kw(v: float | None) -> str:
        return "?" if v is None else f"{v:.1f}"

    pct = "" if p["reduction_pct"] is None else f" ({p['reduction_pct']:.0f} %)"
    asked = "under the event's site cap" if p["requested_kw"] is None and is_cap_signal(
        p["signal_name"], p["signal_type"]) else f"asked at most {kw(p['requested_kw'])} kW"
    return f"{kw(p['baseline_kw'])} kW before, {kw(p['mean_kw'])} kW during: down {kw(p['reduction_kw'])} kW{pct}; {asked}"


def _short(at: datetime, ref: datetime) -> str:
    """A time next to another: the clock alone on the same day."""
    return f"{at:%H:%M:%S}Z" if at.date() == ref.date() else iso(at)


def actions_csv(d: dict[str, Any]) -> str:
    """One row per action with every CONTRACT.md action field (blank for null), led by the event id."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(("event_id", *ACTION_FIELDS, "edrv_action_id"))
    for a in d["actions"]:
        w.writerow((d["event_id"], *("" if a[f] is None else a[f] for f in ACTION_FIELDS), a["edrv_action_id"] or ""))
    return out.getvalue()
