"""Several bridges on one database (one per utility program): rows keyed by VEN, stations claimed once
unless both bridges share them, and a shared station held to the strictest wish of either."""
from __future__ import annotations

import asyncio
import copy
import os
import sys
from datetime import datetime, timedelta, timezone

import pytest
from rich.console import Console

from dr_bridge.config import config_from_dict
from dr_bridge.daemon import Bridge, StationConflict
from dr_bridge.domain import Limit
from dr_bridge.policy import to_watts
from dr_bridge.release import release_all
from dr_bridge.rig import API_KEY, Rig, StationSpec, wait_for
from dr_bridge.store import EventRow, Store, WebhookRow

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


def test_rows_are_kept_apart_per_bridge(db_url):
    a, b = Store.open(db_url, bridge="utility-a"), Store.open(db_url, bridge="utility-b")
    try:
        # Two utilities may well use the same event id; one eDRV account sends each bridge the same webhook.
        for store, mod in ((a, 0), (b, 3)):
            store.save_event(EventRow(event_id="E1", modification_number=mod, start=T0, effective_start=T0))
            assert store.add_webhook(WebhookRow(id="W1", type="session.started", body="{}"))
            store.save_session_state("S1", chargestation_id="C1", resource_id="r", limited=store is a)
            store.save_ven_state(f"ven-{mod}", None, "https://vtn")
        assert a.get_event("E1").modification_number == 0 and b.get_event("E1").modification_number == 3
        assert [e.event_id for e in a.events()] == ["E1"] and len(b.events()) == 1
        assert not a.add_webhook(WebhookRow(id="W1", type="session.started", body="{}"))  # a duplicate for a
        assert [s.session_id for s in a.session_states(limited_only=True)] == ["S1"]
        assert b.session_states(limited_only=True) == []
        assert (a.ven_state().ven_id, b.ven_state().ven_id) == ("ven-0", "ven-3")
    finally:
        a.close()
        b.close()


def test_rows_from_before_bridges_were_told_apart_go_to_the_first_named_bridge(db_url):
    legacy = Store.open(db_url)  # scope '': what a database of the previous schema holds after the upgrade
    legacy.save_event(EventRow(event_id="OLD", start=T0, effective_start=T0))
    legacy.save_session_state("S1", chargestation_id="C1", resource_id="r", limited=True)
    legacy.save_ven_state("ven-old", "reg", "https://vtn")
    legacy.close()
    first = Store.open(db_url, bridge="utility-a")
    second = Store.open(db_url, bridge="utility-b")
    try:
        assert first.get_event("OLD") is not None and first.ven_state().ven_id == "ven-old"
        assert [s.session_id for s in first.session_states(limited_only=True)] == ["S1"]
        assert second.get_event("OLD") is None and second.ven_state().ven_id is None
    finally:
        first.close()
        second.close()


def test_rows_from_before_bridges_were_told_apart_go_to_the_bridge_of_their_vtn(db_url):
    """Upgraded, then bridge B's `events list` run first: B took A's VEN id and A's limited sessions, which A
    then never restored. The rows record the VTN they came from, and only that VTN's bridge takes them."""
    legacy = Store.open(db_url)
    legacy.save_session_state("S1", chargestation_id="C1", resource_id="r", limited=True)
    legacy.save_ven_state("ven-a", "reg", "https://vtn-a.example/OpenADR2/Simple/2.0b")
    legacy.close()
    b = Store.open(db_url, bridge="utility-b", vtn_url="https://vtn-b.example/OpenADR2/Simple/2.0b")
    b.save_ven_state("ven-b", "reg-b", "https://vtn-b.example/OpenADR2/Simple/2.0b")  # and B even ran
    a = Store.open(db_url, bridge="utility-a", vtn_url="https://vtn-a.example/OpenADR2/Simple/2.0b/")
    try:
        assert b.ven_state().ven_id == "ven-b" and b.session_states(limited_only=True) == []
        assert a.ven_state().ven_id == "ven-a"
        assert [s.session_id for s in a.session_states(limited_only=True)] == ["S1"]
    finally:
        a.close()
        b.close()


