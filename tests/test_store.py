"""The event log on SQLite and on PostgreSQL: migrations, UTC round-trips, upserts and queries."""
from datetime import datetime, timedelta, timezone

import pytest

from dr_bridge.store import ARMED, ActionRow, EventRow, IntervalRow, OptOutRow, Store, normalise_url

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(db_url):
    s = Store.open(db_url)
    yield s
    s.close()


def test_migrations_are_idempotent(db_url):
    Store.open(db_url).close()
    s = Store.open(db_url)  # a second upgrade on a current schema must be a no-op
    assert s.events() == []
    s.close()


def test_bridges_starting_together_on_a_new_database_all_start(pg_url):
    """Several bridges on one PostgreSQL, started together (a host boot, a rolling upgrade): one migrates,
    the others wait for it. Without the lock one of them failed on the same CREATE TYPE and exited 1."""
    import subprocess
    import sys

    code = "import sys; from dr_bridge.store import Store; Store.open(sys.argv[1], bridge=sys.argv[2]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code, pg_url, name], stderr=subprocess.PIPE, text=True)
             for name in "abcd"]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors


def test_the_migrations_build_exactly_the_schema_the_models_describe(store):
    # A column added to a model without its migration (or the reverse) would work in a fresh test database
    # built one way and break an operator's upgraded one.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlmodel import SQLModel

    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), SQLModel.metadata) == []


def test_event_round_trip_keeps_utc_and_replaces_intervals(store):
    row = EventRow(event_id="E1", modification_number=0, start=T0, end=T0 + timedelta(hours=1),
                   effective_start=T0 + timedelta(seconds=30), offset_s=30.0)
    store.save_event(row, [IntervalRow(event_id="E1", start=T0, end=T0 + timedelta(minutes=30),
                                       signal_name="SIMPLE", signal_type="level", value=1.0),
                           IntervalRow(event_id="E1", start=T0 + timedelta(minutes=30), end=T0 + timedelta(hours=1),
                                       signal_name="SIMPLE", signal_type="level", value=2.0)])
    got = store.get_event("E1")
    assert got.start == T0 and got.start.tzinfo is not None
    assert got.effective_start == T0 + timedelta(seconds=30)
    assert [i.value for i in store.intervals("E1")] == [1.0, 2.0]

    row.modification_number = 1
    store.save_event(row, [IntervalRow(event_id="E1", start=T0, end=T0 + timedelta(hours=1),
                                       signal_name="SIMPLE", signal_type="level", value=3.0)])
    assert store.get_event("E1").modification_number == 1
    assert [i.value for i in store.intervals("E1")] == [3.0]


def test_naive_datetimes_are_refused(store):
    with pytest.raises(Exception):
        store.save_event(EventRow(event_id="E2", start=datetime(2026, 1, 1), effective_start=T0))


def test_actions_update_in_place_and_count_by_status(store):
    a = store.add_action(ActionRow(event_id="E1", session_id="S1", chargestation_id="C1", resource_id="R1",
                                   kind="set_power_limit", purpose="limit", unit="current", limit=16))
    store.update_action(a.id, status="requested", attempts=1, edrv_action_id="X1")
    store.update_action(store.action_by_edrv_id("X1").id, status="accepted")
    rows = store.actions(event_id="E1")
    assert len(rows) == 1 and rows[0].status == "accepted" and rows[0].attempts == 1
    assert store.action_counts() == {"accepted": 1}


def test_calls_cut_short_by_a_stop_are_failed_at_the_next_start_and_one_armed_ahead_may_never_have_gone(store):
    def row(session_id: str, status: str, detail: str = "") -> ActionRow:
        return store.add_action(ActionRow(event_id="E1", session_id=session_id, chargestation_id="C1",
                                          resource_id="R1", kind="set_power_limit", purpose="limit", unit="current",
                                          limit=16, status=status, detail=detail))

    row("SENT", "planned"), row("ARMED", "planned", ARMED), row("DONE", "requested")
    assert store.fail_interrupted_actions() == 2
    got = {a.session_id: (a.status, a.detail) for a in store.actions("E1")}
    assert got["SENT"] == ("failed", "interrupted: the bridge stopped before this call's outcome was recorded")
    assert got["ARMED"][0] == "failed" and got["ARMED"][1].endswith("it may never have been sent")
    assert got["DONE"] == ("requested", "")


