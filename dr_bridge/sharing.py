"""Stations shared by several bridges through one database (pure: no I/O, no clock).

Two bridges (one per utility program) may both configure a station when both mark it `shared`. Each then
publishes what it wants of the station (its plan's total, in W, and until when), and neither holds the
station looser than the strictest wish of the other: the most restrictive limit wins across bridges as it
does across events, and a station is restored only when no bridge still wants it limited.
"""
from __future__ import annotations

from datetime import datetime
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

from dr_bridge.domain import Limit, Station
from dr_bridge.policy import to_watts

S = TypeVar("S")
Plan = Mapping[str, tuple[Limit | None, S | None]]


def wishes(plan: Plan, stations: Mapping[str, Station], sessions: Mapping[str, Sequence[str]],
           shared: Iterable[str], until: Callable[[S], datetime | None]) -> dict[str, tuple[float, S, datetime]]:
    """station id -> (W, who asked, until) for each shared station this plan limits in every session.

    `until` says when the asker's wish lapses (None: it publishes none, e.g. a dry run), so a bridge that
    dies mid-event cannot hold the others' stations down for ever.
    """
    out: dict[str, tuple[float, S, datetime]] = {}
    for sid in shared:
        planned = [plan[x] for x in sessions.get(sid, ()) if x in plan]
        if not planned or any(limit is None for limit, _ in planned):
            continue
        owner = min((src for _, src in planned), key=repr)
        lapse = until(owner)
        if lapse is not None:
            out[sid] = (sum(to_watts(limit, stations[sid]) for limit, _ in planned), owner, lapse)
    return out


def interested(plan: Plan, sessions: Mapping[str, Sequence[str]], held: Iterable[str]) -> set[str]:
    """Stations this bridge limits now, or still holds limits on: only there do the others' wishes count;
    a bridge never starts limiting a station on another's behalf."""
    held = set(held)
    return {sid for sid, ids in sessions.items()
            if any(x in held or (x in plan and plan[x][0] is not None) for x in ids)}


def with_others(budgets: Mapping[str, Sequence[tuple[Limit | None, S]]],
                others: Iterable[tuple[str, float, S]], stations: Mapping[str, Station]) -> dict[str, list]:
    """The budgets plus each other bridge's wish (station id, W, who asked) on the given stations, in the
    unit the station is limited in, so a station on current limits is not switched to power by a wish."""
    merged = {sid: list(entries) for sid, entries in budgets.items()}
    for sid, watts, owner in others:
        station = stations.get(sid)
        if station is None:
            continue
        limit = Limit("power", watts) if station.limit_unit == "power" else Limit(
            "current", watts / station.watts_per_amp)
        merged.setdefault(sid, []).append((limit, owner))
    return merged