def test_a_station_is_claimed_once_unless_both_share_it(db_url):
    a, b = Store.open(db_url, bridge="utility-a"), Store.open(db_url, bridge="utility-b")
    try:
        assert a.claim_stations([("C1", "r1", False), ("C2", "r2", True)]) == []
        conflicts = b.claim_stations([("C1", "r1", True), ("C3", "r3", False)])
        assert [(c.chargestation_id, c.bridge) for c in conflicts] == [("C1", "utility-a")]
        assert b.claim_stations([("C2", "r2", False)])[0].bridge == "utility-a"  # a must share it, and b too
        assert b.claim_stations([("C2", "r2", True), ("C3", "r3", False)]) == []
        # A bridge that drops a station from its config frees it at its next start.
        assert a.claim_stations([("C2", "r2", True)]) == []
        assert b.claim_stations([("C1", "r1", False), ("C2", "r2", True)]) == []
    finally:
        a.close()
        b.close()


# --- two real bridges on the real PostgreSQL -------------------------------------------------------------

@pytest.fixture
async def rig(tmp_path, pg_url):
    r = Rig(tmp_path, [StationSpec("SHARED", sessions=1), StationSpec("ONLY-A"), StationSpec("ONLY-B")],
            bridge_options={"database_url": pg_url})
    await r.start()
    yield r
    await r.stop()


def bridge_config(rig: Rig, name: str, resources: list[str], shared: bool = False) -> dict:
    d = copy.deepcopy(rig.config_dict())
    d["vtn"]["ven_name"] = name
    by_resource = {st["resource_id"]: st for st in d["chargestations"]}
    d["chargestations"] = [dict(by_resource[r], **({"shared": True} if shared and r == "SHARED" else {}))
                           for r in resources]
    return d


async def sharing_bridges(rig: Rig) -> tuple[Bridge, Bridge]:
    """Bridges utility-a and utility-b, both with SHARED marked shared and one station of their own, started
    and registered with the VTN."""
    a, b = (Bridge(config_from_dict(bridge_config(rig, f"utility-{x}", ["SHARED", f"ONLY-{x.upper()}"],
                                                  shared=True), source=x), API_KEY, vtn_backoff_s=0.2, http=False)
            for x in "ab")
    await a.start()
    await b.start()
    try:
        await wait_for(lambda: a.ven.registered and b.ven.registered, 20)
    except BaseException:
        await a.stop()
        await b.stop()
        raise
    return a, b


def soon(seconds: float) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=seconds)


async def test_a_second_bridge_configuring_a_taken_station_is_refused_with_exit_2(rig, tmp_path):
    a = Bridge(config_from_dict(bridge_config(rig, "utility-a", ["SHARED", "ONLY-A"]), source="a.toml"),
               API_KEY, vtn_backoff_s=0.2, http=False)
    await a.start()
    try:
        path = rig.write_config(tmp_path / "b.toml", bridge_config(rig, "utility-b", ["ONLY-B", "SHARED"]))
        env = dict(os.environ, DR_BRIDGE_RIG_KEY=API_KEY)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from dr_bridge.cli import main; main()", "run", "--config", str(path), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        lines = stderr.decode().strip().splitlines()
        assert proc.returncode == 2, lines
        assert len(lines) == 1 and "chargestations[1]" in lines[0] and "'utility-a'" in lines[0], lines
        assert rig.station_ids["SHARED"] in lines[0] and "shared = true" in lines[0]
        # In process the same: nothing started, nothing claimed.
        b = Bridge(config_from_dict(bridge_config(rig, "utility-b", ["SHARED"], shared=True), source="b"), API_KEY, http=False)
        with pytest.raises(StationConflict):
            await b.start()  # only b says shared
        await b.client.aclose()
        b.store.close()
    finally:
        await a.stop()


