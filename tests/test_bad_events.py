"""Events a bridge cannot or must not act on: each is answered and logged, nothing reaches eDRV, and the next
good event still works. Sent by the real openleadr VTN over loopback."""
from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import pytest

from aiohttp import web

from dr_bridge import rig as rig_module
from dr_bridge.localvtn import LocalVtn
from dr_bridge.rig import StationSpec, wait_for
from tests.conftest import BAD_INPUT
from tests.test_core import bridge, calls, rig, soon  # noqa: F401  (fixtures)

SEC = timedelta(seconds=1)
TWO = {"stations": [StationSpec("A"), StationSpec("B")]}

# openleadr's VTN refuses to send SIMPLE levels outside 0..3, as a third-party VTN might: such values are
# sent as a marker level and rewritten on the wire.
class WireRewritingVtn(LocalVtn):
    """The stock local VTN whose oadrDistributeEvent XML passes through `rewrite` (old -> new payload values)."""

    rewrite: dict[str, str] = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server.app.middlewares.append(self._middleware)

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        resp = await handler(request)
        if isinstance(resp, web.Response) and resp.text and "oadrDistributeEvent" in resp.text:
            text = resp.text
            for old, new in self.rewrite.items():
                text = text.replace(f"<ei:value>{old}</ei:value>", f"<ei:value>{new}</ei:value>")
            resp.text = text
        return resp


@pytest.fixture(autouse=True)
def wire_rewriting_vtn(monkeypatch):
    monkeypatch.setattr(rig_module, "LocalVtn", WireRewritingVtn)
    monkeypatch.setattr(WireRewritingVtn, "rewrite", {})
    return WireRewritingVtn


BAD = {
    "unknown signal": dict(signal_name="ELECTRICITY_PRICE", signal_type="price", value=0.42),
    "negative level": dict(value=3, wire={"3.0": "-1"}),
    "unknown resource": dict(value=2, targets=[{"resource_id": "no-such-charger"}]),
    "other VEN only": dict(value=2, targets=[{"ven_id": "SOMEONE-ELSE"}]),
}


def response(rig, event_id):
    return next((r["opt_type"] for r in reversed(rig.vtn.responses) if r["event_id"] == event_id), None)


async def good_event_still_works(rig, bridge) -> None:
    before = len(rig.sim.limit_calls())
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), 3 * SEC, 2)], targets=[{"resource_id": "A"}])
    await wait_for(lambda: ("set_power_limit", {"unit": "current", "limit": 16}) in calls(rig, "A"), 15)
    await wait_for(lambda: ("clear_power_limit", {}) in calls(rig, "A"), 15)
    assert len(rig.sim.limit_calls()) == before + 2


@pytest.mark.parametrize("rig", [TWO], indirect=True)
@pytest.mark.parametrize("case", list(BAD))
async def test_unusable_event_is_answered_opt_out_and_logged(rig, bridge, case, caplog):
    caplog.set_level(logging.INFO)
    spec = dict(BAD[case])
    value = spec.pop("value")
    WireRewritingVtn.rewrite = spec.pop("wire", {})
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), 3 * SEC, value)], **spec)
    assert await wait_for(lambda: response(rig, event_id), 10) == "optOut"
    await wait_for(lambda: bridge.store.get_event(event_id), 5)
    await asyncio.sleep(3)  # past the would-be start: still nothing may have gone to eDRV
    assert rig.sim.limit_calls() == []
    assert bridge.store.get_event(event_id).opt == "optOut"
    assert event_id in caplog.text  # the reason is in the log, next to the event id
    await good_event_still_works(rig, bridge)
    BAD_INPUT["unusable events"] += 1


@pytest.mark.parametrize("rig", [TWO], indirect=True)
async def test_huge_level_is_read_as_the_strictest_configured_one(rig, bridge):
    WireRewritingVtn.rewrite = {"1.0": "1e12"}
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), 3 * SEC, 1)],
                                 targets=[{"resource_id": "A"}])
    assert await wait_for(lambda: response(rig, event_id), 10) == "optIn"
    await wait_for(lambda: calls(rig, "A"), 15)
    # The rig's strictest level (3) is 6 A; an unconfigured higher level must never mean "more power".
    assert calls(rig, "A")[0] == ("set_power_limit", {"unit": "current", "limit": 6})
    await wait_for(lambda: ("clear_power_limit", {}) in calls(rig, "A"), 15)
    WireRewritingVtn.rewrite = {}


@pytest.mark.parametrize("rig", [TWO], indirect=True)
async def test_hundreds_of_events_at_once_are_all_answered(rig, bridge):
    far = soon(3600)
    ids = [rig.vtn.add_event(bridge.ven.ven_id, intervals=[(far + i * 60 * SEC, 30 * SEC, 1 + i % 3)],
                             targets=[{"resource_id": "A" if i % 2 else "B"}]) for i in range(300)]
    await wait_for(lambda: all(response(rig, e) for e in ids), 60)
    assert {response(rig, e) for e in ids} == {"optIn"}
    assert len({e.event_id for e in bridge.store.events()}) >= 300
    BAD_INPUT["events in one burst"] += len(ids)
    await good_event_still_works(rig, bridge)
