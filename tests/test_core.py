"""The main path end to end: the real openleadr VTN and the eDRV simulator over loopback, the whole bridge."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from dr_bridge.daemon import Bridge
from dr_bridge.rig import API_KEY, Rig, StationSpec, wait_for


def soon(seconds: float) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=seconds)


@pytest.fixture
async def rig(tmp_path, request):
    spec = getattr(request, "param", None) or {}
    r = Rig(tmp_path, spec.get("stations") or [
        StationSpec("A"), StationSpec("B", sessions=2), StationSpec("S", simulator=True), StationSpec("U")],
        bridge_options=spec.get("bridge", {}), edrv_options=spec.get("edrv", {}))
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def bridge(rig):
    b = Bridge(rig.config(), API_KEY, vtn_backoff_s=0.2, **getattr(rig, "bridge_kwargs", {}))
    await b.start()
    await wait_for(lambda: b.ven.registered, 15)
    yield b
    await b.stop()


def calls(rig: Rig, resource: str):
    """(kind, body) of every set/clear call eDRV received for the resource's sessions, in order."""
    sessions = set(rig.sessions[resource])
    return [(kind, body) for sid, kind, body in rig.sim.limit_calls() if sid in sessions]


async def test_level2_event_limits_targeted_sessions_and_restores_them(rig, bridge):
    start = soon(3)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(start, timedelta(seconds=3), 2)],
                                 targets=[{"resource_id": "A"}, {"resource_id": "B"}, {"resource_id": "S"}])
    await wait_for(lambda: rig.vtn.responses, 10)
    assert rig.vtn.responses[0]["opt_type"] == "optIn"
    await wait_for(lambda: len(rig.sim.limit_calls()) >= 4, 15)
    assert calls(rig, "A") == [("set_power_limit", {"unit": "current", "limit": 16})]
    assert calls(rig, "B") == [("set_power_limit", {"unit": "current", "limit": 8})] * 2
    assert calls(rig, "S") == [("set_power_limit", {"unit": "current", "limit": 16})]
    await wait_for(lambda: len(rig.sim.limit_calls()) >= 8, 15)
    await bridge.engine.settle()
    assert calls(rig, "A")[1:] == [("clear_power_limit", {})]
    assert calls(rig, "B")[2:] == [("clear_power_limit", {})] * 2
    assert calls(rig, "S")[1:] == [("set_power_limit", {"unit": "current", "limit": 32})]
    assert calls(rig, "U") == []
    ev = bridge.store.get_event(event_id)
    assert ev.status == "completed" and ev.opt == "optIn"
    assert {a.status for a in bridge.store.actions(event_id)} == {"requested"}
    assert bridge.store.session_states(limited_only=True) == []
