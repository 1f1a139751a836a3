"""Limits recorded ahead of an interval start (Dispatcher.arm), with the real openleadr VTN and the eDRV
simulator over loopback: sent only when the pass at the boundary wants them, and otherwise let go with no
call and no session left marked limited."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from dr_bridge.daemon import Bridge
from dr_bridge.dispatch import Desired, Dispatcher
from dr_bridge.domain import Limit
from dr_bridge.edrv.client import EdrvClient
from dr_bridge.engine import PREFETCH_S
from dr_bridge.journal import Journal
from dr_bridge.rig import API_KEY, Rig, StationSpec, wait_for
from dr_bridge.store import Store


def soon(seconds: float) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=seconds)


@pytest.fixture
async def rig(tmp_path):
    r = Rig(tmp_path, [StationSpec("A"), StationSpec("B", sessions=2)])
    await r.start(webhooks=True)  # a session's start and end reach the bridge between arming and the start
    yield r
    await r.stop()


@pytest.fixture
async def bridge(rig):
    b = await rig.started_bridge()
    yield b
    await b.stop()


def sessions(rig: Rig) -> set[str]:
    return set(rig.sessions["A"]) | set(rig.sessions["B"])


def limited(bridge: Bridge) -> set[str]:
    return {s.session_id for s in bridge.store.session_states(limited_only=True)}


async def armed(rig: Rig, bridge: Bridge, start: datetime) -> list:
    """Wait until every session's limit is recorded ahead of the start; those rows."""
    await wait_for(lambda: len([a for a in bridge.store.actions() if a.status == "planned"]) == 3, PREFETCH_S + 5)
    assert datetime.now(timezone.utc) < start - timedelta(seconds=1)  # armed well ahead, not at the start
    return bridge.store.actions()


async def test_limits_recorded_ahead_go_out_at_the_interval_start_on_the_same_rows(rig, bridge):
    start = soon(PREFETCH_S + 3)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(start, timedelta(seconds=60), 2)])
    ahead = await armed(rig, bridge, start)
    # Before the start: rows and durable state in the event log, nothing sent.
    assert {(a.session_id, a.kind, a.limit, a.event_id) for a in ahead} == \
        {(sid, "set_power_limit", 16 if sid in rig.sessions["A"] else 8, event_id) for sid in sessions(rig)}
    assert limited(bridge) == sessions(rig)
    assert rig.sim.limit_calls() == []

    await wait_for(lambda: len(rig.sim.limit_calls()) == 3, 10)
    sent = {r.path.split("/")[-2]: r.at for r in rig.sim.requests if r.path.endswith("/set_power_limit")}
    assert min(sent.values()) >= start.timestamp()  # not a moment early
    await bridge.engine.settle()
    rows = bridge.store.actions(event_id)
    assert [a.id for a in rows] == [a.id for a in ahead]  # the armed rows themselves: no second row per call
    assert {a.status for a in rows} == {"requested"}
    for a in rows:  # each row's time is its call's, not the moment it was armed
        assert start <= a.at <= datetime.fromtimestamp(sent[a.session_id], timezone.utc) + timedelta(seconds=1)


async def test_an_event_cancelled_before_its_start_sends_nothing_and_leaves_no_session_marked_limited(rig, bridge):
    start = soon(PREFETCH_S + 3)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(start, timedelta(seconds=60), 2)])
    await armed(rig, bridge, start)
    rig.vtn.cancel_event(event_id)
    await wait_for(lambda: {a.status for a in bridge.store.actions(event_id)} == {"skipped"}, 10)
    assert {a.detail for a in bridge.store.actions(event_id)} == {"armed, not sent: event %s changed" % event_id}
    await wait_for(lambda: datetime.now(timezone.utc) > start + timedelta(seconds=2), 15)
    await bridge.engine.settle()
    assert rig.sim.limit_calls() == []  # neither the limit nor a restore of one never sent
    assert limited(bridge) == set()


@pytest.mark.slow  # the default suite keeps to its time budget; CI runs this marker too
async def test_a_session_ending_before_the_start_and_one_joining_its_station_are_planned_afresh(rig, bridge):
    start = soon(PREFETCH_S + 3)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(start, timedelta(seconds=60), 2)])
    ahead = await armed(rig, bridge, start)
    gone, kept = rig.sessions["B"]
    rig.sim.end_session(gone)  # its webhook lets it go at once
    joined = rig.sim.start_session(rig.station_ids["A"])  # A's budget is shared by two now
    await wait_for(lambda: len(rig.sim.limit_calls()) == 3, 15)
    await bridge.engine.settle()
    assert sorted((sid, body["limit"]) for sid, _, body in rig.sim.limit_calls()) == sorted(
        [(rig.sessions["A"][0], 8), (joined, 8), (kept, 16)])
    by_id = {a.id: a for a in bridge.store.actions(event_id)}
    first_a = next(a for a in ahead if a.session_id == rig.sessions["A"][0])
    assert (by_id[first_a.id].status, by_id[first_a.id].detail) == ("skipped", "armed, not sent: superseded before "
                                                                                "it was sent")
    gone_row = next(a for a in ahead if a.session_id == gone)
    assert (by_id[gone_row.id].status, by_id[gone_row.id].detail) == ("skipped", "armed, not sent: the session ended")
    assert limited(bridge) == {rig.sessions["A"][0], joined, kept}


@pytest.mark.slow
async def test_a_bridge_stopping_before_the_start_leaves_no_session_marked_limited(rig):
    bridge = await rig.started_bridge()
    start = soon(PREFETCH_S + 3)
    event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(start, timedelta(seconds=60), 2)])
    await armed(rig, bridge, start)
    await bridge.stop()
    assert limited(bridge) == set()
    assert {(a.status, a.detail) for a in bridge.store.actions(event_id)} == {
        ("skipped", "armed, not sent: the bridge stopped")}
    assert rig.sim.limit_calls() == []


async def test_a_restore_sent_again_to_an_armed_session_keeps_it_marked_limited(rig, tmp_path):
    """A restore from before a restart that the charger refused is sent again (Engine._restore_again: the
    session is marked limited, then the restore is wanted). If that session was armed meanwhile, its lapse
    must not mark it unlimited behind the restore's back: a restart would never lift the old limit."""
    store = Store.open(f"sqlite:///{tmp_path / 'armed.db'}", bridge="t")
    journal = Journal(store)
    station = next(s for s in rig.config().stations() if s.resource_id == "A")
    session = rig.sessions["A"][0]
    rig.sim.faults.latency_s = 30.0  # the restore stays in flight while the event log is read
    async with EdrvClient(rig.sim.base_url, API_KEY, max_retries=0) as client:
        dispatcher = Dispatcher(client, store, journal=journal)
        assert dispatcher.arm([(session, station, Desired("limit", Limit("current", 16), "E2"))], 60) == 1
        await wait_for(lambda: [a.status for a in store.actions()] == ["planned"], 5)
        journal.submit(("state", session, {"limited": True}))
        dispatcher.want(session, station, Desired("restore", event_id="E1"))
        await journal.flush()
        await wait_for(lambda: any(a.purpose == "restore" for a in store.actions()), 5)  # the restore is on its way
        await journal.flush()
        assert store.get_session_state(session).limited
        assert [(a.purpose, a.status, a.detail) for a in store.actions()][0] == (
            "limit", "skipped", "armed, not sent: superseded before it was sent")
        rig.sim.faults.latency_s = 0.0
        await dispatcher.stop()
    store.close()
