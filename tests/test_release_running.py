"""`dr-bridge release-all` while `dr-bridge run` runs: the emergency release holds.

Both are real processes, as an operator runs them. The release is taken as the operator's opt-out of every
live event: the running daemon restores, never limits again in those events (a session starting on the
station, the next interval), and the VTN hears optOut.
"""
from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from dr_bridge.rig import Rig, StationSpec
from tests.test_restart import (TARGETS, calls, limited, now, registered, session_ids, soon, spawn,  # noqa: F401
                                until)

pytestmark = pytest.mark.slow


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, [StationSpec("A"), StationSpec("S", simulator=True)])
    await r.start(webhooks=True)  # a session starting on a station reaches the daemon by webhook
    try:
        yield r
    finally:
        await r.stop()


def limits_since(rig: Rig, mark: int) -> list[tuple[str, str, object]]:
    """Every call since `mark` that limits a session: below the station's max (32 A), not a restore."""
    return [(sid, kind, body) for sid, kind, body in rig.sim.limit_calls()[mark:]
            if kind == "set_power_limit" and body.get("limit", 32) < 32]


def answers(rig: Rig, event_id: str) -> list[str]:
    return [r["opt_type"] for r in rig.vtn.responses if r["event_id"] == event_id]


async def test_release_all_while_the_daemon_runs_holds_and_the_vtn_hears_the_opt_out(rig, spawn, tmp_path):
    config = rig.write_config(tmp_path / "dr-bridge.toml")
    bridge = await spawn("run", "--config", str(config))
    ven_id = await registered(rig, 1, bridge)
    first = soon(2)
    boundary = first + timedelta(seconds=15)  # level 2, then level 3 (6 A): a boundary after the release
    event_id = rig.vtn.add_event(ven_id, intervals=[(first, timedelta(seconds=15), 2),
                                                    (boundary, timedelta(seconds=60), 3)], targets=TARGETS)
    await limited(rig, bridge)
    assert now() < boundary - timedelta(seconds=5), "too slow to release before the next interval"
    mark = len(rig.sim.limit_calls())

    release = await spawn("release-all", "--config", str(config))
    assert await release.wait(60) == 0, release.stderr()
    out = " ".join(release.stdout().split())
    assert f"opted out of event {event_id}" in out and "running bridge" in out, out
    await until(lambda: rig.sim.session_limit(rig.sessions["A"][0]) is None
                and rig.sim.session_limit(rig.sessions["S"][0]) == 32, 10, bridge, "the EVs to be unlimited")

    # A session change: a new session on A, announced by webhook, mid-event.
    newcomer = rig.sim.start_session(rig.station_ids["A"])
    # Then the interval boundary, and a reconcile or two after it.
    while now() < boundary + timedelta(seconds=6):
        assert bridge.alive, f"the daemon exited with {bridge.proc.returncode}"
        assert limits_since(rig, mark) == [], "a session was limited again after release-all"
        await asyncio.sleep(0.2)
    assert limits_since(rig, mark) == []
    assert rig.sim.session_limit(newcomer) is None
    assert rig.sim.session_limit(rig.sessions["A"][0]) is None and rig.sim.session_limit(rig.sessions["S"][0]) == 32
    # Each session restored once, by one of the two processes: no second round of restores.
    restores = [(sid, kind) for sid, kind, _ in rig.sim.limit_calls()[mark:]]
    assert sorted(restores) == sorted([(rig.sessions["A"][0], "clear_power_limit"),
                                      (rig.sessions["S"][0], "set_power_limit")]), restores
    # The utility was told: the event is answered optOut (it was optIn).
    await until(lambda: answers(rig, event_id)[-1:] == ["optOut"], 15, bridge, "optOut at the VTN")
    assert answers(rig, event_id)[0] == "optIn"


async def test_release_all_while_the_daemon_is_down_holds_through_its_next_start(rig, spawn, tmp_path):
    config = rig.write_config(tmp_path / "dr-bridge.toml")
    bridge = await spawn("run", "--config", str(config))
    ven_id = await registered(rig, 1, bridge)
    event_id = rig.vtn.add_event(ven_id, intervals=[(soon(2), timedelta(seconds=120), 2)], targets=TARGETS)
    await limited(rig, bridge)
    await bridge.sigkill()
    mark = len(rig.sim.limit_calls())

    release = await spawn("release-all", "--config", str(config))
    assert await release.wait(60) == 0, release.stderr()
    out = " ".join(release.stdout().split())
    assert f"opted out of event {event_id}" in out and "the VTN is told when the bridge next runs" in out, out
    assert sorted(kind for _, kind, _ in rig.sim.limit_calls()[mark:]) == ["clear_power_limit", "set_power_limit"]
    assert limits_since(rig, mark) == []

    # The restart finds the event still running: it must not limit again, and it tells the VTN.
    again = await spawn("run", "--config", str(config))
    await registered(rig, 2, again)
    await until(lambda: answers(rig, event_id)[-1:] == ["optOut"], 20, again, "optOut at the VTN")
    await asyncio.sleep(3)  # a pass or two after the start
    assert limits_since(rig, mark) == [], "the restart limited the released sessions again"
    assert rig.sim.session_limit(rig.sessions["A"][0]) is None and rig.sim.session_limit(rig.sessions["S"][0]) == 32


async def test_release_all_during_a_staggered_restore_lifts_the_rest_at_once_for_good(rig, spawn, tmp_path):
    # After the event's end, sessions wait their turn in the staggered restore, still limited. release-all
    # restored them, but the daemon went on planning them as limited: the next time it sent afresh (a
    # station back online) the old limit went out again, until the session's turn.
    d = rig.config_dict()
    d["bridge"]["restore_spread_s"] = 60  # A and S restored 30 s apart
    config = rig.write_config(tmp_path / "dr-bridge.toml", d)
    bridge = await spawn("run", "--config", str(config))
    ven_id = await registered(rig, 1, bridge)
    event_id = rig.vtn.add_event(ven_id, intervals=[(soon(2), timedelta(seconds=4), 2)], targets=TARGETS)
    await limited(rig, bridge)
    await until(lambda: len(rig.sim.limit_calls()) >= 3, 20, bridge, "the first restore of the spread")
    assert len(rig.sim.limit_calls()) == 3, "the second session must still wait for its turn"
    mark = len(rig.sim.limit_calls())

    release = await spawn("release-all", "--config", str(config))
    assert await release.wait(60) == 0, release.stderr()
    await until(lambda: rig.sim.session_limit(rig.sessions["A"][0]) is None
                and rig.sim.session_limit(rig.sessions["S"][0]) == 32, 10, bridge, "the EVs to be unlimited")
    for station_id in rig.station_ids.values():  # the daemon sends afresh what it wants of their sessions
        rig.sim.set_online(station_id, True)
    await asyncio.sleep(4)
    assert limits_since(rig, mark) == [], "a session was limited again after release-all"
    assert rig.sim.session_limit(rig.sessions["A"][0]) is None and rig.sim.session_limit(rig.sessions["S"][0]) == 32
    assert "optOut" not in answers(rig, event_id), "an event that is over is not opted out of at the VTN"
