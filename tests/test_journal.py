"""Group commit (journal.py): concurrent writers share transactions, each still waits for its own commit,
order is kept, and one bad write fails only its own writer."""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from dr_bridge import journal as journal_module
from dr_bridge.journal import Journal
from dr_bridge.store import ActionRow, ReadingRow, SessionState, Store, WebhookRow


def action(session_id: str) -> dict:
    return dict(session_id=session_id, chargestation_id="C1", resource_id="r", kind="set_power_limit",
                purpose="limit", unit="current", limit=16)


async def test_concurrent_writes_share_commits_and_are_durable_when_awaited(db_url):
    store = Store.open(db_url, bridge="b")
    batches: list[int] = []
    journal = Journal(store)
    write_batch = journal.write_batch
    journal.write_batch = lambda writes: batches.append(len(writes)) or write_batch(writes)

    async def one(i: int) -> None:
        sid = f"S{i:03d}"
        state = {"chargestation_id": "C1", "resource_id": "r", "limited": True}
        (_, action_id) = await journal.write(("state", sid, state), ("add_action", action(sid), {}))
        assert action_id is not None and store.get_session_state(sid).limited  # committed before we go on
        await journal.write(("update_action", action_id, {"status": "requested", "attempts": 1}))

    await asyncio.gather(*(one(i) for i in range(64)))
    await journal.flush()
    assert sum(batches) == 64 * 3 and len(batches) < 64 * 2  # shared transactions, not one per write
    actions = store.actions()
    assert {a.status for a in actions} == {"requested"} and len(actions) == 64
    assert {(a.bridge, a.kind, a.unit, a.limit, a.attempts) for a in actions} == {
        ("b", "set_power_limit", "current", 16, 1)}
    assert all(a.updated_at >= a.at for a in actions)
    assert len(store.session_states(limited_only=True)) == 64
    store.close()


async def test_the_first_writers_of_a_burst_are_committed_first_in_a_small_batch(db_url):
    """At an interval start every session's write arrives at once; the first calls must not wait for all."""
    store = Store.open(db_url, bridge="b")
    batches: list[int] = []
    journal = Journal(store, max_batch=500, first_batch=32)
    write_batch = journal.write_batch
    journal.write_batch = lambda writes: batches.append(len(writes)) or write_batch(writes)
    done: list[int] = []

    async def one(i: int) -> None:
        await journal.write(("add_action", action(f"S{i:04d}"), {}))
        done.append(i)

    await asyncio.gather(*(one(i) for i in range(1200)))
    assert batches == [32, 64, 128, 256, 500, 220]  # doubling up to the largest batch
    assert sorted(done[:32]) == list(range(32))  # the first 32 heard of their commit before anyone else
    assert [a.session_id for a in store.actions()] == [f"S{i:04d}" for i in range(1200)]
    store.close()


async def test_a_bad_write_fails_only_its_writer(db_url):
    store = Store.open(db_url, bridge="b")
    journal = Journal(store)
    good = journal.write(("add_action", action("S1"), {}))
    bad = journal.write(("nonsense", None, {}))
    results = await asyncio.gather(good, bad, return_exceptions=True)
    assert isinstance(results[0][0], int) and isinstance(results[1], ValueError)
    assert [a.session_id for a in store.actions()] == ["S1"]
    store.close()


async def test_a_partial_state_write_changes_only_its_fields(db_url):
    store = Store.open(db_url, bridge="b")
    journal = Journal(store)
    await journal.write(("state", "S1", {"chargestation_id": "C1", "resource_id": "r", "event_id": "E1",
                                         "limited": True, "unit": "current", "limit": 16}))
    await journal.write(("state", "S1", {"limited": False}))
    state = store.get_session_state("S1")
    assert (state.chargestation_id, state.resource_id, state.event_id, state.limited, state.unit, state.limit) == (
        "C1", "r", "E1", False, "current", 16)
    assert Store.open(db_url, bridge="other").get_session_state("S1") is None  # keyed by bridge
    store.close()


