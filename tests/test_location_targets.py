"""Events targeted at grid locations (EMIX pnode, serviceLocation, ...), which openleadr's VTN cannot render:
its answers are rewritten on the wire, and the real `dr-bridge run` selects stations by the locations its
config names. A target the bridge cannot map is answered optOut and curtails nothing."""
from __future__ import annotations

import re
from datetime import timedelta

import pytest

from dr_bridge.domain import Station
from dr_bridge.openadr import event_from_openleadr, feature_ids
from dr_bridge.targets import select_by_targets, why_none
from tests.test_restart import calls, registered, rig, soon, spawn, until  # noqa: F401 (fixtures)

NS = ('xmlns:power="http://docs.oasis-open.org/ns/emix/2011/06/power" '
      'xmlns:emix="http://docs.oasis-open.org/ns/emix/2011/06" xmlns:gml="http://www.opengis.net/gml/3.2"')
POLYGON = ("<gml:location><gml:Polygon><gml:exterior><gml:LinearRing><gml:posList>0 0 0 1 1 1 0 0"
           "</gml:posList></gml:LinearRing></gml:exterior></gml:Polygon></gml:location>")


def pnode(node: str) -> str:
    return f"<power:pnode><power:node>{node}</power:node></power:pnode>"


def service_location(gml_id: str | None) -> str:
    attribute = f' gml:id="{gml_id}"' if gml_id else ""
    return f"<power:serviceLocation><gml:FeatureCollection{attribute}>{POLYGON}</gml:FeatureCollection></power:serviceLocation>"


def service_area(gml_id: str | None) -> str:
    attribute = f' gml:id="{gml_id}"' if gml_id else ""
    return f"<emix:serviceArea><gml:FeatureCollection{attribute}>{POLYGON}</gml:FeatureCollection></emix:serviceArea>"


class EmixTargets:
    """Rewrites the eiTarget of each listed event in every distribution to the given EMIX targets."""

    def __init__(self) -> None:
        self.targets: dict[str, str] = {}

    def __call__(self, xml: str) -> str | None:
        changed = xml
        for event_id, inner in self.targets.items():
            pattern = re.compile(rf"(<ei:eventID>{re.escape(event_id)}</ei:eventID>.*?)<ei:eiTarget>.*?</ei:eiTarget>",
                                 re.S)
            changed = pattern.sub(lambda m: f"{m.group(1)}<ei:eiTarget {NS}>{inner}</ei:eiTarget>", changed, count=1)
        return changed if changed != xml else None


# ---- the pure part ----------------------------------------------------------------------------------------

STATIONS = [Station("a", "A", 32, locations=frozenset({"pnode:P1", "serviceLocation:depot-a"})),
            Station("b", "B", 32, locations=frozenset({"pnode:P2"})), Station("c", "C", 32)]


def ids(stations: list[Station]) -> list[str]:
    return [s.id for s in stations]


def test_locations_select_their_stations_and_what_cannot_be_mapped_selects_none() -> None:
    assert ids(select_by_targets({"pnode": ["P2"]}, STATIONS, "V")) == ["b"]
    assert ids(select_by_targets({"serviceLocation": ["depot-a"], "resource_id": ["C"]}, STATIONS, "V")) == ["a", "c"]
    # A location no station names: nothing; with our ven_id beside it the location still decides.
    assert select_by_targets({"pnode": ["P9"]}, STATIONS, "V") == []
    assert select_by_targets({"pnode": ["P9"], "ven_id": ["V"]}, STATIONS, "V") == []
    # What the VEN could not read, or a kind the bridge does not know: nothing, never the whole fleet.
    assert select_by_targets({"unreadable": ["serviceArea"]}, STATIONS, "V") == []
    assert select_by_targets({"unreadable": ["transportInterface"], "ven_id": ["V"]}, STATIONS, "V") == []
    assert select_by_targets({"foo_id": ["x"]}, STATIONS, "V") == []
    assert ids(select_by_targets({"ven_id": ["V"]}, STATIONS, "V")) == ["a", "b", "c"]  # unchanged
    assert why_none({"pnode": ["P9"]}) == "no configured station is at pnode:P9"
    assert why_none({"unreadable": ["serviceArea"]}) == "targets the bridge cannot map: serviceArea"