async def test_a_shared_station_holds_the_strictest_wish_and_is_restored_when_both_events_end(rig):
    a, b = await sharing_bridges(rig)
    try:
        assert a.ven.ven_id != b.ven.ven_id
        start = soon(3)
        # Utility B asks for level 1 (24 A) for 9 s; utility A for level 2 (16 A) for the first 4 s.
        ev_b = rig.vtn.add_event(b.ven.ven_id, intervals=[(start, timedelta(seconds=9), 1)],
                                 targets=[{"resource_id": "SHARED"}])
        ev_a = rig.vtn.add_event(a.ven.ven_id, intervals=[(start, timedelta(seconds=4), 2)],
                                 targets=[{"resource_id": "SHARED"}])
        session = rig.sessions["SHARED"][0]

        def limits():
            return [(k, body.get("limit")) for sid, k, body in rig.sim.limit_calls() if sid == session]

        await wait_for(lambda: rig.sim.session_limit(session) == 16, 15)
        at_a_end = start + timedelta(seconds=4)
        await wait_for(lambda: datetime.now(timezone.utc) > at_a_end + timedelta(seconds=2), 15)
        # A's event is over but B's goes on: the session holds B's 24 A, never cleared in between.
        assert rig.sim.session_limit(session) == 24, limits()
        assert ("clear_power_limit", None) not in limits()
        await wait_for(lambda: limits() and limits()[-1][0] == "clear_power_limit", 20)
        await a.engine.settle()
        await b.engine.settle()
        final = limits()
        assert max(i for i, c in enumerate(final) if c[0] == "set_power_limit") < final.index(
            ("clear_power_limit", None)), final
        await wait_for(lambda: rig.sim.session_limit(session) is None, 5)  # the EV follows after its delay
        # Both bridges may send the same limit; only these values, in current as the station is limited in.
        assert {c for c in final if c[0] == "set_power_limit"} == {("set_power_limit", 16), ("set_power_limit", 24)}
        # Each bridge's event log has its own event only, and neither is left holding the session.
        assert [e.event_id for e in a.store.events()] == [ev_a] and [e.event_id for e in b.store.events()] == [ev_b]
        assert a.store.session_states(limited_only=True) == [] == b.store.session_states(limited_only=True)
        others = set(rig.sessions["ONLY-A"] + rig.sessions["ONLY-B"])
        assert [c for c in rig.sim.limit_calls() if c[0] in others] == []
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.slow  # waits out the other bridge's event
async def test_releasing_one_bridge_hands_a_shared_session_to_the_other_bridges_wish(rig, tmp_path):
    """release-all (and --restore-on-exit) on bridge A must not clear a shared station that bridge B still
    wants limited: B believes eDRV holds its limit and would never send it again, so its event would run
    unlimited. A sends B's share instead, withdraws its own wish, and restores once B's wish has lapsed."""
    a, b = await sharing_bridges(rig)
    try:
        start = soon(3)
        ev_b = rig.vtn.add_event(b.ven.ven_id, intervals=[(start, timedelta(seconds=12), 1)],  # 24 A
                                 targets=[{"resource_id": "SHARED"}])
        rig.vtn.add_event(a.ven.ven_id, intervals=[(start, timedelta(seconds=60), 2)],  # 16 A
                          targets=[{"resource_id": "SHARED"}])
        session = rig.sessions["SHARED"][0]
        await wait_for(lambda: rig.sim.session_limit(session) == 16, 15)
        await a.stop()  # the operator stops A mid-event, then releases what it limits
        before = len(rig.sim.limit_calls())

        console = Console(record=True, width=200)
        left = await release_all(a.cfg, API_KEY, console)
        assert left == [session]
        calls = [(k, body.get("limit")) for sid, k, body in rig.sim.limit_calls()[before:] if sid == session]
        assert calls == [("set_power_limit", 24)], calls  # B's wish, in current as the station is limited in
        await wait_for(lambda: rig.sim.session_limit(session) == 24, 5)  # the EV follows after its delay
        assert f"STILL LIMITED for bridge utility-b (event {ev_b}, until" in console.export_text()
        state = a.store.get_session_state(session)
        assert state.limited and state.event_id == ev_b and (state.unit, state.limit) == ("current", 24)
        assert [w.bridge for w in b.store.others_shared_limits([rig.station_ids["SHARED"]], soon(0))] == []

        # B's event ends: B restores the session itself; once B's wish has lapsed A's release restores too.
        await wait_for(lambda: rig.sim.session_limit(session) is None, 25)
        assert await release_all(a.cfg, API_KEY, Console(record=True)) == []
        assert not a.store.get_session_state(session).limited
    finally:
        await b.stop()