def test_a_batch_writing_one_row_twice_keeps_the_order(db_url):
    store = Store.open(db_url, bridge="b")
    ids = Journal(store).write_batch([("state", "S1", {"chargestation_id": "C1", "resource_id": "r", "limited": True}),
                             ("add_action", action("S1"), {}), ("add_action", action("S2"), {}),
                             ("state", "S2", {"chargestation_id": "C1", "resource_id": "r", "limited": True}),
                             ("state", "S1", {"limited": False})])
    assert ids[0] is None and ids[1] < ids[2] and ids[3:] == [None, None]
    assert not store.get_session_state("S1").limited and store.get_session_state("S2").limited
    assert [a.session_id for a in store.actions()] == ["S1", "S2"]
    store.close()


async def test_webhooks_are_stored_once_however_often_delivered_and_readings_follow(db_url):
    store = Store.open(db_url, bridge="b")
    journal = Journal(store)

    def hook(wid: str) -> tuple:
        return ("webhook", dict(id=wid, type="session.updated", created_at=None, body=f'{{"_id": "{wid}"}}'), {})

    reading = ("reading", dict(at=datetime(2026, 12, 1, tzinfo=timezone.utc), session_id="S1",
                               chargestation_id="C1", power_kw=7.4, current_a=None), {})
    first = await asyncio.gather(journal.write(hook("W1")), journal.write(hook("W2"), reading),
                                 journal.write(hook("W1")))  # a second delivery in the same batch
    again = await journal.write(hook("W2"))  # and one in a later batch
    assert [r[0] for r in first] == [True, True, False] and again == [False]
    assert Store.open(db_url, bridge="other").unprocessed_webhooks() == []  # each bridge its own copy
    assert sorted(w.id for w in store.unprocessed_webhooks()) == ["W1", "W2"]
    journal.submit(("webhook_processed", "W1", {}))
    await journal.flush()
    assert [w.id for w in store.unprocessed_webhooks()] == ["W2"]
    assert [(r.session_id, r.power_kw) for r in store.readings()] == [("S1", 7.4)]
    store.close()


def test_rows_are_stored_exactly_as_sqlalchemy_stores_them(db_url):
    """The journal hands rows to the driver itself; what lands must be what the ORM would have stored
    (defaults, NULLs, booleans, and datetimes in the dialect's own form), so the two kinds of rows sort,
    compare and read back alike."""
    orm, journal_store = Store.open(db_url, bridge="orm"), Store.open(db_url, bridge="journal")
    at = datetime(2026, 12, 1, 17, 0, 0, tzinfo=timezone(timedelta(hours=2)))  # whole seconds, not UTC
    a = dict(event_id="E1", at=at, session_id="S1", chargestation_id="C1", resource_id="r", kind="set_power_limit",
             purpose="limit", unit="current", limit=16.5)
    hook = dict(id="W1", type="session.updated", received_at=at, created_at=None, body="{}")
    reading = dict(at=at, session_id="S1", chargestation_id="C1", power_kw=7.4, current_a=None)
    orm.add_action(ActionRow(**a, updated_at=at))
    orm.add_webhook(WebhookRow(**hook))
    orm.add_reading(ReadingRow(**reading))
    with orm.session() as s:
        s.add(SessionState(bridge="orm", session_id="S1", chargestation_id="", resource_id="", ended=True,
                           updated_at=at))
        s.commit()
    Journal(journal_store).write_batch([("add_action", a, {}), ("webhook", hook, {}), ("reading", reading, {}),
                                        ("state", "S1", {"ended": True})])
    with orm.engine.connect() as conn:  # the stored values, as the driver reads them back
        for table, skip in (("actions", {"id", "updated_at"}), ("webhooks", set()), ("readings", {"id"}),
                            ("session_state", {"updated_at"})):
            rows = conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY bridge").mappings().all()
            stored = [{k: v for k, v in row.items() if k not in skip | {"bridge"}} for row in rows]
            assert [row["bridge"] for row in rows] == ["journal", "orm"], table
            assert stored[0] == stored[1], table
    orm.close()
    journal_store.close()


