"""No wait defers a limit or a restore without bound: eDRV's Retry-After is followed up to
edrv.max_retry_after_s, and the utility's recovery period spreads restores over bridge.max_restore_spread_s
at most.

A 429 asking for an hour at an event's start would miss the event; at its end it would leave the charger
limited for that hour. `dr-bridge run` in its own process against the eDRV simulator, which answers the
chosen call 429 with `Retry-After: 3600`, and the openleadr VTN, which asks for an hour's recovery.
"""
from __future__ import annotations

import signal
from datetime import timedelta

import pytest

from dr_bridge.rig import Rig, StationSpec
from tests.test_restart import calls, registered, soon, spawn, until  # noqa: F401  (spawn is a fixture)

pytestmark = pytest.mark.faults

LIMIT = ("set_power_limit", {"unit": "current", "limit": 16})
CLEAR = ("clear_power_limit", {})
MAX_WAIT_S = 2


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, [StationSpec("A")], edrv_options={"max_retry_after_s": MAX_WAIT_S})
    await r.start()
    r.sim.faults.methods = ("POST",)  # listings and reads are answered; only limit calls meet the 429
    r.sim.faults.retry_after_s = 3600
    try:
        yield r
    finally:
        await r.stop()


def statuses(rig: Rig) -> list[int | None]:
    return [r.status for r in rig.sim.requests if r.method == "POST"]


def landed_at(rig: Rig, kind: str) -> float | None:
    """When eDRV first accepted a call of this kind (unix s)."""
    return next((r.at for r in rig.sim.requests if r.method == "POST" and r.path.endswith(kind)
                 and r.status == 201), None)


@pytest.mark.parametrize("hit", ["limit", "restore"])
async def test_an_hour_of_retry_after_defers_a_call_only_max_retry_after_s(rig, tmp_path, spawn, hit):  # noqa: F811
    bridge = await spawn("run", "--config", str(rig.write_config(tmp_path / "dr-bridge.toml")))
    ven_id = await registered(rig, 1, bridge)
    start, length = soon(3), 8
    if hit == "limit":
        rig.sim.faults.fail_next(1, 429)
    rig.vtn.add_event(ven_id, intervals=[(start, timedelta(seconds=length), 2)], targets=[{"resource_id": "A"}])

    landed = await until(lambda: landed_at(rig, "set_power_limit"), 20 + length, bridge, "the limit to land")
    if hit == "limit":
        assert statuses(rig)[:2] == [429, 201], "the first limit call met the 429, the next one landed"
        assert landed - start.timestamp() < MAX_WAIT_S + 4, "the limit waited out eDRV's hour"
    else:
        rig.sim.faults.fail_next(1, 429)

    restored = await until(lambda: landed_at(rig, "clear_power_limit"), length + MAX_WAIT_S + 20, bridge,
                           "the restore to land")
    assert restored - (start.timestamp() + length) < MAX_WAIT_S + 4, "the restore waited out eDRV's hour"
    await until(lambda: rig.sim.session_limit(rig.sessions["A"][0]) is None, 5, bridge, "the EV to be unlimited")
    if hit == "restore":
        assert calls(rig, "A") == [LIMIT, CLEAR, CLEAR] and statuses(rig) == [201, 429, 201]

    bridge.signal(signal.SIGTERM)
    assert await bridge.wait(20) == 0
    log = bridge.stderr()
    assert "asks for 3600 s" in log and "edrv.max_retry_after_s" in log, log[-3000:]


async def test_an_hour_of_recovery_spreads_the_restores_over_max_restore_spread_s(tmp_path, spawn):  # noqa: F811
    rig = Rig(tmp_path, [StationSpec("A", sessions=3)], bridge_options={"max_restore_spread_s": 3})
    await rig.start()
    try:
        bridge = await spawn("run", "--config", str(rig.write_config(tmp_path / "dr-bridge.toml")))
        ven_id = await registered(rig, 1, bridge)
        start, length = soon(2), 4
        rig.vtn.add_event(ven_id, intervals=[(start, timedelta(seconds=length), 2)], targets=[{"resource_id": "A"}],
                          recovery=timedelta(hours=1))
        everyone = set(rig.sessions["A"])
        await until(lambda: cleared(rig) == everyone, length + 20, bridge, "every session restored")
        last = max(r.at for r in rig.sim.requests if r.path.endswith("clear_power_limit"))
        assert last - (start.timestamp() + length) < 3 + 3, "a restore waited out the hour of recovery"
        firsts = sorted(min(r.at for r in rig.sim.requests if r.path.endswith(f"{s}/clear_power_limit"))
                        for s in everyone)
        assert firsts[-1] - firsts[0] > 1, "still spread, over the 3 s allowed"
        bridge.signal(signal.SIGTERM)
        assert await bridge.wait(20) == 0
        assert "asks for a 3600 s recovery" in bridge.stderr() and "bridge.max_restore_spread_s" in bridge.stderr()
    finally:
        await rig.stop()


def cleared(rig: Rig) -> set[str]:
    return {r.path.split("/")[3] for r in rig.sim.requests if r.path.endswith("clear_power_limit") and r.status == 201}
