"""The commands as an operator runs them: the demo, and the event log in tables and in CONTRACT.md's JSON."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta

import pytest
from typer.testing import CliRunner

from dr_bridge.cli import app
from dr_bridge.rig import wait_for
from tests.test_core import bridge, calls, rig, soon  # noqa: F401  (fixtures)

EVENT_KEYS = {"event_id", "ven_id", "modification_number", "status", "opt", "start", "end", "effective_start"}
ACTION_KEYS = {"at", "session_id", "chargestation_id", "resource_id", "kind", "purpose", "unit", "limit", "status",
               "attempts", "detail"}


@pytest.mark.slow  # a whole demo run (about 25 s): with the process-level suite
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


def test_a_long_event_shows_its_calls_counted_and_its_problems_however_far_down(tmp_path):
    """An event over thousands of sessions: the table counts every call, the timeline stops after a few
    hundred rows and says how to see the rest, and the refused calls are listed wherever they fell."""
    from datetime import datetime, timezone

    from dr_bridge.journal import Journal
    from dr_bridge.store import EventRow, IntervalRow, Store
    from dr_bridge.views import TIMELINE_ROWS

    db = tmp_path / "bridge.db"
    start = datetime(2026, 11, 25, 17, 0, tzinfo=timezone.utc)
    store = Store.open(f"sqlite:///{db}", bridge="long")
    store.save_event(EventRow(event_id="E-LONG", status="completed", opt="optIn", start=start,
                              end=start + timedelta(hours=1), effective_start=start),
                     [IntervalRow(event_id="E-LONG", start=start, end=start + timedelta(hours=1),
                                  signal_name="SIMPLE", signal_type="level", value=2)])
    n = TIMELINE_ROWS + 200
    calls = [dict(event_id="E-LONG", session_id=f"S{i:08d}", chargestation_id="C1", resource_id="depot",
                  kind="set_power_limit", purpose="limit", unit="current", limit=16.0,
                  status="rejected" if i == n - 1 else "accepted", attempts=4 if i == n - 1 else 1,
                  detail="station refused the limit" if i == n - 1 else "") for i in range(n)]
    Journal(store).write_batch([("add_action", c, {}) for c in calls])
    store.close()
    path = tmp_path / "long.toml"
    path.write_text(f'[bridge]\ndatabase_url = "sqlite:///{db}"\n[vtn]\nurl = "http://127.0.0.1:9/OpenADR2/Simple/2.0b"\n'
                    f'ven_name = "long"\n[levels]\n1 = {{ fraction = 0.5 }}\n[[chargestations]]\nid = "C1"\n'
                    f'max_current = 32\nresource_id = "depot"\n')
    runner = CliRunner()

    out = runner.invoke(app, ["events", "show", "E-LONG", "--config", str(path)])
    assert out.exit_code == 0, out.output
    assert re.search(rf"limit\s+{n - 1:,}\s+1\b", out.stdout), out.stdout[:2000]  # accepted, rejected
    assert re.search(r"… \d+ more timeline rows: --all shows them", out.stdout)
    assert "Calls refused or failed (1)" in out.stdout and f"…{n - 1:08d}" in out.stdout
    assert "station refused the limit" in out.stdout

    whole = runner.invoke(app, ["events", "show", "E-LONG", "--config", str(path), "--all"])
    assert whole.exit_code == 0 and "more timeline rows" not in whole.stdout
    assert all(f"…{i:08d}" in whole.stdout for i in range(0, n, 97))


def test_run_refuses_to_start_when_the_webhook_secret_it_names_is_not_set(tmp_path, monkeypatch):
    # Started without it the bridge would take unsigned webhooks (a forged chargestation.offline opts a
    # station out and tells the utility): a named secret that is missing stops the start, like the API key.
    path = tmp_path / "bridge.toml"
    path.write_text(f'[bridge]\ndatabase_url = "sqlite:///{tmp_path / "b.db"}"\n'
                    '[vtn]\nurl = "http://127.0.0.1:9/OpenADR2/Simple/2.0b"\nven_name = "secret-check"\n'
                    '[edrv]\napi_key_env = "TEST_EDRV_KEY"\nwebhook_secret_env = "TEST_EDRV_WEBHOOK_SECRET"\n'
                    '[[chargestations]]\nid = "C1"\nmax_current = 32\n')
    monkeypatch.setenv("TEST_EDRV_KEY", "k")
    monkeypatch.delenv("TEST_EDRV_WEBHOOK_SECRET", raising=False)
    out = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert out.exit_code == 2
    assert "TEST_EDRV_WEBHOOK_SECRET" in out.output and "edrv.webhook_secret_env" in out.output
    assert not (tmp_path / "b.db").exists()  # refused before anything started


def test_events_list_refuses_an_unknown_status_rather_than_listing_nothing(tmp_path):
    path = tmp_path / "bridge.toml"
    path.write_text(f'[bridge]\ndatabase_url = "sqlite:///{tmp_path / "b.db"}"\n'
                    '[vtn]\nurl = "http://127.0.0.1:9/OpenADR2/Simple/2.0b"\n[[chargestations]]\nid = "C1"\n'
                    'max_current = 32\n')
    out = CliRunner().invoke(app, ["events", "list", "--config", str(path), "--status", "finished", "--json"])
    assert out.exit_code == 2 and "--status" in out.output and "completed" in out.output


def test_run_logs_what_check_config_would_warn_about(tmp_path, monkeypatch, caplog):
    # An operator who never ran check-config still reads the start-up log: a level answered optOut is there.
    path = tmp_path / "bridge.toml"
    path.write_text(f'[bridge]\ndatabase_url = "sqlite:///{tmp_path / "b.db"}"\n'
                    '[vtn]\nurl = "http://127.0.0.1:9/OpenADR2/Simple/2.0b"\nven_name = "levels-check"\n'
                    '[edrv]\napi_key_env = "TEST_EDRV_KEY"\n[levels]\n3 = { current = 6 }\n'
                    '[[chargestations]]\nid = "C1"\nmax_current = 32\n')
    monkeypatch.setenv("TEST_EDRV_KEY", "k")
    started = []

    async def run_daemon(cfg, key, **kwargs):
        started.append((cfg.vtn.ven_name, key))
        return 0

    monkeypatch.setattr("dr_bridge.daemon.run_daemon", run_daemon)
    out = CliRunner().invoke(app, ["run", "--config", str(path)])
    assert out.exit_code == 0, out.output
    assert started == [("levels-check", "k")], "the daemon must get the API key, whatever the warnings"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"config: no rule at or below level 1, 2 ([levels] replaces the defaults as a whole): an event at these "
        f"levels is answered optOut (levels in {path})"]


def test_log_lines_carry_utc_timestamps_ending_in_z():
    # The contract: timestamps everywhere are ISO 8601 UTC with a Z (logs said +0000).
    code = "import logging; from dr_bridge.cli import setup_logging; setup_logging(); logging.getLogger('x').warning('hi')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ WARNING x: hi\n", out.stderr), out.stderr


def test_an_unreachable_database_at_start_is_one_line(tmp_path):
    # psycopg's connection error runs to several lines; the contract promises one, without a traceback.
    path = tmp_path / "bridge.toml"
    path.write_text('[bridge]\ndatabase_url = "postgresql://127.0.0.1:9/nothing"\n'
                    '[vtn]\nurl = "http://127.0.0.1:9/OpenADR2/Simple/2.0b"\n[edrv]\napi_key_env = "TEST_EDRV_KEY"\n'
                    '[[chargestations]]\nid = "C1"\nmax_current = 32\n')
    out = subprocess.run([sys.executable, "-c", "from dr_bridge.cli import main; main()", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "TEST_EDRV_KEY": "k"})
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error: "), out.stderr
