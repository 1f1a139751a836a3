"""eDRV webhooks: live sessions mid-event, refusals, reconciliation, bad input, readings and metrics."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dr_bridge.edrv.webhooks import BadWebhook, verify
from dr_bridge.eventlog import event_detail
from dr_bridge.rig import WEBHOOK_SECRET_ENV, Rig, StationSpec, wait_for
from tests.test_core import calls, soon

SECRET = "whsec-test"


@pytest.fixture
async def rig(tmp_path, request, monkeypatch):
    spec = getattr(request, "param", None) or {}
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, SECRET)
    r = Rig(tmp_path, spec.get("stations") or [StationSpec("A"), StationSpec("B")],
            edrv_options=spec.get("edrv", {"reconcile_interval_s": 2}), webhook_secret=SECRET)
    await r.start(webhooks=True)
    yield r
    await r.stop()


@pytest.fixture
async def bridge(rig):
    b = await rig.started_bridge()
    yield b
    await b.stop()


def sign_v1(body: bytes, t: str) -> str:
    return f"t={t},v1=" + hmac.new(SECRET.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()


# --- signature forms (pure) ---------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["sha256", "sha256-upper", "v1-seconds", "v1-ms", "v1-body"])
def test_every_known_signature_form_is_accepted(form):
    body, now = b'{"_id":"1"}', time.time()
    mac = lambda payload: hmac.new(SECRET.encode(), payload, hashlib.sha256).hexdigest()  # noqa: E731
    t_s, t_ms = str(int(now)), str(int(now * 1000))
    header = {"sha256": "sha256=" + mac(body), "sha256-upper": "sha256=" + mac(body).upper(),
              "v1-seconds": f"t={t_s},v1={mac(t_s.encode() + b'.' + body)}",
              "v1-ms": f"t={t_ms},v1={mac(t_ms.encode() + b'.' + body)}",
              "v1-body": f"t={t_s},v1={mac(body)}"}[form]
    assert verify(header, body, SECRET, now)


@pytest.mark.parametrize("header", [None, "sha256=00", "t=1,v1=00", "garbage"])
def test_wrong_missing_or_stale_signatures_are_refused(header):
    with pytest.raises(BadWebhook) as exc:
        verify(header, b"{}", SECRET, time.time())
    assert exc.value.status == 401


# --- live sessions ---------------------------------------------------------------------------------------
async def test_session_started_mid_interval_gets_its_share_within_a_second(rig, bridge):
    s = soon(2)
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=30), 2)], targets=[{"resource_id": "A"}])
    await wait_for(lambda: calls(rig, "A"), 15)
    assert calls(rig, "A") == [("set_power_limit", {"unit": "current", "limit": 16})]
    first = rig.sessions["A"][0]
    new = rig.sim.start_session(rig.station_ids["A"])
    t0 = time.time()
    await wait_for(lambda: any(sid == new for sid, _, _ in rig.sim.limit_calls()), 5)
    sent_at = next(r.at for r in rig.sim.requests if r.path.endswith(f"{new}/set_power_limit"))
    assert sent_at - t0 < 1.0, f"limit sent {sent_at - t0:.2f}s after the session.started webhook"
    await wait_for(lambda: len([c for c in rig.sim.limit_calls() if c[0] == first]) >= 2, 5)
    by_session = {sid: body for sid, kind, body in rig.sim.limit_calls()}
    assert by_session[new] == {"unit": "current", "limit": 8}
    assert by_session[first] == {"unit": "current", "limit": 8}  # the first session lowered to the new share
    rig.sim.end_session(new)
    await wait_for(lambda: [c for c in rig.sim.limit_calls() if c[0] == first][-1][2]["limit"] == 16, 5)


@pytest.mark.parametrize("rig", [{"edrv": {"reconcile_interval_s": 600}}], indirect=True)
async def test_a_session_started_mid_event_is_limited_without_listing_the_fleet(rig, bridge):
    s = soon(2)
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=30), 2)],
                      targets=[{"resource_id": "A"}, {"resource_id": "B"}])
    await wait_for(lambda: calls(rig, "A") and calls(rig, "B"), 15)
    await bridge.engine.settle()
    t0 = time.time()
    new = rig.sim.start_session(rig.station_ids["A"])
    await wait_for(lambda: any(sid == new for sid, _, _ in rig.sim.limit_calls()), 5)
    since = [(r.method, r.path) for r in rig.sim.requests if r.at >= t0]
    post = since.index(("POST", f"/v1.1/sessions/{new}/set_power_limit"))
    assert not [r for r in since[:post] if r[0] == "GET"], since[:post]  # the webhook said enough
    await bridge.engine.settle()
    assert calls(rig, "B") == [("set_power_limit", {"unit": "current", "limit": 16})]  # B untouched


async def test_session_whose_webhook_was_dropped_is_limited_by_reconciliation(rig, bridge):
    s = soon(2)
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=30), 2)], targets=[{"resource_id": "A"}])
    await wait_for(lambda: calls(rig, "A"), 15)
    new = rig.sim.start_session(rig.station_ids["A"], send_webhook=False)
    await wait_for(lambda: any(sid == new for sid, _, _ in rig.sim.limit_calls()), 6)  # reconcile every 2 s
    assert [b for sid, _, b in rig.sim.limit_calls() if sid == new] == [{"unit": "current", "limit": 8}]


@pytest.mark.parametrize("rig", [{"stations": [StationSpec("A", refuse="http")], "edrv": {"action_timeout_s": 1}},
                                 {"stations": [StationSpec("A", refuse="webhook", naming="completed")]}],
                         indirect=True, ids=["http-400", "failed-webhook"])
async def test_refusing_station_is_resent_then_non_compliant(rig, bridge):
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=60), 2)])
    await wait_for(lambda: bridge.store.opt_outs(event_id), 25)
    sets = [b for k, b in calls(rig, "A") if k == "set_power_limit" and b["limit"] == 16]
    assert len(sets) == 1 + bridge.cfg.edrv.limit_retries  # the first try and limit_retries re-sends
    await bridge.engine.settle(5)
    await wait_for(lambda: bridge.store.opt_outs(event_id)[0].acknowledged, 5)  # reported to the VTN
    detail = event_detail(bridge.store, event_id)
    (opt,) = detail["opt_outs"]
    assert opt["resource_id"] == "A" and opt["source"] == "automatic" and opt["sent"] is True
    assert [(o["event_id"], o["resource_ids"]) for o in rig.vtn.opts] == [(event_id, ["A"])]
    assert {a["status"] for a in detail["actions"] if a["purpose"] == "limit"} == {"rejected"}
    if rig.stations[0].refuse == "http":  # the charger refuses the restore too: /healthz must say so
        url = f"http://127.0.0.1:{rig.http_port}/healthz"

        async def health():
            async with httpx.AsyncClient() as http:
                return await http.get(url)

        await asyncio.sleep(2.5)
        r = await health()
        assert r.status_code == 503 and r.json()["restores_overdue"] == rig.sessions["A"]


# --- bad input -------------------------------------------------------------------------------------
async def test_bad_duplicate_and_out_of_order_webhooks(rig, bridge):
    url = f"http://127.0.0.1:{rig.http_port}/edrv/webhooks"
    body = json.dumps({"_id": "wh-1", "object": "session", "type": "session.updated",
                       "data": {"_id": "x", "status": "Started"}, "createdAt": "2026-01-01T00:00:00Z"}).encode()
    t = str(int(time.time()))
    async with httpx.AsyncClient() as http:
        ok = await http.post(url, content=body, headers={"edrv-signature": sign_v1(body, t)})
        dup = await http.post(url, content=body, headers={"edrv-signature": sign_v1(body, t)})
        bad_sig = await http.post(url, content=body, headers={"edrv-signature": "t=" + t + ",v1=deadbeef"})
        unsigned = await http.post(url, content=body)
        junk = b"{not json"
        malformed = await http.post(url, content=junk, headers={"edrv-signature": sign_v1(junk, t)})
        big = b'{"_id": "' + b"x" * (2 << 20) + b'"}'
        oversized = await http.post(url, content=big, headers={"edrv-signature": sign_v1(big, t)})
        late = json.dumps({"_id": "wh-2", "object": "action", "type": "session.set_power_limit.accepted",
                           "data": {"_id": "never-sent"}}).encode()
        out_of_order = await http.post(url, content=late, headers={"edrv-signature": sign_v1(late, t)})
        health = await http.get(f"http://127.0.0.1:{rig.http_port}/healthz")
    assert (ok.status_code, ok.content) == (200, b"")
    assert dup.status_code == 200
    assert bad_sig.status_code == 401 and unsigned.status_code == 401
    assert malformed.status_code == 400
    assert oversized.status_code == 413
    assert out_of_order.status_code == 200
    assert health.status_code == 200
    from sqlmodel import select
    from dr_bridge.store import WebhookRow
    with bridge.store.session() as s:
        ids = [w.id for w in s.exec(select(WebhookRow))]
    assert "wh-1" in ids and ids.count("wh-1") == 1 and "wh-2" in ids


async def test_a_webhook_signed_without_a_timestamp_is_refused_once_too_old_for_the_duplicate_check(rig, bridge):
    # Signed over the body alone, a captured webhook verifies for ever; its _id marks a replay as a duplicate
    # only while processed webhooks are kept (30 days here), so an older one cannot be told from a replay.
    url = f"http://127.0.0.1:{rig.http_port}/edrv/webhooks"
    station = rig.station_ids["A"]

    def offline(wid: str, age: timedelta) -> tuple[bytes, dict[str, str]]:
        at = (datetime.now(timezone.utc) - age).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = json.dumps({"_id": wid, "object": "chargestation", "type": "chargestation.offline",
                           "data": {"_id": station}, "createdAt": at}).encode()
        return body, {"edrv-signature": "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()}

    async with httpx.AsyncClient() as http:
        body, headers = offline("wh-old", timedelta(days=31))
        old = await http.post(url, content=body, headers=headers)
        body, headers = offline("wh-recent", timedelta(days=29))
        recent = await http.post(url, content=body, headers=headers)
        again = await http.post(url, content=body, headers=headers)  # a replay within the window: a duplicate
    assert (old.status_code, recent.status_code, again.status_code) == (401, 200, 200)
    from sqlmodel import select

    from dr_bridge.store import WebhookRow
    with bridge.store.session() as s:
        assert sorted(w.id for w in s.exec(select(WebhookRow)) if w.id.startswith("wh-")) == ["wh-recent"]


# --- readings and metrics --------------------------------------------------------------------------
async def test_readings_in_both_unit_styles_are_stored_as_kw_and_metrics_parse(rig, bridge):
    await wait_for(lambda: {r.chargestation_id for r in bridge.store.readings()} >=
                   set(rig.station_ids.values()), 10)
    for resource, station_id in rig.station_ids.items():
        expected = rig.sim.station_power_kw(station_id)
        latest = [r for r in bridge.store.readings(station_id)][-1]
        assert latest.power_kw == pytest.approx(expected, rel=0.01), resource
    styles = {type(w["data"]["energy_report"]["power"]["value"]).__name__ for w in rig.sim.webhooks_sent
              if w["type"] == "session.updated" and w["data"].get("energy_report")}
    assert styles == {"float", "str"} or styles == {"int", "str"}
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{rig.http_port}/metrics")).text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"drbridge_active_events", "drbridge_restores_pending", "drbridge_webhook_lag_seconds",
            "drbridge_edrv_call_seconds"} <= names


@pytest.mark.parametrize("rig", [{"stations": [StationSpec("A")], "edrv": {"action_timeout_s": 1}}], indirect=True)
async def test_unanswered_limits_are_sent_once_more_then_taken_as_done_not_refused(rig, bridge):
    """No answer is not a refusal: the limit is sent once more, then taken as held; the station is not
    reported non-compliant, and readiness says the webhooks are silent until they come back."""
    from dr_bridge.health import Reason

    await wait_for(lambda: bridge.engine.last_webhook_at is not None, 10)
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=60), 2)])
    await wait_for(lambda: rig.vtn.responses, 10)
    rig.sim.faults.update(drop_webhook_rate=1.0)  # the charger never answers

    def limits():
        return [a for a in bridge.store.actions(event_id) if a.purpose == "limit"]

    await wait_for(lambda: len(limits()) == 2 and all(a.status == "unanswered" for a in limits()), 25)
    assert Reason.WEBHOOKS_SILENT in bridge.readiness.not_ready()
    await asyncio.sleep(4)  # four more timeouts: nothing more is sent
    assert len(limits()) == 2 and all("no outcome" in a.detail for a in limits())
    assert bridge.store.opt_outs(event_id) == []
    rig.sim.faults.update(drop_webhook_rate=0.0)
    await wait_for(lambda: Reason.WEBHOOKS_SILENT not in bridge.readiness.not_ready(), 10)


@pytest.mark.parametrize("rig", [{"stations": [StationSpec("A")], "edrv": {"action_timeout_s": 1}}], indirect=True)
async def test_an_outcome_arriving_after_its_timeout_still_counts(rig, bridge):
    """The timeout marks a call failed and sends it again; the charger's answer, when it comes after all, is
    what the event log keeps for that call."""
    await wait_for(lambda: bridge.engine.last_webhook_at is not None, 10)
    rig.sim.faults.update(drop_webhook_rate=1.0)  # the charger's answers are held back
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), timedelta(seconds=60), 2)])

    def limits():
        return [a for a in bridge.store.actions(event_id) if a.purpose == "limit"]

    first, *_ = await wait_for(lambda: [a for a in limits() if a.status == "unanswered"], 15)
    assert "no outcome" in first.detail
    await wait_for(lambda: len(limits()) >= 2, 10)  # sent again
    rig.sim.faults.update(drop_webhook_rate=0.0)
    late = [e for e in rig.sim.webhooks_dropped
            if e["type"].endswith(".accepted") and e["data"]["_id"] == first.edrv_action_id]
    await rig.sim._deliver(late[0])
    await wait_for(lambda: next(a for a in limits() if a.id == first.id).status == "accepted", 10)
    assert bridge.store.opt_outs(event_id) == []  # one late answer is not non-compliance


@pytest.mark.parametrize("rig", [{"stations": [StationSpec("A")]}], indirect=True)
async def test_station_offline_is_non_compliant_and_relimited_when_back(rig, bridge):
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=60), 2)])
    await wait_for(lambda: calls(rig, "A"), 15)
    rig.sim.set_online(rig.station_ids["A"], False)
    (opt,) = await wait_for(lambda: bridge.store.opt_outs(event_id), 10)
    assert opt.resource_id == "A" and opt.source == "automatic" and "offline" in opt.reason
    rig.sim.set_online(rig.station_ids["A"], True)
    await wait_for(lambda: [c for c in calls(rig, "A")[1:] if c == ("set_power_limit", {"unit": "current",
                                                                                         "limit": 16})], 10)


async def test_finished_events_and_ended_sessions_are_forgotten_in_memory_not_in_the_log(rig, bridge):
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), timedelta(seconds=2), 2)],
                                 targets=[{"resource_id": "A"}])
    await wait_for(lambda: ("clear_power_limit", {}) in calls(rig, "A"), 15)
    session = rig.sessions["A"][0]
    rig.sim.end_session(session)  # eDRV sends session.ended
    dispatcher = bridge.engine.dispatcher
    await wait_for(lambda: dispatcher.drop_finished() or not dispatcher.known(session), 10)
    bridge.engine._drop_finished(datetime.now(timezone.utc))
    assert event_id not in bridge.engine.events
    # The event log keeps everything.
    assert bridge.store.get_event(event_id).status == "completed"
    assert [a.purpose for a in bridge.store.actions(event_id)] == ["limit", "restore"]


async def test_a_webhook_whose_handling_fails_for_a_moment_is_handled_again_not_dropped(rig, bridge, monkeypatch):
    """Handling failed (the database away for the lookup) and the webhook was marked processed all the same:
    here the charger's acceptance of a limit, lost for good, so the log never showed it accepted."""
    import sqlalchemy as sa

    handle, failed = bridge.engine.on_webhook, []

    async def away_once(env):
        if env.type == "session.set_power_limit.accepted" and not failed:
            failed.append(env.id)  # no real outage can be aimed at this one lookup
            raise sa.exc.OperationalError("SELECT ...", {}, Exception("the server closed the connection"))
        return await handle(env)

    monkeypatch.setattr(bridge.engine, "on_webhook", away_once)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(2), timedelta(seconds=30), 2)],
                                 targets=[{"resource_id": "A"}])
    await wait_for(lambda: failed, 15)
    await wait_for(lambda: [a.status for a in bridge.store.actions(event_id)] == ["accepted"], 10)
    await wait_for(lambda: failed[0] not in {w.id for w in bridge.store.unprocessed_webhooks()}, 5)
