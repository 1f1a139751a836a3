"""eDRV serves listings in pages it may cap below the size asked for: `dr-bridge run` follows them to the end,
so every running session is limited, and restored, not just the first page of them."""
from __future__ import annotations

import signal
from datetime import timedelta

import pytest

from dr_bridge.rig import Rig, StationSpec
from tests.test_restart import registered, soon, spawn, until  # noqa: F401  (spawn is a fixture)

pytestmark = pytest.mark.faults  # 250 sessions behind capped pages: with the fault injection

SESSIONS = 250


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, [StationSpec("A", max_current=4000, sessions=SESSIONS)], sim_options={"page_size_max": 100})
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def touched(rig: Rig, kind: str) -> set[str]:
    """The sessions eDRV accepted a call of this kind for."""
    return {r.path.split("/")[3] for r in rig.sim.requests
            if r.method == "POST" and r.path.endswith(kind) and r.status == 201}


async def test_250_sessions_listed_100_a_page_are_all_limited_and_restored(rig, tmp_path, spawn):  # noqa: F811
    bridge = await spawn("run", "--config", str(rig.write_config(tmp_path / "dr-bridge.toml")))
    ven_id = await registered(rig, 1, bridge)
    everyone = set(rig.sessions["A"])
    rig.vtn.add_event(ven_id, intervals=[(soon(2), timedelta(seconds=5), 2)], targets=[{"resource_id": "A"}])

    await until(lambda: touched(rig, "set_power_limit") == everyone, 30, bridge,
                f"a limit on each of the {SESSIONS} sessions")
    limits = {r.json["limit"] for r in rig.sim.requests if r.path.endswith("set_power_limit")}
    assert limits == {8}, "the station's 2000 A shared by all 250 sessions, not by the first 100"
    await until(lambda: touched(rig, "clear_power_limit") == everyone, 30, bridge, "the restore of every session")
    listed = [r for r in rig.sim.requests if r.method == "GET" and r.path.endswith("/sessions")]
    assert {r.query["paginate_page"] for r in listed} >= {"1", "2", "3"}

    bridge.signal(signal.SIGTERM)
    assert await bridge.wait(20) == 0
