"""Which configured stations an event's targets select (pure; CONTRACT.md "Targets")."""
from __future__ import annotations

from dr_bridge.domain import Event, Station


def select_stations(event: Event, stations: list[Station], ven_id: str | None) -> list[Station]:
    """resource_id/group_id targets select by resource and group (the union); our ven_id or a party_id
    alone, or no target at all, selects every station. Anything else selects nothing (-> optOut)."""
    return select_by_targets(event.targets or {}, stations, ven_id)


def select_by_targets(targets: dict, stations: list[Station], ven_id: str | None) -> list[Station]:
    """select_stations on an event's targets as the event log keeps them."""
    resources = set(targets.get("resource_id") or [])
    groups = set(targets.get("group_id") or []) | set(targets.get("group_name") or [])
    if resources or groups:
        return [s for s in stations if s.resource_id in resources or (s.group is not None and s.group in groups)]
    vens = targets.get("ven_id") or []
    if vens and ven_id not in vens:
        return []
    return list(stations)
