"""Secrets (eDRV API key, webhook secret) never reach the logs, even at --debug, nor the event-log database."""
from __future__ import annotations

import signal
import sqlite3
from datetime import timedelta

import pytest

from dr_bridge.rig import API_KEY, WEBHOOK_SECRET_ENV, Rig, StationSpec
from tests.test_restart import calls, soon, spawn, until  # noqa: F401  (spawn is a fixture)

pytestmark = pytest.mark.slow

SECRET = "whsec-never-log-this-9f2c"


@pytest.fixture
async def rig(tmp_path, monkeypatch):
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, SECRET)
    r = Rig(tmp_path, [StationSpec("A")], webhook_secret=SECRET)
    await r.start(webhooks=True)
    try:
        yield r
    finally:
        await r.stop()


async def test_secrets_stay_out_of_logs_and_database(rig, tmp_path, spawn):  # noqa: F811
    config = rig.write_config(tmp_path / "dr-bridge.toml")
    child = await spawn("run", "--config", str(config), "--debug")
    await until(lambda: rig.vtn.registrations, 30, child, "registration")
    ven_id = rig.vtn.registrations[0]["ven_id"]
    rig.vtn.add_event(ven_id, intervals=[(soon(2), timedelta(seconds=4), 2)], targets=[{"resource_id": "A"}])
    await until(lambda: ("clear_power_limit", {}) in calls(rig, "A"), 30, child, "the limit and the restore")
    await until(lambda: len(rig.sim.webhooks_sent) >= 2, 10, child, "webhooks delivered")
    child.signal(signal.SIGTERM)
    assert await child.wait(20) == 0

    logs = child.stderr() + child.stdout()
    # Both secrets were in use: eDRV accepted the key, and webhook signatures were checked with the secret.
    assert "webhook signatures verified as" in logs and "DEBUG" in logs
    db = tmp_path / "dr-bridge.db"
    raw = db.read_bytes()
    with sqlite3.connect(db) as conn:
        dump = "\n".join(conn.iterdump())
    assert "webhooks" in dump and "actions" in dump
    for secret in (API_KEY, SECRET):
        assert secret not in logs, f"a secret appears in the log: {secret[:4]}..."
        assert secret.encode() not in raw and secret not in dump, f"a secret is stored: {secret[:4]}..."
