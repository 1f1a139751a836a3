"""The event log on the command line, as an operator and an auditor use it: `events list` filters, `events show`
as a timeline in 100 columns, and `events export` in CSV and JSON."""
from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from typer.testing import CliRunner

from dr_bridge.cli import app
from dr_bridge.eventlog import ACTION_FIELDS
from dr_bridge.store import ActionRow, EventRow, IntervalRow, OptOutRow, PerformanceRow, Store

T0 = datetime(2026, 11, 25, 17, 0, tzinfo=timezone.utc)
EVIL_ID = "<script>alert(1)</script>"


def t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def add_event(store: Store, event_id: str, start: datetime, resource: str, n_sessions: int = 2,
              status: str = "completed") -> None:
    targets = json.dumps({"targets": {"resource_id": [resource]}})
    store.save_event(EventRow(event_id=event_id, ven_id="VEN1", modification_number=1, status=status,
                              opt="optIn", start=start, end=start + timedelta(minutes=20),
                              effective_start=start + timedelta(seconds=5), offset_s=5,
                              received_at=start - timedelta(hours=1), event_json=targets),
                     [IntervalRow(event_id=event_id, start=start, end=start + timedelta(minutes=10),
                                  signal_name="SIMPLE", signal_type="level", value=1),
                      IntervalRow(event_id=event_id, start=start + timedelta(minutes=10),
                                  end=start + timedelta(minutes=20), signal_name="SIMPLE", signal_type="level",
                                  value=2)])
    for k in range(n_sessions):
        store.add_action(ActionRow(event_id=event_id, at=start + timedelta(seconds=5.2), session_id=f"sess{k:08x}",
                                   chargestation_id="CS-1", resource_id=resource, kind="set_power_limit",
                                   purpose="limit", unit="current", limit=16.5, status="accepted", attempts=1))
        store.add_action(ActionRow(event_id=event_id, at=start + timedelta(minutes=20, seconds=5),
                                   session_id=f"sess{k:08x}", chargestation_id="CS-1", resource_id=resource,
                                   kind="clear_power_limit", purpose="restore", status="rejected", attempts=3,
                                   detail='eDRV said "no", twice,\nthen [red]timed out[/red]'))


def hostile_event(tmp_path: Path) -> tuple[Store, str]:
    """An event whose id and details carry markup, commas, quotes and newlines, as outside data may."""
    store = Store.open(f"sqlite:///{tmp_path / 'log.db'}")
    add_event(store, EVIL_ID, T0, "depot<b>-1")
    store.add_action(ActionRow(event_id=EVIL_ID, at=t(6), session_id="sess-evil", chargestation_id="CS-1",
                               resource_id="depot<b>-1", kind="set_power_limit", purpose="limit", unit="power",
                               limit=7400, status="failed", attempts=4, detail="<img src=x onerror=alert(2)>"))
    store.add_opt_out(OptOutRow(at=t(300), event_id=EVIL_ID, modification_number=1, resource_id="depot<b>-1",
                                reason="the depot floods", source="operator", sent=True, acknowledged=True))
    store.save_performance(EVIL_ID, [PerformanceRow(
        event_id=EVIL_ID, resource_id="depot<b>-1", signal_name="SIMPLE", signal_type="level", interval_start=T0,
        window_start=t(5), window_end=t(605), baseline_kw=22.08, mean_kw=11.0, reduction_kw=11.08,
        reduction_pct=50.2, requested_kw=11.04)])
    return store, EVIL_ID


def config_file(tmp_path: Path) -> str:
    path = tmp_path / "bridge.toml"
    path.write_text(f'[bridge]\ndatabase_url = "sqlite:///{tmp_path / "log.db"}"\n'
                    '[vtn]\nurl = "http://127.0.0.1:1/OpenADR2/Simple/2.0b"\nven_name = "test"\n'
                    '[[chargestations]]\nid = "CS-1"\nmax_current = 32\n')
    return str(path)


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_export_csv_has_one_row_per_action_with_every_contract_field(tmp_path):
    store, event_id = hostile_event(tmp_path)
    cfg = config_file(tmp_path)
    out = cli("events", "export", event_id, "--config", cfg, "--format", "csv")
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    actions = json.loads(cli("events", "show", event_id, "--config", cfg, "--json").stdout)["actions"]
    assert len(rows) == len(actions) == 5
    for row, a in zip(rows, actions):
        assert set(ACTION_FIELDS) <= set(row) and row["event_id"] == event_id
        back = {**row, "limit": float(row["limit"]) if row["limit"] else None, "attempts": int(row["attempts"]),
                "unit": row["unit"] or None}
        assert {f: back[f] for f in ACTION_FIELDS} == {f: a[f] for f in ACTION_FIELDS}
    assert rows[-1]["detail"] == 'eDRV said "no", twice,\nthen [red]timed out[/red]'  # survives CSV quoting


