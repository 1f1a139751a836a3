"""The commands as an operator runs them: the demo, and the event log in tables and in CONTRACT.md's JSON."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import timedelta

from typer.testing import CliRunner

from dr_bridge.cli import app
from dr_bridge.rig import wait_for
from tests.test_core import bridge, calls, rig, soon  # noqa: F401  (fixtures)

EVENT_KEYS = {"event_id", "ven_id", "modification_number", "status", "opt", "start", "end", "effective_start"}
ACTION_KEYS = {"at", "session_id", "chargestation_id", "resource_id", "kind", "purpose", "unit", "limit", "status",
               "attempts", "detail"}


def test_demo_runs_a_whole_event_and_restores_everything():
    out = subprocess.run([sys.executable, "-c", "from dr_bridge.cli import main; main()", "demo"],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "VTN received optIn" in out.stdout
    assert "set_power_limit   depot-north-01" in out.stdout and "clear_power_limit depot-north-01" in out.stdout
    assert "set_power_limit   sim-01" in out.stdout and ": 32 A" in out.stdout
    assert "sessions still limited: 0" in out.stdout
    assert re.search(r"event log page: http://127\.0\.0\.1:\d+/events/EVT-\w+", out.stdout)


async def test_events_list_and_show_json_follow_the_contract(rig, bridge, tmp_path):  # noqa: F811
    s = soon(2)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(s, timedelta(seconds=2), 2)],
                                 targets=[{"resource_id": "A"}])
    await wait_for(lambda: len(calls(rig, "A")) >= 2, 15)
    await bridge.engine.settle()
    cfg = rig.write_config(tmp_path / "bridge.toml")
    runner = CliRunner()

    listed = runner.invoke(app, ["events", "list", "--config", str(cfg), "--json"])
    assert listed.exit_code == 0, listed.output
    (item,) = json.loads(listed.stdout)
    assert EVENT_KEYS <= set(item) and item["event_id"] == event_id and item["status"] == "completed"
    assert item["opt"] == "optIn" and item["start"].endswith("Z") and item["end"].endswith("Z")

    shown = runner.invoke(app, ["events", "show", event_id, "--config", str(cfg), "--json"])
    detail = json.loads(shown.stdout)
    assert [i["value"] for i in detail["intervals"]] == [2.0]
    assert all(ACTION_KEYS <= set(a) for a in detail["actions"])
    assert [(a["kind"], a["purpose"], a["limit"]) for a in detail["actions"]] == [
        ("set_power_limit", "limit", 16), ("clear_power_limit", "restore", None)]
    assert detail["opt_outs"] == []

    table = runner.invoke(app, ["events", "show", event_id, "--config", str(cfg)])
    assert table.exit_code == 0 and "restore (clear)" in table.stdout and event_id in table.stdout
    assert runner.invoke(app, ["events", "list", "--config", str(cfg), "--status", "active", "--json"]).stdout \
        .strip() == "[]"
    missing = runner.invoke(app, ["events", "show", "NOPE", "--config", str(cfg)])
    assert missing.exit_code == 1
