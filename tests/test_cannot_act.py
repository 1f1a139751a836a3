"""A bridge that cannot act says so, through the real `dr-bridge run`: in one ERROR line, in /readyz, in its
metrics, and (when it cannot limit) to the VTN, instead of looking healthy or opting the fleet out."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dr_bridge.rig import Rig, StationSpec
from tests.test_restart import CLEAR, LIFT, LIMIT, TARGETS, calls, registered, soon, spawn, until  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, [StationSpec("A"), StationSpec("S", simulator=True)],
            edrv_options={"action_timeout_s": 1, "reconcile_interval_s": 2})
    await r.start(webhooks=True)
    try:
        yield r
    finally:
        await r.stop()


def health(rig: Rig) -> dict:
    return httpx.get(f"http://127.0.0.1:{rig.http_port}/readyz", timeout=5).json()


def reasons(rig: Rig) -> dict[str, str]:
    try:
        return {r["reason"]: r["detail"] for r in health(rig)["not_ready"]}
    except httpx.HTTPError:
        return {"(no answer)": ""}


def not_ready_metric(rig: Rig, reason: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{rig.http_port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "drbridge_not_ready":
            return next(s.value for s in family.samples if s.labels["reason"] == reason)
    raise AssertionError("no drbridge_not_ready metric")


def error_lines(child, text: str) -> list[str]:
    return [line for line in child.stderr().splitlines() if "ERROR" in line and text in line]


def now() -> datetime:
    return datetime.now(timezone.utc)


async def test_webhook_silence_is_an_alarm_not_a_fleet_opt_out_nor_a_clear_loop(rig, tmp_path, spawn):  # noqa: F811
    child = await spawn("run", "--config", str(rig.write_config(tmp_path / "dr-bridge.toml")))
    ven_id = await registered(rig, 1, child)
    await until(lambda: health(rig)["last_webhook"], 20, child, "eDRV's webhooks to reach the bridge")
    rig.sim.faults.update(drop_webhook_rate=1.0)  # the webhook endpoint is disabled in eDRV
    start, length = soon(3), 8
    end = start + timedelta(seconds=length)
    event_id = rig.vtn.add_event(ven_id, intervals=[(start, timedelta(seconds=length), 2)], targets=TARGETS)
    await until(lambda: LIMIT in calls(rig, "A") and LIMIT in calls(rig, "S"), 20, child, "the limits")

    silent = await until(lambda: reasons(rig).get("webhooks silent"), 15, child, "readiness: webhooks silent")
    assert "webhook endpoint" in silent
    assert not_ready_metric(rig, "webhooks_silent") == 1
    await until(lambda: now() > end + timedelta(seconds=6), 30, child, "six outcome timeouts past the end")

    # Sent once more when unanswered, never in a loop; and the event ended restored.
    for resource, restore in (("A", CLEAR), ("S", LIFT)):
        sent = calls(rig, resource)
        assert 1 <= sent.count(LIMIT) <= 2 and 1 <= sent.count(restore) <= 2, (resource, sent)
    assert rig.sim.session_limit(rig.sessions["A"][0]) is None
    assert rig.sim.session_limit(rig.sessions["S"][0]) == 32
    # No answer is not a refusal: the VTN hears no opt-out.
    assert [o for o in rig.vtn.opts if o["event_id"] == event_id] == []
    assert len(error_lines(child, "webhooks silent")) == 1, child.stderr()

    rig.sim.faults.update(drop_webhook_rate=0.0)  # the endpoint is enabled again
    await until(lambda: "webhooks silent" not in reasons(rig), 15, child, "readiness to clear")