async def test_submitted_writes_wait_to_share_a_commit_but_not_past_the_lag_or_a_flush(db_url):
    """A call's answer, say, need not be committed at once: it goes with the next write() (which commits at
    once), or after lag_s at the latest, or at a flush (a stop)."""
    store = Store.open(db_url, bridge="b")
    batches: list[list[str]] = []
    journal = Journal(store, lag_s=0.4)
    write_batch = journal.write_batch
    journal.write_batch = lambda writes: batches.append([k["session_id"] for _, k, _ in writes]) or write_batch(writes)

    first, second = journal.submit(("add_action", action("S1"), {})), journal.submit(("add_action", action("S2"), {}))
    await asyncio.sleep(0.1)
    assert not first.done() and batches == [] and store.actions() == []  # waiting for company
    await journal.write(("add_action", action("S3"), {}))
    assert first.done() and second.done() and batches == [["S1", "S2", "S3"]]  # all in the write's commit

    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(journal.submit(("add_action", action("S4"), {})), 5)
    assert asyncio.get_running_loop().time() - started >= 0.35 and batches[1:] == [["S4"]]  # on its own after lag_s

    last = journal.submit(("add_action", action("S5"), {}))
    started = asyncio.get_running_loop().time()
    await journal.flush()
    assert last.done() and asyncio.get_running_loop().time() - started < 0.3 and batches[2:] == [["S5"]]
    assert [a.session_id for a in store.actions()] == ["S1", "S2", "S3", "S4", "S5"]
    store.close()


def test_each_new_action_id_names_its_own_row_however_the_inserts_are_split(db_url, monkeypatch):
    """SQLite's ids are worked out from the last row a statement inserted: each must still be its own row's,
    across statements and beside another bridge's rows."""
    monkeypatch.setattr(journal_module, "SQLITE_ROWS_PER_INSERT", 7)
    store, other = Store.open(db_url, bridge="b"), Store.open(db_url, bridge="other")
    journal = Journal(store)
    ids = journal.write_batch([("add_action", action(f"S{i:02d}"), {}) for i in range(20)])
    Journal(other).write_batch([("add_action", action("X"), {})])
    ids += journal.write_batch([("state", "S99", {"limited": True}), ("add_action", action("S20"), {})])[1:]
    assert len(set(ids)) == 21
    by_id = {a.id: a.session_id for a in store.actions()}
    assert [by_id[i] for i in ids] == [f"S{i:02d}" for i in range(21)]
    store.close()
    other.close()


async def test_a_submitted_write_outlives_a_database_outage_and_keeps_its_order(pg_url):
    """A call's answer is submitted, not awaited: nobody would hear that its commit failed. Lost in a
    failover, the action stayed 'planned' without eDRV's action id (the charger's answer could no longer be
    matched, and the next start marked the call failed), though eDRV had taken it."""
    from tests.conftest import PG_ADMIN_URL
    from tests.test_faults import _cut_connections

    name = pg_url.rsplit("/", 1)[-1]
    store = Store.open(pg_url, bridge="b")
    journal = Journal(store)
    (action_id,) = await journal.write(("add_action", action("S1"), {}))
    _cut_connections(PG_ADMIN_URL, name, allow=False)
    try:
        requested = journal.submit(("update_action", action_id, {"status": "requested", "edrv_action_id": "A-1"}))
        accepted = journal.submit(("update_action", action_id, {"status": "accepted"}))  # the charger's, later
        await asyncio.sleep(1.0)
        assert not requested.done() and not accepted.done()  # kept, not given up
    finally:
        _cut_connections(PG_ADMIN_URL, name, allow=True)
    await asyncio.wait_for(journal.flush(), 30)
    assert requested.result() is not None and accepted.done() and accepted.exception() is None
    (row,) = store.actions()
    assert (row.status, row.edrv_action_id) == ("accepted", "A-1")  # in the order they were submitted
    store.close()
