"""The event page's chart data: per resource, the power it drew and the limit the bridge sent, on one time axis.

Power is the sum of the resource's sessions' readings, each held until the next for at most HOLD (as the
measured reduction counts it, performance.py). The limit is the sum of the limits in force on its sessions,
in kW through the station's wiring: a session keeps its last limit until its next call, and a restore ends
it. Rejected, failed and skipped calls never took effect and are left out; a dry run's are drawn as planned.
A session that ended without a restore keeps counting until the event's last call: the log has no end time.
"""
from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any

from dr_bridge.eventlog import parse_iso
from dr_bridge.performance import HOLD
from dr_bridge.reporting import samples
from dr_bridge.store import Store

MAX_RESOURCES = 12  # more lines than this read as noise; the page links to each omitted resource instead
MAX_POINTS = 1500  # about one per pixel of a wide chart
NOT_IN_FORCE = {"rejected", "failed", "skipped"}
DEFAULT_WATTS_PER_AMP = 230 * 3  # a station since removed from the config: assume three-phase 230 V


def chart_data(store: Store, cfg, d: dict[str, Any], resource: str | None = None) -> dict[str, Any]:
    stations = {s.id: s for s in cfg.stations()}
    offset = parse_iso(d["effective_start"]) - parse_iso(d["start"])
    intervals = [(parse_iso(i["start"]) + offset, parse_iso(i["end"]) and parse_iso(i["end"]) + offset,
                  f"{i['signal_type']} {i['value']:g}") for i in d["intervals"]]
    actions = [a for a in d["actions"] if a["status"] not in NOT_IN_FORCE]
    resource_of = {a["chargestation_id"]: a["resource_id"] for a in d["actions"]}
    resources = sorted(set(resource_of.values()))
    if resource is not None:
        resources = [r for r in resources if r == resource]
    shown, omitted = resources[:MAX_RESOURCES], resources[MAX_RESOURCES:]

    # From the baseline window before the start (what the reduction is measured against), or from the first
    # reading when the bridge heard of none that early, so the event is not squeezed into a corner.
    start = parse_iso(d["effective_start"])
    t0, t1 = start - timedelta(minutes=cfg.bridge.baseline_minutes), _chart_end(d, intervals, actions)
    wanted = [cs for cs, r in resource_of.items() if r in shown]
    readings = store.reading_log(wanted, t0, t1) if wanted else []
    t0 = min(start, max(t0, readings[0].at)) if readings else min(start, t0 + (start - t0) * 0.9)

    step = max(0.1, (t1 - t0).total_seconds() / MAX_POINTS)
    grid: set[float] = {0.0, _q(t1, t0, step)}
    grid |= {_q(t, t0, step) for s, e, _ in intervals for t in (s, e) if t is not None and t0 <= t <= t1}
    limits: dict[str, dict[str, list[tuple[float, float | None]]]] = defaultdict(lambda: defaultdict(list))
    for a in actions:
        if a["resource_id"] in shown:
            t = _q(parse_iso(a["at"]), t0, step)
            limits[a["resource_id"]][a["session_id"]].append((t, _limit_kw(a, stations)))
            grid.add(t)
    power: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    station_of = {r.session_id: r.chargestation_id for r in readings}
    for s in samples(readings, stations):
        t = _q(s.at, t0, step)
        power[resource_of[station_of[s.session_id]]][s.session_id].append((t, s.kw))
        grid.add(t)

    xs = sorted(grid)
    hold = HOLD.total_seconds()
    return {
        "event_id": d["event_id"], "unit": "kW",
        "x": [round(t0.timestamp() + x, 3) for x in xs],
        "intervals": [{"start": s.timestamp(), "end": e.timestamp() if e else None, "label": label}
                      for s, e, label in intervals],
        "resources": [{"resource_id": r, "power": _held_sum(power[r], xs, hold),
                       "limit": _held_sum(limits[r], xs, None)} for r in shown],
        "omitted": omitted,
    }


def _chart_end(d: dict[str, Any], intervals, actions) -> datetime:
    ends = [e for _, e, _ in intervals if e is not None] + [parse_iso(a["at"]) for a in actions]
    now = datetime.now(timezone.utc)
    if d["status"] in ("active", "pending") or not ends:
        return now
    return min(now, max(ends) + timedelta(minutes=1))


def _q(t: datetime, t0: datetime, step: float) -> float:
    """Seconds after t0 on the chart's grid."""
    return round((t - t0).total_seconds() / step) * step


def _limit_kw(a: dict[str, Any], stations) -> float | None:
    if a["purpose"] == "restore" or a["limit"] is None:
        return None
    if a["unit"] == "power":
        return a["limit"] / 1000.0
    station = stations.get(a["chargestation_id"])
    return a["limit"] * (station.watts_per_amp if station else DEFAULT_WATTS_PER_AMP) / 1000.0


def _held_sum(by_session: dict[str, list[tuple[float, float | None]]], xs: list[float],
              hold: float | None) -> list[float | None]:
    """At each x: the sum of every session's latest value at or before x (held for at most `hold` seconds);
    None where no session has a value, which the chart draws as a gap (no data, or no limit)."""
    changes = sorted(((t, sid, v) for sid, points in by_session.items() for t, v in points), key=lambda c: c[0])
    latest: dict[str, tuple[float, float | None]] = {}
    out: list[float | None] = []
    i = 0
    for x in xs:
        while i < len(changes) and changes[i][0] <= x:
            t, sid, v = changes[i]
            latest[sid] = (t, v)
            i += 1
        values = [v for t, v in latest.values() if v is not None and (hold is None or x - t <= hold)]
        out.append(round(sum(values), 3) if values else None)
    return out
