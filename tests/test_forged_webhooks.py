"""A webhook that says a limited session ended, and is not eDRV's: the real `dr-bridge run`, a forged POST to
its webhook path (which eDRV must be able to reach, so anyone on that path can), and what eDRV receives.

A limited session is let go only on eDRV's own word (a read of the session), whatever a webhook says; and
unsigned webhooks are refused unless the config allows them in so many words.
"""
from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from dr_bridge.rig import Rig, StationSpec
from tests.test_restart import calls, registered, soon, spawn, until  # noqa: F401  (spawn is a fixture)

pytestmark = pytest.mark.slow

LIMIT = ("set_power_limit", {"unit": "current", "limit": 16})
CLEAR = ("clear_power_limit", {})


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, [StationSpec("A")])
    await r.start(webhooks=True)
    try:
        yield r
    finally:
        await r.stop()


def forged_end(rig: Rig, session_id: str) -> bytes:
    """What an attacker, or a replaying proxy, posts: eDRV's envelope for the session's end, unsigned."""
    import json

    at = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    return json.dumps({"_id": uuid.uuid4().hex[:24], "object": "session", "type": "session.ended",
                       "createdAt": at, "data": {"_id": session_id, "chargestation": rig.station_ids["A"],
                                                 "status": "Ended", "updatedAt": at}}).encode()


async def post(rig: Rig, body: bytes) -> int:
    async with httpx.AsyncClient() as client:
        answer = await client.post(f"http://127.0.0.1:{rig.http_port}/edrv/webhooks", content=body,
                                   headers={"content-type": "application/json"})
    return answer.status_code


async def limited_event(rig: Rig, child, seconds: int) -> datetime:
    ven_id = await registered(rig, 1, child)
    start = soon(2)
    rig.vtn.add_event(ven_id, intervals=[(start, timedelta(seconds=seconds), 2)], targets=[{"resource_id": "A"}])
    await until(lambda: calls(rig, "A") == [LIMIT], 20, child, "the limit")
    await until(lambda: rig.sim.session_limit(rig.sessions["A"][0]) == 16, 5, child, "the EV to obey it")
    return start + timedelta(seconds=seconds)


async def test_a_forged_session_end_does_not_drop_a_limited_session_it_is_restored_at_the_end(
        rig, spawn, tmp_path):  # noqa: F811
    # The operator allowed unsigned webhooks, in so many words (the rig's config says so): the forged end is
    # accepted as a webhook, but the session is let go only if eDRV confirms it ended.
    config = rig.write_config(tmp_path / "dr-bridge.toml")
    child = await spawn("run", "--config", str(config))
    end = await limited_event(rig, child, 10)
    (session,) = rig.sessions["A"]

    assert await post(rig, forged_end(rig, session)) == 200
    await until(lambda: "still running" in child.stderr(), 10, child, "the bridge to say eDRV says otherwise")
    assert rig.sim.session_limit(session) == 16, "the session still runs, limited"

    await asyncio.sleep(max(0.0, (end - datetime.now(timezone.utc)).total_seconds()))
    await until(lambda: CLEAR in calls(rig, "A"), 20, child, "the restore at the end of the event")
    assert calls(rig, "A") == [LIMIT, CLEAR]
    await until(lambda: rig.sim.session_limit(session) is None, 5, child, "the EV to be unlimited")
    assert "webhooks are accepted unsigned" in child.stderr(), "the start must warn of unsigned webhooks"


async def test_without_a_secret_or_an_explicit_allowance_unsigned_webhooks_are_refused(rig, spawn, tmp_path):
    d = rig.config_dict()
    d["edrv"].pop("allow_unsigned_webhooks", None)  # an operator's config that says nothing of webhooks
    config = rig.write_config(tmp_path / "dr-bridge.toml", d)
    child = await spawn("run", "--config", str(config))
    end = await limited_event(rig, child, 6)
    (session,) = rig.sessions["A"]

    assert await post(rig, forged_end(rig, session)) == 401
    lines = child.stderr()
    assert "unsigned webhooks are refused" in lines and "allow_unsigned_webhooks" in lines, lines
    await asyncio.sleep(max(0.0, (end - datetime.now(timezone.utc)).total_seconds()))
    await until(lambda: CLEAR in calls(rig, "A"), 20, child, "the restore at the end of the event")
    assert calls(rig, "A") == [LIMIT, CLEAR]


async def test_a_forged_station_offline_neither_lifts_its_limits_nor_opts_it_out(rig, spawn, tmp_path):  # noqa: F811
    # Taken as an outage, it would restore the station and tell the utility it is out of the event.
    config = rig.write_config(tmp_path / "dr-bridge.toml")
    child = await spawn("run", "--config", str(config))
    await limited_event(rig, child, 60)
    import json

    at = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    body = json.dumps({"_id": uuid.uuid4().hex[:24], "object": "chargestation", "type": "chargestation.offline",
                       "createdAt": at, "data": {"_id": rig.station_ids["A"], "online": False}}).encode()
    assert await post(rig, body) == 200
    await until(lambda: "eDRV says it is online" in child.stderr(), 10, child, "the bridge to say eDRV says otherwise")
    await asyncio.sleep(3)  # passes enough to restore it, and for an opt-out to reach the VTN
    assert calls(rig, "A") == [LIMIT] and rig.sim.session_limit(rig.sessions["A"][0]) == 16
    assert rig.vtn.opts == [], "the VTN was told of an outage that eDRV knows nothing of"
