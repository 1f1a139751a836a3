"""The eDRV simulator as operators and the bridge see it: HTTP envelope, webhooks, EV model, admin API, CLI."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from aiohttp import web
from typer.testing import CliRunner

from dr_bridge.cli import app
from dr_bridge.edrv.client import EdrvClient
from dr_bridge.edrv.errors import EdrvRejected
from dr_bridge.edrv.models import parse_energy_report
from dr_bridge.edrv.simulator import EdrvSimulator

KEY = "sim-key"


class Receiver:
    """A webhook endpoint on loopback that keeps what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes, dict]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read(), await request.json()))
        return web.Response(status=200)

    async def start(self) -> None:
        app_ = web.Application()
        app_.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app_)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hooks"

    def types(self, prefix: str = "") -> list[str]:
        return [body["type"] for _, _, body in self.received if body["type"].startswith(prefix)]


@pytest.fixture
async def receiver():
    rx = Receiver()
    await rx.start()
    yield rx
    await rx._runner.cleanup()


@pytest.fixture
async def sim(receiver):
    simulator = EdrvSimulator(KEY, webhook_url=receiver.url, ev_delay_s=0.2, report_interval_s=0.2)
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def http(sim):
    async with httpx.AsyncClient(base_url=sim.base_url + "/", headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.mark.parametrize("naming,refuse,outcome", [
    ("accepted", None, "accepted"), ("completed", None, "completed"),
    ("accepted", "webhook", "rejected"), ("completed", "webhook", "failed"),
])
async def test_set_power_limit_webhook_sequence(sim, receiver, naming, refuse, outcome):
    session_id = sim.start_session(sim.add_station(naming=naming, refuse=refuse))
    async with EdrvClient(sim.base_url, KEY) as edrv:
        action = await edrv.set_power_limit(session_id, "current", 10)
    await sim.drain_webhooks()
    assert receiver.types("session.set_power_limit") == [f"session.set_power_limit.{k}" for k in ("requested", outcome)]
    envelope = receiver.received[-1][2]
    assert envelope["object"] == "action" and envelope["data"]["_id"] == action.id
    assert envelope["createdAt"].endswith("Z") and envelope["data"]["data"] == {"unit": "current", "limit": 10}
    await asyncio.sleep(0.35)
    assert sim.session_limit(session_id) == (None if refuse else 10)


async def test_http_refusal_sends_no_action_webhooks(sim, receiver, http):
    session_id = sim.start_session(sim.add_station(refuse="http"))
    response = await http.post(f"sessions/{session_id}/set_power_limit", json={"unit": "current", "limit": 6})
    assert response.status_code == 400 and response.json()["ok"] is False and response.json()["result"] is None
    await sim.drain_webhooks()
    assert receiver.types() == ["session.started"]


async def test_ev_power_follows_limit_after_delay(sim, http):
    station = sim.add_station(max_current=32, phases=3, voltage=230)
    session_id = sim.start_session(station, ev_max_current=20)
    started = time.time()
    assert sim.session_power_kw(session_id) == pytest.approx(20 * 230 * 3 / 1000)
    t0 = time.time()
    async with EdrvClient(sim.base_url, KEY) as edrv:
        await edrv.get_session(session_id)  # the connection is up before the timed part
        t_call = time.time()
        await edrv.set_power_limit(session_id, "current", 10)
        t_set = time.time()
        if t_set - t_call < 0.15:  # on a loaded machine the call itself may outlast the EV's reaction delay
            assert sim.session_power_kw(session_id) == pytest.approx(13.8)  # the EV has not reacted yet
        await asyncio.sleep(0.3)  # ev_delay_s 0.2, jitter at most +20 %
        assert sim.session_power_kw(session_id) == pytest.approx(6.9)
        await edrv.set_power_limit(session_id, "power", 4600)
        await asyncio.sleep(0.3)
        assert sim.session_power_kw(session_id) == pytest.approx(4.6)
        await edrv.clear_power_limit(session_id)
        await asyncio.sleep(0.3)
    t1 = time.time()
    assert sim.station_power_kw(station) == pytest.approx(13.8)
    assert 4.6 < sim.mean_power_kw(station, t0, t1) < 13.8
    assert sim.mean_power_kw(station, t_set + 0.25, t_set + 0.29) == pytest.approx(6.9)
    energy_wh = (await http.get(f"sessions/{session_id}")).json()["result"]["metrics"]["energyConsumed"]
    elapsed = time.time() - started
    assert 4.6 * elapsed / 3.6 < energy_wh < 13.8 * elapsed / 3.6


async def test_power_reports_use_both_unit_styles_and_show_the_limit(sim, receiver):
    kw_station, w_station = sim.add_station(), sim.add_station()
    first, second = sim.start_session(kw_station), sim.start_session(w_station)
    async with EdrvClient(sim.base_url, KEY) as edrv:
        await edrv.set_power_limit(second, "current", 8)
    await asyncio.sleep(0.7)
    await sim.drain_webhooks()
    updates = {}
    for _, _, body in receiver.received:
        if body["type"] == "session.updated":
            updates[body["data"]["_id"]] = body["data"]["energy_report"]
    assert isinstance(updates[first]["power"]["value"], float) and updates[first]["power"]["unit"] == "kW"
    assert isinstance(updates[second]["power"]["value"], str) and updates[second]["power"]["unit"] == "W"
    assert parse_energy_report(updates[first])[:2] == (pytest.approx(22.08), pytest.approx(32))
    assert parse_energy_report(updates[second])[:2] == (pytest.approx(5.52), pytest.approx(8))


async def test_session_and_station_webhooks(sim, receiver, http):
    station = sim.add_station()
    session_id = sim.start_session(station, send_webhook=False)
    sim.set_online(station, False)
    response = await http.post(f"sessions/{session_id}/set_power_limit", json={"unit": "current", "limit": 6})
    assert response.status_code == 400 and "offline" in response.json()["message"]
    sim.set_online(station, True)
    assert (await http.get(f"sessions/{session_id}/stop")).json()["ok"] is True
    await sim.drain_webhooks()
    assert [t for t in receiver.types() if t != "session.updated"] == [
        "chargestation.offline", "chargestation.online", "session.ended"]
    assert [b["object"] for _, _, b in receiver.received][:2] == ["chargestation", "chargestation"]
    assert (await http.get(f"sessions/{session_id}")).json()["result"]["status"] == "Ended"


@pytest.mark.parametrize("style", ["v1", "sha256"])
async def test_webhooks_are_signed(receiver, style):
    async with EdrvSimulator(KEY, webhook_url=receiver.url, webhook_secret="whsec", signature_style=style) as sim:
        sim.start_session(sim.add_station())
        await sim.drain_webhooks()
    headers, body, _ = receiver.received[0]
    signature = headers["edrv-signature"]
    if style == "sha256":
        assert signature == "sha256=" + hmac.new(b"whsec", body, hashlib.sha256).hexdigest()
    else:
        parts = dict(p.split("=", 1) for p in signature.split(","))
        signed = parts["t"].encode() + b"." + body
        assert parts["v1"] == hmac.new(b"whsec", signed, hashlib.sha256).hexdigest()
        assert abs(int(parts["t"]) - time.time()) < 60


async def test_dropped_webhooks(sim, receiver):
    station = sim.add_station()
    sim.faults.drop_next_webhooks(1)
    sim.start_session(station)
    sim.start_session(station)
    await sim.drain_webhooks()
    assert receiver.types() == ["session.started"] and len(sim.webhooks_dropped) == 1


async def test_auth_envelope_pagination_and_recording(sim, http):
    station = sim.add_station(connectors=25)
    for _ in range(25):
        sim.start_session(station)
    async with httpx.AsyncClient(base_url=sim.base_url + "/") as anonymous:
        missing = await anonymous.get("sessions")
        wrong = await anonymous.get("sessions", headers={"Authorization": "Bearer nope"})
    assert (missing.status_code, missing.json()) == (401, {"ok": False, "message": "unauthorized", "result": None})
    assert (wrong.status_code, wrong.json()["message"]) == (401, "jwt expired")
    first = (await http.get("sessions", params={"status": "started"})).json()
    second = (await http.get("sessions", params={"status": "Started", "paginate_page": 2})).json()
    assert (len(first["result"]), first["hasNext"]) == (20, True)
    assert (len(second["result"]), second["hasNext"]) == (5, False)
    assert (await http.get("sessions", params={"status": "Ended"})).json()["result"] == []
    assert [r.status for r in sim.requests] == [401, 401, 200, 200, 200]
    assert sim.requests[3].query == {"status": "Started", "paginate_page": "2"}


async def test_admin_http_api(sim, http):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{sim.port}/_admin/") as admin:
        station = (await admin.post("stations", json={"simulator": True, "max_current": 16})).json()["result"]
        assert station["is_simulator"] is True
        session = (await admin.post("sessions", json={"station_id": station["_id"]})).json()["result"]
        await admin.post("faults", json={"fail_next": {"n": 1, "status": 502}})
        assert (await http.get(f"sessions/{session['_id']}")).status_code == 502
        assert (await admin.post(f"sessions/{session['_id']}/end")).json()["result"]["status"] == "Ended"
        assert (await admin.post(f"stations/{station['_id']}/offline")).json()["result"]["online"] is False
        assert (await admin.post("stations", json={"bogus": 1})).status_code == 400
        recorded = (await admin.get("requests")).json()["result"]
    assert [(r["method"], r["status"]) for r in recorded] == [("GET", 502)]  # admin calls are not recorded


async def test_same_seed_same_ids():
    one, two = EdrvSimulator(seed=7), EdrvSimulator(seed=7)
    for sim in (one, two):
        sim.start_session(sim.add_station())
    assert one.station_ids() == two.station_ids() and one.session_ids() == two.session_ids()
    assert EdrvSimulator(seed=8).add_station() != one.station_ids()[0]


async def test_simulator_station_rejects_power_unit_via_client(sim):
    session_id = sim.start_session(sim.add_station(simulator=True))
    async with EdrvClient(sim.base_url, KEY) as edrv:
        with pytest.raises(EdrvRejected, match="unit = current"):
            await edrv.set_power_limit(session_id, "power", 4000)


def test_cli_help_documents_the_options():
    result = CliRunner().invoke(app, ["simulate-edrv", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    for option in ("--host", "--port", "--api-key-env", "--webhook-url", "--webhook-secret-env", "--config",
                   "--stations", "--sim-stations", "--sessions-per-station", "--seed", "--naming", "--latency",
                   "--error-rate", "--rate-limit-rate", "--drop-webhook-rate"):
        assert option in result.output


def test_cli_serves_config_stations_and_exits_0_on_sigterm(tmp_path):
    config = tmp_path / "bridge.toml"
    config.write_text('[[chargestations]]\nid = "630cbe24c459e97b158e8c23"\nmax_current = 16\n'
                      '[[chargestations]]\nid = "630cbe24c459e97b158e8c24"\nsimulator = true\n')
    env = {**os.environ, "COLUMNS": "200", "SIM_TEST_KEY": "k-123"}
    proc = subprocess.Popen([sys.executable, "-c", "from dr_bridge.cli import main; main()", "simulate-edrv",
                             "--port", "0", "--config", str(config), "--api-key-env", "SIM_TEST_KEY"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        base_url = None
        for line in proc.stdout:
            if "listening:" in line:
                base_url = line.split("listening:")[1].split()[0]
                break
        assert base_url and base_url.endswith("/v1.1")
        response = httpx.get(base_url + "/chargestations", headers={"Authorization": "Bearer k-123"})
        stations = {s["_id"]: s["is_simulator"] for s in response.json()["result"]}
        assert stations == {"630cbe24c459e97b158e8c23": False, "630cbe24c459e97b158e8c24": True}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
