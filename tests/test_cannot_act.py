"""A bridge that cannot act says so, through the real `dr-bridge run`: in one ERROR line, in /readyz, in its
metrics, and (when it cannot limit) to the VTN, instead of looking healthy or opting the fleet out."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dr_bridge.rig import API_KEY, WEBHOOK_SECRET_ENV, Rig, StationSpec
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


async def test_edrv_refusing_the_key_is_an_alarm_and_an_opt_out_until_it_accepts_again(rig, tmp_path,
                                                                                       spawn):  # noqa: F811
    child = await spawn("run", "--config", str(rig.write_config(tmp_path / "dr-bridge.toml")))
    ven_id = await registered(rig, 1, child)
    start, length = soon(10), 14
    event_id = rig.vtn.add_event(ven_id, intervals=[(start, timedelta(seconds=length), 2)], targets=TARGETS)
    await until(lambda: [r for r in rig.vtn.responses if r["event_id"] == event_id], 15, child, "the optIn")
    rig.sim.api_key = "rotated-in-the-edrv-dashboard"  # the bridge's key is refused from now on: HTTP 401

    # Found while the event is pending: readiness, the metric, one ERROR, and the VTN hears optOut per resource.
    refusing = await until(lambda: reasons(rig).get("eDRV refusing"), 15, child, "readiness: eDRV refusing")
    assert "DR_BRIDGE_RIG_KEY" in refusing and "restart" in refusing
    assert not_ready_metric(rig, "edrv_refusing") == 1

    def opts() -> list[dict]:
        return [o for o in rig.vtn.opts if o["event_id"] == event_id]

    await until(lambda: len(opts()) >= 2, 15, child, "opt-outs at the VTN")
    assert sorted((o["opt_type"], o["opt_reason"], tuple(o["resource_ids"])) for o in opts()) == [
        ("optOut", "outageRunStatus", ("A",)), ("optOut", "outageRunStatus", ("S",))]
    assert now() < start, "too slow to show that the refusal is found before the event starts"
    await until(lambda: now() > start + timedelta(seconds=2), 20, child, "the event to start")
    assert all(rig.sim.session_limit(s) is None for ids in rig.sessions.values() for s in ids)
    assert len(error_lines(child, "eDRV refusing")) == 1, child.stderr()

    mark = len(rig.sim.limit_calls())
    rig.sim.api_key = API_KEY  # eDRV accepts the key again
    await until(lambda: "eDRV refusing" not in reasons(rig), 15, child, "readiness to clear")
    await until(lambda: all(rig.sim.session_limit(s) == 16 for ids in rig.sessions.values() for s in ids), 15,
                child, "the sessions limited again while the event runs")
    await until(lambda: CLEAR in calls(rig, "A", mark) and LIFT in calls(rig, "S", mark), 30, child,
                "the restore at the end")


async def test_edrv_out_of_reach_for_long_is_not_ready_until_it_answers(rig, tmp_path, spawn):  # noqa: F811
    child = await spawn("run", "--config", str(rig.write_config(tmp_path / "dr-bridge.toml")))
    await registered(rig, 1, child)
    await until(lambda: not reasons(rig), 15, child, "the bridge to be ready")
    rig.sim.faults.update(error_rate=1.0)  # eDRV answers every call 503
    detail = await until(lambda: reasons(rig).get("eDRV unreachable"), 20, child, "readiness: eDRV unreachable")
    assert rig.sim.base_url in detail
    assert not_ready_metric(rig, "edrv_unreachable") == 1
    rig.sim.faults.update(error_rate=0.0)
    await until(lambda: "eDRV unreachable" not in reasons(rig), 20, child, "readiness to clear")
    assert len(error_lines(child, "eDRV unreachable")) == 1, child.stderr()


async def test_webhooks_refused_for_their_signature_are_an_alarm(tmp_path, spawn, monkeypatch):  # noqa: F811
    r = Rig(tmp_path, [StationSpec("A")], edrv_options={"action_timeout_s": 1}, webhook_secret="edrvs-secret")
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, "an-old-secret")  # rotated in eDRV, not in the bridge's environment
    await r.start(webhooks=True)
    try:
        child = await spawn("run", "--config", str(r.write_config(tmp_path / "dr-bridge.toml")))
        await registered(r, 1, child)
        detail = await until(lambda: reasons(r).get("webhooks silent"), 20, child, "readiness: webhooks silent")
        assert WEBHOOK_SECRET_ENV in detail and "refused" in detail
        assert not_ready_metric(r, "webhooks_silent") == 1
        assert len(error_lines(child, "webhooks silent")) == 1, child.stderr()
    finally:
        await r.stop()
