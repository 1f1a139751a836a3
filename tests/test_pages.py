"""The event-log web pages as an operator opens them: a real event against the eDRV simulator rendered by
headless Chromium, the page token, and escaping of what the utility and eDRV send."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from dr_bridge.config import config_from_dict
from dr_bridge.daemon import Bridge
from dr_bridge.eventlog import event_detail
from dr_bridge.pages import render_event
from dr_bridge.rig import API_KEY, Rig, StationSpec, wait_for
from tests.test_core import soon
from tests.test_export import hostile_event

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "pages"
TOKEN_ENV = "DR_BRIDGE_TEST_PAGE_TOKEN"


def chromium_or_skip() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):  # CI installs it (.ci/run): a missing browser there is a broken build
        pytest.fail("no chromium binary in CI; .ci/run installs Debian's chromium")
    pytest.skip("no chromium binary: `apt-get install chromium` to render the event page headless")


async def chromium(binary: str, profile: Path, *args: str) -> str:
    """Run headless Chromium without blocking the loop that serves the page."""
    proc = await asyncio.create_subprocess_exec(
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        f"--user-data-dir={profile}", "--window-size=1280,2000", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-2000:]
    return out.decode()


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, [StationSpec("depot-A", sessions=2), StationSpec("sim-S", simulator=True),
                       StationSpec("idle-U")], bridge_options={"baseline_minutes": 0.1}, report_interval_s=0.25)
    await r.start(webhooks=True)
    yield r
    await r.stop()


async def test_the_event_page_shows_every_action_and_draws_the_power_chart(rig, tmp_path):
    binary = chromium_or_skip()
    bridge = await rig.started_bridge()
    try:
        s = soon(8)  # a baseline's worth of readings before the start
        event_id = rig.vtn.add_event(bridge.ven.ven_id, targets=[{"resource_id": "depot-A"}, {"resource_id": "sim-S"}],
                                     intervals=[(s, timedelta(seconds=4), 1), (s + timedelta(seconds=4),
                                                                               timedelta(seconds=4), 2)])
        await wait_for(lambda: len((event_detail(bridge.store, event_id) or {}).get("performance", [])) >= 4, 40)
        await wait_for(lambda: not bridge.store.session_states(limited_only=True), 15)
        await rig.sim.drain_webhooks()
        await bridge.engine.settle()
        detail = event_detail(bridge.store, event_id)
        actions = detail["actions"]
        assert {a["purpose"] for a in actions} == {"limit", "restore"} and len(actions) >= 6

        url = bridge.http.page_url(event_id)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "event.png"
        shot.unlink(missing_ok=True)
        dom = await chromium(binary, tmp_path / "profile", "--virtual-time-budget=15000", "--dump-dom", url)
        await chromium(binary, tmp_path / "profile", "--virtual-time-budget=15000", f"--screenshot={shot}", url)
        (ARTIFACTS / "event.html").write_text(dom)
    finally:
        await bridge.stop()

    assert f'<span id="event-id">{event_id}</span>' in dom
    rows = re.findall(r'<tr class="action st-(\w+)">(.*?)</tr>', dom)
    assert len(rows) == len(actions)  # every action, in the log's order
    for (status, cells), a in zip(rows, actions):
        assert status == a["status"] and a["session_id"] in cells and a["resource_id"] in cells
    assert "interval 1 of 2" in dom and "interval 2 of 2" in dom and "received, answered optIn" in dom
    assert dom.count("<canvas") >= 1
    # Power and limit for each of the two targeted resources, drawn after the chart's data arrived.
    assert re.search(r'id="chart"[^>]*data-drawn="4 series"', dom), re.search(r'<div id="chart"[^>]*>', dom)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one


def token_config(rig: Rig):
    d = rig.config_dict()
    d["http"]["token_env"] = TOKEN_ENV
    return config_from_dict(d, source="rig")


async def test_pages_need_the_token_but_webhooks_healthz_and_metrics_do_not(tmp_path, monkeypatch, caplog):
    token = "page-token-Zq81"
    monkeypatch.setenv(TOKEN_ENV, token)
    r = Rig(tmp_path, [StationSpec("A")])
    await r.start()
    bridge = Bridge(token_config(r), API_KEY, vtn_backoff_s=0.2)
    caplog.set_level(logging.DEBUG)
    await bridge.start()
    try:
        base = f"http://127.0.0.1:{bridge.http.port}"
        async with httpx.AsyncClient(base_url=base) as c:
            for path in ("/events", "/static/uPlot.iife.min.js", "/events/X/chart.json", "/"):
                assert (await c.get(path)).status_code == 401, path
                assert (await c.get(path, headers={"Authorization": "Bearer wrong"})).status_code == 401, path
            bearer = {"Authorization": f"Bearer {token}"}
            assert (await c.get("/events", headers=bearer)).status_code == 200
            assert (await c.get("/static/uPlot.iife.min.js", headers=bearer)).status_code == 200
            assert (await c.post("/events", headers=bearer)).status_code == 405  # read-only

            assert (await c.get("/healthz")).status_code in (200, 503)
            assert (await c.get("/metrics")).status_code == 200
            assert (await c.post("/edrv/webhooks", content=b"not json")).status_code == 400

        async with httpx.AsyncClient(base_url=base) as browser:  # a browser: ?token= once, then the cookie
            first = await browser.get("/events?status=completed&token=" + token)
            assert first.status_code == 303 and first.headers["location"] == "/events?status=completed"
            assert "httponly" in first.headers["set-cookie"].lower()
            assert (await browser.get("/events")).status_code == 200
            assert (await browser.get("/events?token=wrong")).status_code == 200  # cookie still good
    finally:
        await bridge.stop()
        await r.stop()
    # The bridge's own logs and aiohttp's (the test's HTTP client logs its URLs, ?token= included).
    served = [r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert served and not [m for m in served if token in m]


async def test_a_configured_but_unset_token_refuses_the_pages(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    r = Rig(tmp_path, [StationSpec("A")])
    await r.start()
    bridge = Bridge(token_config(r), API_KEY, vtn_backoff_s=0.2)
    await bridge.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.http.port}") as c:
            assert (await c.get("/events")).status_code == 503
            assert (await c.get("/events?token=")).status_code == 503
            assert (await c.get("/metrics")).status_code == 200
    finally:
        await bridge.stop()
        await r.stop()


def test_ids_and_details_from_outside_are_escaped(tmp_path):
    store, event_id = hostile_event(tmp_path)
    html = render_event(event_detail(store, event_id))
    assert "<script>alert" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;img src=x onerror=alert(2)&gt;" in html


def test_the_chart_sums_the_limits_in_force_per_resource_and_leaves_out_refused_calls(tmp_path):
    from dr_bridge.chart import chart_data

    store, event_id = hostile_event(tmp_path)
    cfg = config_from_dict({"vtn": {"url": "http://127.0.0.1:1/x", "ven_name": "t"},
                            "chargestations": [{"id": "CS-1", "max_current": 32}]})
    data = chart_data(store, cfg, event_detail(store, event_id))
    (res,) = data["resources"]
    assert res["resource_id"] == "depot<b>-1" and [i["label"] for i in data["intervals"]] == ["level 1", "level 2"]
    # Two sessions at 16.5 A on a 3 x 230 V station; the failed 7400 W call and the rejected restores never
    # took effect, so the limit holds to the end.
    in_force = [v for v in res["limit"] if v is not None]
    assert in_force and set(in_force) == {round(2 * 16.5 * 690 / 1000, 3)}
    assert res["limit"][-1] is not None and res["power"] == [None] * len(data["x"])  # no readings: a gap


def test_a_big_event_pages_its_timeline_and_counts_every_action(tmp_path, monkeypatch):
    from dr_bridge import pages

    monkeypatch.setattr(pages, "ACTIONS_PER_PAGE", 2)
    store, event_id = hostile_event(tmp_path)
    counts = store.action_counts(event_id)

    def page(n: int) -> str:
        return pages.render_event(event_detail(store, event_id, 2, (n - 1) * 2), counts, n)

    first, last = page(1), page(3)
    assert "5 actions:" in first and "actions 1–2 of 5 (page 1 of 3)" in first and "actions 5–5 of 5" in last
    assert first.count('<tr class="action') == 2 and last.count('<tr class="action') == 1
    assert "received, answered" in first and "received, answered" not in last  # each entry on one page
    assert "event ends" in last and "event ends" not in first


async def test_the_list_filtered_by_resource_shows_events_aimed_at_the_whole_ven(tmp_path):
    """As `events list --resource` does: an event for every station (no resource named, nothing sent yet)
    is one of the resource's events; the page left it out."""
    r = Rig(tmp_path, [StationSpec("A"), StationSpec("B")])
    await r.start()
    bridge = await r.started_bridge()
    try:
        everyone = r.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(600), timedelta(seconds=60), 2)])
        elsewhere = r.vtn.add_event(bridge.ven.ven_id, intervals=[(soon(600), timedelta(seconds=60), 2)],
                                    targets=[{"resource_id": "B"}])
        await wait_for(lambda: bridge.store.get_event(everyone) and bridge.store.get_event(elsewhere), 10)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bridge.http.port}") as c:
            page = (await c.get("/events", params={"resource": "A"})).text
        assert everyone in page and elsewhere not in page
    finally:
        await bridge.stop()
        await r.stop()