async def test_a_wish_published_while_the_other_bridge_was_planning_is_honoured_within_seconds(rig):
    # Both bridges plan at the same boundary; B's pass ran before A's wish was in the database, and B's
    # looser limit reached eDRV last. B must look again on its own, not wait for its next reconcile (60 s).
    b = Bridge(config_from_dict(bridge_config(rig, "utility-b", ["SHARED", "ONLY-B"], shared=True), source="b"),
               API_KEY, vtn_backoff_s=0.2, http=False)
    a = Store.open(b.store.engine.url.render_as_string(hide_password=False), migrate=False, bridge="utility-a")
    await b.start()
    try:
        await wait_for(lambda: b.ven.registered, 20)
        session = rig.sessions["SHARED"][0]
        start = soon(3)
        rig.vtn.add_event(b.ven.ven_id, intervals=[(start, timedelta(seconds=30), 1)],
                          targets=[{"resource_id": "SHARED"}])
        await wait_for(lambda: [c[2].get("limit") for c in rig.sim.limit_calls() if c[0] == session] == [24], 15)
        station = b.engine.fleet.stations[rig.station_ids["SHARED"]]
        wish = (to_watts(Limit("current", 16), station), "EV-A", start + timedelta(seconds=30))
        a.set_shared_limits({station.id: wish})
        await wait_for(lambda: rig.sim.session_limit(session) == 16, 5)
    finally:
        await b.stop()
        a.close()


def test_a_retired_bridge_frees_its_stations_once_it_owes_nothing(db_url, tmp_path):
    """`dr-bridge retire`: refused while the bridge still limits a session or owes an opted-in event; then its
    claims go (so another bridge may take the station) and its event log stays."""
    from typer.testing import CliRunner

    from dr_bridge.cli import app

    path = tmp_path / "a.toml"
    path.write_text(f'[bridge]\ndatabase_url = "{db_url}"\n[vtn]\nurl = "http://127.0.0.1:9/OpenADR2/Simple/2.0b"\n'
                    f'ven_name = "utility-a"\n[levels]\n1 = {{ fraction = 0.5 }}\n'
                    f'[[chargestations]]\nid = "C1"\nmax_current = 32\n')
    a, b = Store.open(db_url, bridge="utility-a"), Store.open(db_url, bridge="utility-b")
    runner = CliRunner()
    try:
        assert a.claim_stations([("C1", "r1", False)]) == []
        a.save_session_state("S1", chargestation_id="C1", resource_id="r1", limited=True)
        a.save_event(EventRow(event_id="E1", start=T0, effective_start=T0, status="active", opt="optIn"))

        out = runner.invoke(app, ["retire", "--config", str(path)])
        assert out.exit_code == 1 and "still limits 1 session(s) (e.g. S1)" in out.output, out.output
        assert "release-all" in out.output
        a.save_session_state("S1", limited=False)
        out = runner.invoke(app, ["retire", "--config", str(path)])
        assert out.exit_code == 1 and "opted in to event(s) not yet over: E1" in out.output, out.output
        assert [c.bridge for c in b.claim_stations([("C1", "r1", False)])] == ["utility-a"]  # still a's

        event = a.get_event("E1")
        event.status = "completed"
        a.save_event(event, [])
        out = runner.invoke(app, ["retire", "--config", str(path)])
        assert out.exit_code == 0 and "released 1 station(s) (C1)" in out.stdout, out.output
        assert b.claim_stations([("C1", "r1", False)]) == []  # now b may have it
        assert a.get_event("E1").status == "completed"  # the event log stays for review
        assert "nothing to release" in runner.invoke(app, ["retire", "--config", str(path)]).stdout
    finally:
        a.close()
        b.close()


async def test_a_shared_station_on_sqlite_is_limited_and_its_wish_names_the_event(tmp_path):
    r = Rig(tmp_path, [StationSpec("SHARED", sessions=1)])  # the default event log: SQLite
    await r.start()
    try:
        d = copy.deepcopy(r.config_dict())
        d["chargestations"][0]["shared"] = True
        b = Bridge(config_from_dict(d, source="shared"), API_KEY, vtn_backoff_s=0.2, http=False)
        await b.start()
        try:
            await wait_for(lambda: b.ven.registered, 15)
            event_id = r.vtn.add_event(b.ven.ven_id, intervals=[(soon(2), timedelta(seconds=30), 2)])
            session = r.sessions["SHARED"][0]
            await wait_for(lambda: r.sim.session_limit(session) == 16, 15)
            from sqlmodel import select

            from dr_bridge.store import SharedLimit
            with b.store.session() as s:
                wishes = [(w.chargestation_id, w.event_id) for w in s.exec(select(SharedLimit))]
            assert wishes == [(r.station_ids["SHARED"], event_id)]
        finally:
            await b.stop()
    finally:
        await r.stop()