def test_session_state_tracks_what_is_still_limited(store):
    store.save_session_state("S1", chargestation_id="C1", resource_id="R1", limited=True, unit="current", limit=16)
    store.save_session_state("S2", chargestation_id="C1", resource_id="R1", limited=True, unit="current", limit=16)
    store.save_session_state("S2", ended=True)
    store.save_session_state("S3", chargestation_id="C2", resource_id="R2", limited=False)
    assert [s.session_id for s in store.session_states(limited_only=True)] == ["S1"]


def test_ven_state_and_opt_outs(store):
    store.save_ven_state("VEN-1", "REG-1", "http://vtn")
    assert (store.ven_state().ven_id, store.ven_state().registration_id) == ("VEN-1", "REG-1")
    store.add_opt_out(OptOutRow(event_id="E1", resource_id="R1", reason="overrideStatus"))
    (opt,) = store.opt_outs(unapplied=True)
    store.update_opt_out(opt.id, applied=True)
    assert store.opt_outs(unapplied=True) == []
    assert store.opt_outs("E1")[0].reason == "overrideStatus"


def test_relative_sqlite_paths_follow_the_config_file(tmp_path):
    assert normalise_url("sqlite:///x.db", tmp_path) == f"sqlite:///{tmp_path / 'x.db'}"
    assert normalise_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"


def test_readings_between_picks_the_stations_and_the_window(store):
    from dr_bridge.store import ReadingRow

    for i, (station, kw) in enumerate([("C1", 1.0), ("C2", 2.0), ("C1", 3.0), ("C3", 4.0)]):
        store.add_reading(ReadingRow(at=T0 + timedelta(seconds=10 * i), session_id=f"S-{station}",
                                     chargestation_id=station, power_kw=kw))
    got = store.readings_between({"C1", "C2"}, T0 + timedelta(seconds=5), T0 + timedelta(seconds=20))
    assert [(r.chargestation_id, r.power_kw) for r in got] == [("C2", 2.0), ("C1", 3.0)]
    assert got[0].at.tzinfo is not None


def test_performance_rows_are_replaced_per_event(store):
    from dr_bridge.store import PerformanceRow

    def row(event_id, resource_id, kw):
        return PerformanceRow(event_id=event_id, resource_id=resource_id, signal_name="SIMPLE",
                              signal_type="level", interval_start=T0, window_start=T0,
                              window_end=T0 + timedelta(minutes=5), mean_kw=kw)

    store.save_performance("E1", [row("E1", "R1", 1.0), row("E1", "R2", 2.0)])
    store.save_performance("E2", [row("E2", "R1", 9.0)])
    store.save_performance("E1", [row("E1", "R1", 1.5)])
    assert [(p.resource_id, p.mean_kw) for p in store.performance("E1")] == [("R1", 1.5)]
    assert [p.mean_kw for p in store.performance("E2")] == [9.0]


def test_unacknowledged_opt_outs_and_availability_windows(store):
    store.add_opt_out(OptOutRow(event_id="E1", resource_id="R1", opt_reason="overrideStatus"))
    done = store.add_opt_out(OptOutRow(event_id="E1", resource_id="R2"))
    store.update_opt_out(done.id, sent=True, acknowledged=True, attempts=1)
    store.add_opt_out(OptOutRow(resource_id="R3", window_start=T0, window_end=T0 + timedelta(hours=1)))
    store.add_opt_out(OptOutRow(resource_id="R4", window_start=T0 - timedelta(hours=2), window_end=T0))
    assert [o.resource_id for o in store.opt_outs(unacknowledged=True)] == ["R1", "R3", "R4"]
    assert store.opt_outs("E1")[0].opt_reason == "overrideStatus"
    assert [w.resource_id for w in store.availability_windows(T0)] == ["R3"]


async def test_webhooks_stored_in_one_commit_are_replayed_in_the_order_edrv_made_them(store):
    from dr_bridge.journal import Journal
    journal = Journal(store)
    hooks = [("W-online", T0 + timedelta(seconds=2)), ("W-none", None), ("W-offline", T0 + timedelta(seconds=1))]
    await journal.write(*(("webhook", dict(id=wid, type="chargestation.x", created_at=at, body="{}"), {})
                          for wid, at in hooks))
    assert [w.id for w in store.unprocessed_webhooks()] == ["W-offline", "W-online", "W-none"]
