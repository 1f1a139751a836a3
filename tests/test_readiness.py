"""Liveness and readiness: /livez answers while the process does; /readyz (and /healthz) answer 503 with every
reason the bridge cannot act, read from one place (dr_bridge/health.py) that the log and /metrics share."""
from __future__ import annotations

import asyncio
import logging

import httpx

from dr_bridge.health import Readiness, Reason
from dr_bridge.localvtn import LocalVtn
from tests.test_restart import registered, rig, spawn  # noqa: F401  (rig and spawn are fixtures)


def test_a_reason_is_logged_once_when_raised_and_once_when_cleared(caplog):
    readiness = Readiness()
    with caplog.at_level(logging.INFO, "dr_bridge.health"):
        assert readiness.raise_(Reason.EDRV_REFUSING, "eDRV answers 401: check EDRV_API_KEY")
        assert not readiness.raise_(Reason.EDRV_REFUSING, "eDRV answers 401 again")
        assert readiness.not_ready() == {Reason.EDRV_REFUSING: "eDRV answers 401 again"}
        assert readiness.clear(Reason.EDRV_REFUSING, "eDRV accepted a call")
        assert not readiness.clear(Reason.EDRV_REFUSING)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "not ready (eDRV refusing): eDRV answers 401: check EDRV_API_KEY"),
        ("INFO", "ready again (eDRV refusing cleared): eDRV accepted a call")]
    assert readiness.not_ready() == {}


def test_a_probe_that_fails_does_not_hide_the_other_reasons(caplog):
    readiness = Readiness()
    readiness.add_probe(lambda: 1 / 0)
    readiness.add_probe(lambda: (Reason.RESTORES_OVERDUE, "2 sessions"))
    assert readiness.not_ready() == {Reason.RESTORES_OVERDUE: "2 sessions"}


async def _get(http: httpx.AsyncClient, path: str) -> httpx.Response | None:
    try:
        return await http.get(path)
    except httpx.TransportError:  # not listening yet
        return None


async def _answered(http: httpx.AsyncClient, path: str, status: int, timeout: float) -> httpx.Response:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        r = await _get(http, path)
        if r is not None and r.status_code == status:
            return r
        assert asyncio.get_running_loop().time() < deadline, f"{path}: {r and r.status_code} {r and r.text}"
        await asyncio.sleep(0.1)


async def test_run_is_live_but_not_ready_until_registered_with_the_vtn(rig, spawn, tmp_path):
    await rig.vtn.stop()
    rig.vtn = LocalVtn(poll_s=1)  # its port is chosen now, so the config points at it while it is down
    config = rig.write_config(tmp_path / "late-vtn.toml")
    bridge = await spawn("run", "--config", str(config))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{rig.http_port}", timeout=5) as http:
        live = await _answered(http, "/livez", 200, 30)
        assert live.json() == {"alive": True}
        for path in ("/readyz", "/healthz"):
            ready = await _answered(http, path, 503, 1)
            assert [r["reason"] for r in ready.json()["not_ready"]] == ["not registered"], ready.text
        metrics = (await http.get("/metrics")).text
        assert "drbridge_ready 0.0" in metrics and 'drbridge_not_ready{reason="not_registered"} 1.0' in metrics

        await rig.vtn.start()
        await registered(rig, 1, bridge, timeout=40)
        ready = await _answered(http, "/readyz", 200, 10)
        assert ready.json()["not_ready"] == [] and ready.json()["vtn_registered"] is True
        assert "drbridge_ready 1.0" in (await http.get("/metrics")).text
