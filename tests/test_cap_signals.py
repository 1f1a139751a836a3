"""Setpoint signals and their item base: from openleadr's dict and over a real openleadr VTN into domain Events."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import pytest

from dr_bridge.domain import Event
from dr_bridge.localvtn import LocalVtn
from dr_bridge.openadr import Ven, event_from_openleadr

UTC = timezone.utc
MIN = timedelta(minutes=1)
START = datetime(2026, 3, 1, 12, tzinfo=UTC)


def _event(signal_name: str, signal_type: str, value: float, measurement: dict | None = None) -> dict:
    signal = {"signal_name": signal_name, "signal_type": signal_type, "signal_id": "s",
              "intervals": [{"dtstart": START, "duration": 10 * MIN, "uid": 0, "signal_payload": value}]}
    if measurement is not None:
        signal["measurement"] = measurement
    return {"event_descriptor": {"event_id": "E", "modification_number": 0},
            "active_period": {"dtstart": START, "duration": 10 * MIN}, "event_signals": [signal]}


@pytest.mark.parametrize("measurement, value, kw", [
    (None, 50, 50.0),  # no item base: kW
    ({"name": "powerReal", "unit": "W", "scale": "k"}, 50, 50.0),
    ({"name": "powerReal", "unit": "W", "scale": "none"}, 50_000, 50.0),
    ({"name": "powerReal", "unit": "W", "scale": "M"}, 0.05, 50.0),
    ({"name": "powerReal", "unit": "W"}, 1500, 1.5),  # no scale code: plain watts
    ({"name": "customUnit", "unit": "kW", "scale": "none"}, 7, 7.0),
])
def test_setpoints_are_carried_in_kw(measurement, value, kw):
    for name, kind in (("LOAD_CONTROL", "x-loadControlSetpoint"), ("LOAD_DISPATCH", "setpoint")):
        [interval] = event_from_openleadr(_event(name, kind, value, measurement)).intervals
        assert (interval.signal_type, interval.value) == (kind, pytest.approx(kw))


def test_a_setpoint_in_another_unit_keeps_its_value_under_a_type_nothing_acts_on():
    [interval] = event_from_openleadr(_event("LOAD_CONTROL", "x-loadControlSetpoint", 80,
                                             {"name": "current", "unit": "A", "scale": "none"})).intervals
    assert (interval.signal_type, interval.value) == ("x-loadControlSetpoint in A", 80)


def test_other_signals_ignore_the_item_base():
    [interval] = event_from_openleadr(_event("LOAD_CONTROL", "x-loadControlPercentOffset", -20,
                                             {"name": "powerReal", "unit": "W", "scale": "k"})).intervals
    assert (interval.signal_type, interval.value) == ("x-loadControlPercentOffset", -20)


# ---- over the wire -------------------------------------------------------------------------------

@pytest.fixture
async def vtn() -> AsyncIterator[LocalVtn]:
    server = LocalVtn(poll_s=1)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def ven(vtn: LocalVtn) -> AsyncIterator[tuple[Ven, list[Event]]]:
    seen: list[Event] = []

    async def on_event(event: Event) -> tuple[str, str]:
        seen.append(event)
        return "optIn", "test"

    client = Ven(vtn_url=vtn.url, ven_name="ev-fleet", on_event=on_event)
    await asyncio.wait_for(client.run(), 10)
    yield client, seen
    await client.stop()


async def test_item_base_and_recovery_survive_the_vtn(vtn: LocalVtn, ven: tuple[Ven, list[Event]]) -> None:
    client, seen = ven
    start = (datetime.now(UTC) + 5 * MIN).replace(microsecond=0)
    first = vtn.add_event(client.ven_id, intervals=[(start, 10 * MIN, 50_000)], signal_name="LOAD_CONTROL",
                          signal_type="x-loadControlSetpoint", unit="W", recovery=2 * MIN,
                          extra_signals=[{"signal_name": "LOAD_DISPATCH", "signal_type": "setpoint",
                                          "intervals": [(start, 10 * MIN, 0.04)], "unit": "MW"}])
    second = vtn.add_event(client.ven_id, intervals=[(start, 10 * MIN, 32)], signal_name="LOAD_CONTROL",
                           signal_type="x-loadControlSetpoint", unit="A")
    await vtn.wait_for(lambda: {e.event_id for e in seen} >= {first, second})
    by_id = {e.event_id: e for e in seen}
    assert [(i.signal_name, i.signal_type, i.value) for i in by_id[first].intervals] == [
        ("LOAD_CONTROL", "x-loadControlSetpoint", 50.0), ("LOAD_DISPATCH", "setpoint", pytest.approx(40.0))]
    assert by_id[first].recovery == 2 * MIN
    assert [(i.signal_type, i.value) for i in by_id[second].intervals] == [("x-loadControlSetpoint in A", 32)]
