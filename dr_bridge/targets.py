"""Which configured stations an event's targets select (pure; CONTRACT.md "Targets")."""
from __future__ import annotations

from dr_bridge.domain import Event, Station

# The EMIX location targets of an OpenADR 2.0b eiTarget. A station's config names the locations it sits
# at as "kind:id" (chargestations[].locations), e.g. "pnode:PNODE-42" or "serviceLocation:site-7"; the id
# is the node, the mRID, or the gml:id of the area's or location's FeatureCollection.
LOCATION_KINDS = ("aggregatedPnode", "endDeviceAsset", "meterAsset", "pnode", "serviceArea",
                  "serviceDeliveryPoint", "serviceLocation")
# Targets the VEN could read no id from (a polygon without a gml:id, a transportInterface), by kind.
UNREADABLE = "unreadable"
_WHOLE_VEN = ("ven_id", "party_id")


def select_stations(event: Event, stations: list[Station], ven_id: str | None) -> list[Station]:
    """resource_id, group_id and location targets select by resource, group and location (the union); our
    ven_id or a party_id alone, or no target at all, selects every station. Anything else selects nothing
    (-> optOut): grid congestion is local, and a target the bridge cannot map must never curtail the fleet."""
    return select_by_targets(event.targets or {}, stations, ven_id)


def select_by_targets(targets: dict, stations: list[Station], ven_id: str | None) -> list[Station]:
    """select_stations on an event's targets as the event log keeps them."""
    resources = set(targets.get("resource_id") or [])
    groups = set(targets.get("group_id") or []) | set(targets.get("group_name") or [])
    places = locations(targets)
    if resources or groups or places:
        return [s for s in stations if s.resource_id in resources or (s.group is not None and s.group in groups)
                or not places.isdisjoint(s.locations)]
    if any(ids for kind, ids in targets.items() if kind not in _WHOLE_VEN):
        return []  # unreadable, or a kind the bridge does not know
    vens = targets.get("ven_id") or []
    if vens and ven_id not in vens:
        return []
    return list(stations)


def locations(targets: dict) -> set[str]:
    """The event's location targets as "kind:id", as a station's config names them."""
    return {f"{kind}:{value}" for kind in LOCATION_KINDS for value in targets.get(kind) or []}


def why_none(targets: dict) -> str:
    """Why the targets select no configured station: the optOut reason the log and the event log show."""
    unreadable = sorted(set(targets.get(UNREADABLE) or []))
    unknown = sorted(k for k, ids in targets.items() if ids and k not in
                     (*_WHOLE_VEN, UNREADABLE, "resource_id", "group_id", "group_name", *LOCATION_KINDS))
    parts = []
    if unreadable or unknown:
        parts.append(f"targets the bridge cannot map: {', '.join(unreadable + unknown)}")
    places = sorted(locations(targets))
    if places:
        parts.append(f"no configured station is at {', '.join(places[:5])}" + (" ..." if len(places) > 5 else ""))
    return "; ".join(parts) or "no configured station is targeted"