def test_emix_targets_as_openleadr_parses_them_are_read_with_their_ids() -> None:
    d = {"event_descriptor": {"event_id": "E"}, "active_period": {"dtstart": "2026-03-01T12:00:00Z"},
         "targets_by_type": {"pnode": [{"node": "P1"}], "end_device_asset": [{"mrid": "Electric_Vehicle"}],
                             "service_delivery_point": [{"node": "SDP"}], "aggregated_pnode": [{"node": "Z"}],
                             "service_area": [{"id": "north"}, {"feature_collection": {}}],
                             "transport_interface": [{"point_of_receipt": "R", "point_of_delivery": "D"}]}}
    assert event_from_openleadr(d).targets == {
        "pnode": ["P1"], "endDeviceAsset": ["Electric_Vehicle"], "serviceDeliveryPoint": ["SDP"],
        "aggregatedPnode": ["Z"], "serviceArea": ["north"], "unreadable": ["serviceArea", "transportInterface"]}
    xml = (f"<x xmlns:ei='http://docs.oasis-open.org/ns/energyinterop/201110' {NS}><ei:eiEvent><ei:eventDescriptor>"
           f"<ei:eventID>E</ei:eventID></ei:eventDescriptor><ei:eiTarget>{service_location('s1')}"
           f"{service_location(None)}{service_area('a1')}</ei:eiTarget></ei:eiEvent></x>")
    assert feature_ids(xml) == {"E": {"service_area": ["a1"], "service_location": ["s1", None]}}


def test_config_names_locations_as_kind_and_id_and_check_config_warns_of_a_station_without() -> None:
    from dr_bridge.checkconfig import config_warnings
    from dr_bridge.config import ConfigError, config_from_dict

    def config(*locations: list[str] | None):
        return config_from_dict({"vtn": {"url": "http://vtn.example/OpenADR2/Simple/2.0b", "ven_name": "v"},
                                 "chargestations": [{"id": f"st-{i}", "max_current": 32,
                                                     **({"locations": x} if x is not None else {})}
                                                    for i, x in enumerate(locations)]}, source="t.toml")

    cfg = config(["pnode:P1", "serviceLocation: depot-a"], None)
    assert cfg.stations()[0].locations == frozenset({"pnode:P1", "serviceLocation:depot-a"})
    assert "chargestations[1].locations" in [key for key, _ in config_warnings(cfg)]
    assert "chargestations[1].locations" not in [key for key, _ in config_warnings(config(["pnode:P1"], ["pnode:P2"]))]
    for bad, message in ((["pnod:P1"], "is not \"kind:id\""), (["pnode:"], "is not \"kind:id\""),
                         ("pnode:P1", "must be an array of strings")):
        with pytest.raises(ConfigError, match=re.escape(message)) as error:
            config(bad)
        assert "chargestations[0].locations" in str(error.value)


# ---- the daemon -------------------------------------------------------------------------------------------

LIMIT_16 = ("set_power_limit", {"unit": "current", "limit": 16})  # level 2: half of 32 A
LIMIT_6 = ("set_power_limit", {"unit": "current", "limit": 6})  # level 3: 6 A


@pytest.mark.slow
async def test_events_targeted_at_locations_limit_only_the_stations_there(rig, spawn, tmp_path):  # noqa: F811
    d = rig.config_dict()
    for station in d["chargestations"]:
        station["locations"] = {"A": ["serviceLocation:depot-a", "pnode:PN-A"], "S": ["pnode:PN-S"]}[
            station["resource_id"]]
    config = rig.write_config(tmp_path / "located.toml", d)
    emix = EmixTargets()
    rig.vtn.rewrite_answers(emix, times=10_000)
    bridge = await spawn("run", "--config", str(config))
    ven_id = await registered(rig, 1, bridge)

    start, length = soon(3), timedelta(seconds=4)
    events = {}
    for name, level, inner in (("depot-a", 2, service_location("depot-a")), ("pn-s", 3, pnode("PN-S")),
                               ("elsewhere", 3, pnode("PN-NOWHERE")), ("unreadable", 3, service_area(None))):
        event_id = f"EVT-{name}"
        emix.targets[event_id] = inner  # before the VTN lists it: no distribution shows the plain target
        events[name] = rig.vtn.add_event(ven_id, intervals=[(start, length, level)], event_id=event_id)

    def answer(name: str) -> str | None:
        return next((r["opt_type"] for r in rig.vtn.responses if r["event_id"] == events[name]), None)

    await until(lambda: all(answer(n) for n in events), 30, bridge, "an answer to every event")
    # Before, each of these parsed to no target at all: optIn, and every station limited by every event.
    assert {n: answer(n) for n in events} == {"depot-a": "optIn", "pn-s": "optIn", "elsewhere": "optOut",
                                              "unreadable": "optOut"}
    await until(lambda: calls(rig, "A") and calls(rig, "S"), 30, bridge, "the limits")
    await until(lambda: len(calls(rig, "A")) >= 2 and len(calls(rig, "S")) >= 2, 30, bridge, "the restores")
    assert calls(rig, "A")[0] == LIMIT_16 and LIMIT_6 not in calls(rig, "A"), calls(rig, "A")
    assert calls(rig, "S")[0] == LIMIT_6 and LIMIT_16 not in calls(rig, "S"), calls(rig, "S")
    log = bridge.stderr()
    assert "optOut (no configured station is at pnode:PN-NOWHERE)" in log
    assert "optOut (targets the bridge cannot map: serviceArea)" in log
