"""A station configured with limit_unit = "power" gets power, even while eDRV does not say what kind it is;
current only once eDRV refuses power (as its simulator stations do), and never above the station's maximum.

`dr-bridge run` in its own process against the eDRV simulator, whose chargestations here carry no
is_simulator (older eDRV documentation shows none), so the bridge cannot learn a station's kind by asking.
"""
from __future__ import annotations

import signal
from datetime import timedelta

import pytest

from dr_bridge.rig import Rig, StationSpec
from tests.test_restart import calls, registered, soon, spawn, until  # noqa: F401  (spawn is a fixture)

pytestmark = pytest.mark.faults  # eDRV refusing a unit: with the fault injection, off the default run

LEVEL_W = 20000  # level 2: 20 kW for the whole station


@pytest.fixture(params=["http", "webhook"])
async def rig(tmp_path, request):
    """The eDRV simulator station refuses power at once (HTTP 400), or accepts the call and its charger
    refuses it (a .rejected webhook)."""
    stations = [StationSpec("DC", max_current=125, phases=1, voltage=400, limit_unit="power"),  # 50 kW DC
                StationSpec("S", simulator=True, limit_unit="power")]  # an eDRV simulator: 32 A, 22.08 kW
    r = Rig(tmp_path, stations, sim_options={"report_is_simulator": False, "simulator_power_refusal": request.param})
    r.refusal = request.param
    await r.start(webhooks=True)
    try:
        yield r
    finally:
        await r.stop()


def set_calls(rig: Rig, resource: str) -> list[tuple[str, float, int | None]]:
    """(unit, limit, HTTP status) of every set_power_limit eDRV received for the resource's sessions."""
    sessions = set(rig.sessions[resource])
    return [(r.json["unit"], r.json["limit"], r.status) for r in rig.sim.requests
            if r.method == "POST" and r.path.endswith("set_power_limit") and r.path.split("/")[3] in sessions]


async def test_power_while_the_kind_is_unknown_and_current_only_after_a_refusal(rig, tmp_path, spawn):  # noqa: F811
    config = rig.config_dict()
    config["levels"]["2"] = {"power": LEVEL_W}
    bridge = await spawn("run", "--config", str(rig.write_config(tmp_path / "dr-bridge.toml", config)))
    ven_id = await registered(rig, 1, bridge)
    rig.vtn.add_event(ven_id, intervals=[(soon(2), timedelta(seconds=5), 2)],
                      targets=[{"resource_id": "DC"}, {"resource_id": "S"}])

    # Lifted by a limit at each station's maximum (neither is known to take a clear): the EVs obey it.
    await until(lambda: rig.sim.session_limit(rig.sessions["S"][0]) == 32
                and rig.sim.session_limit(rig.sessions["DC"][0]) == 125, 30, bridge, "the limits and the restores")
    # The DC station takes power: 20 kW, then its 50 kW maximum to lift it (not 50 A and 125 A).
    assert set_calls(rig, "DC") == [("power", LEVEL_W, 201), ("power", 50000, 201)]
    # The simulator station refuses power; the same 20 kW goes again at once in current (20000 W / 690 V,
    # floored), and its restore is its maximum current.
    refused = 400 if rig.refusal == "http" else 201
    assert set_calls(rig, "S") == [("power", LEVEL_W, refused), ("current", 28.9, 201), ("current", 32, 201)]
    assert not [c for c in calls(rig, "DC") + calls(rig, "S") if c[0] == "clear_power_limit"]

    bridge.signal(signal.SIGTERM)
    assert await bridge.wait(20) == 0
    log = bridge.stderr()
    assert "refused a limit in power" in log and "does not say whether chargestation" in log, log[-3000:]