def test_export_json_is_the_show_json_object(tmp_path):
    _, event_id = hostile_event(tmp_path)
    cfg = config_file(tmp_path)
    exported = cli("events", "export", event_id, "--config", cfg, "--format", "json")
    assert exported.exit_code == 0
    assert json.loads(exported.stdout) == json.loads(cli("events", "show", event_id, "--config", cfg, "--json").stdout)
    assert cli("events", "export", event_id, "--config", cfg, "--format", "xml").exit_code == 2
    assert cli("events", "export", "NOPE", "--config", cfg, "--format", "csv").exit_code == 1


def test_events_show_tells_the_story_in_time_order_within_100_columns(tmp_path):
    _, event_id = hostile_event(tmp_path)
    out = cli("events", "show", event_id, "--config", config_file(tmp_path))
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    text = out.stdout
    assert EVIL_ID in text and "[red]timed out" in text  # printed as sent, never read as markup
    order = ["received, answered optIn", "interval 1 of 2", "limit 16.5 A", "opt-out (operator)",
             "interval 2 of 2", "measured", "event ends", "restore (clear)", "Measured reduction"]
    story = text.index("Timeline")  # the calls are counted above it, "restore (clear)" among them
    positions = [text.index(s, story) for s in order]
    assert positions == sorted(positions)
    assert "acknowledged" in text and "rejected" in text and "50" in text and "22.08" in text


def test_events_list_filters_by_time_status_and_resource(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'log.db'}")
    add_event(store, "EARLY", T0, "north")
    add_event(store, "LATE", T0 + timedelta(days=2), "south", n_sessions=0, status="active")
    cfg = config_file(tmp_path)

    def ids(*args: str) -> list[str]:
        out = cli("events", "list", "--config", cfg, "--json", *args)
        assert out.exit_code == 0, out.output
        return [e["event_id"] for e in json.loads(out.stdout)]

    assert ids() == ["EARLY", "LATE"]
    assert ids("--since", "2026-11-26T00:00:00Z") == ["LATE"]
    assert ids("--status", "completed") == ["EARLY"]
    assert ids("--resource", "north") == ["EARLY"]  # from its actions
    assert ids("--resource", "south") == ["LATE"]  # targeted, nothing sent yet
    assert ids("--resource", "elsewhere") == []
    assert cli("events", "list", "--config", cfg, "--since", "yesterday").exit_code == 2


def test_the_event_log_shows_only_its_own_bridges_rows(tmp_path):
    from dr_bridge.eventlog import event_detail, list_events

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    north, south = Store.open(url, bridge="north-program"), Store.open(url, bridge="south-program")
    add_event(north, "EVT-1", T0, "depot-n", n_sessions=2)
    add_event(south, "EVT-1", T0, "depot-s", n_sessions=1)  # the same id from another utility's VTN
    assert len(event_detail(north, "EVT-1")["actions"]) == 4 and north.action_counts("EVT-1") == {
        "accepted": 2, "rejected": 2}
    assert {a["resource_id"] for a in event_detail(south, "EVT-1", limit=10)["actions"]} == {"depot-s"}
    assert [e["event_id"] for e in list_events(south, resource="depot-n")] == []


def test_events_list_by_resource_finds_events_aimed_at_its_group_or_the_whole_ven(tmp_path):
    store = Store.open(f"sqlite:///{tmp_path / 'log.db'}")

    def aimed(event_id: str, targets: dict) -> None:  # pending: nothing sent to any session yet
        store.save_event(EventRow(event_id=event_id, ven_id="VEN1", status="pending", opt="optIn", start=T0,
                                  end=T0 + timedelta(minutes=20), effective_start=T0,
                                  event_json=json.dumps({"targets": targets})))

    aimed("AT-GROUP", {"group_id": ["depots"]})
    aimed("AT-VEN", {"ven_id": ["VEN1"]})
    aimed("AT-OTHER-VEN", {"ven_id": ["VEN2"]})
    aimed("AT-SOUTH", {"resource_id": ["south"]})
    store.close()
    path = tmp_path / "bridge.toml"
    path.write_text(f'[bridge]\ndatabase_url = "sqlite:///{tmp_path / "log.db"}"\n'
                    '[vtn]\nurl = "http://127.0.0.1:1/OpenADR2/Simple/2.0b"\nven_name = "test"\n'
                    '[[chargestations]]\nid = "CS-1"\nresource_id = "north"\ngroup = "depots"\nmax_current = 32\n'
                    '[[chargestations]]\nid = "CS-2"\nresource_id = "south"\nmax_current = 32\n')
    out = cli("events", "list", "--config", str(path), "--json", "--resource", "north")
    assert out.exit_code == 0, out.output
    assert [e["event_id"] for e in json.loads(out.stdout)] == ["AT-GROUP", "AT-VEN"]
