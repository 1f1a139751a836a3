"""Fault injection (`pytest -m faults`): eDRV errors, 429 storms, latency and timeouts, a VTN restart, the
database going away, and SIGKILL at random points of a 200-session event.

Events are compressed to seconds. Every run ends with the same check: each session received its planned limit
(answered 2xx by eDRV) and, after the end, its restore was the last call and the EV is unlimited again.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from dr_bridge.daemon import Bridge
from dr_bridge.health import Reason
from dr_bridge.rig import Rig, StationSpec, wait_for
from tests.test_restart import spawn, until  # noqa: F401  (spawn is a fixture)

pytestmark = pytest.mark.faults

LEVEL2 = 16  # level 2 = half of 32 A; the rig's stations have one session each unless said otherwise


@dataclass
class Tally:
    """What the suite checked; tests/conftest.py prints it at the end of the run."""

    runs: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    sessions: int = 0

    def add(self, fault: str, sessions: int) -> None:
        self.runs += 1
        self.faults[fault] = self.faults.get(fault, 0) + 1
        self.sessions += sessions

    def summary(self) -> str:
        faults = ", ".join(f"{k}: {v}" for k, v in sorted(self.faults.items()))
        return f"fault injection: {self.runs} runs, {self.sessions} sessions checked ({faults})"


TALLY = Tally()
# Events here last seconds, not hours: retries are compressed with them (the first re-send after 0.25 s,
# not 1 s), so three failed calls in a row do not outlast the event.
COMPRESSED = {"limit_retries": 5, "retry_backoff_s": 0.25}


def soon(seconds: float) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=seconds)


def stations(n: int, per_station: int = 1) -> list[StationSpec]:
    """Half physical, half simulator stations, so both restore paths are exercised."""
    return [StationSpec(f"R{i:03d}", simulator=bool(i % 2), sessions=per_station) for i in range(n)]


def planned_limit(rig: Rig, resource: str) -> float:
    spec = next(s for s in rig.stations if s.resource_id == resource)
    return spec.max_current / 2 / spec.sessions


def check_applied_and_restored(rig: Rig, fault: str, must_limit: bool = True) -> int:
    """Every session got its planned limit and then its restore, in that order; returns sessions checked.

    must_limit=False: the bridge may have been down for the whole event, so a session may have had no limit,
    but any limit it got was the planned one, and its last call was still the restore."""
    ok_calls: dict[str, list[tuple[str, dict]]] = {}
    for r in rig.sim.requests:
        parts = r.path.split("/")
        if r.method == "POST" and len(parts) == 5 and parts[4] in ("set_power_limit", "clear_power_limit") \
                and r.status is not None and 200 <= r.status < 300:
            ok_calls.setdefault(parts[3], []).append((parts[4], r.json or {}))
    checked = 0
    for spec in rig.stations:
        limit = planned_limit(rig, spec.resource_id)
        for sid in rig.sessions[spec.resource_id]:
            got = ok_calls.get(sid, [])
            wanted = ("set_power_limit", {"unit": "current", "limit": limit})
            if must_limit:
                assert wanted in got, f"{fault}: session {sid} on {spec.resource_id} never got {limit} A: {got}; " \
                    f"its calls: {history(rig, sid)}"
            limits = [c for c in got if c[0] == "set_power_limit" and c[1].get("limit") != spec.max_current]
            assert all(c == wanted for c in limits), f"{fault}: session {sid} got another limit: {got}"
            last = got[-1]
            restore = ("set_power_limit", {"unit": "current", "limit": spec.max_current})
            assert last == restore or (not spec.simulator and last == ("clear_power_limit", {})), \
                f"{fault}: session {sid} on {spec.resource_id} was not restored last: {got}"
            assert sid not in still_limited(rig), f"{fault}: session {sid} is still limited"
            checked += 1
    TALLY.add(fault, checked)
    return checked


def history(rig: Rig, session_id: str) -> list[tuple]:
    """(call, status, unix time) of every request about the session, for an assertion's message."""
    return [(r.path.rsplit("/", 1)[-1], r.status, round(r.at, 2)) for r in rig.sim.requests
            if f"/sessions/{session_id}/" in r.path]


def still_limited(rig: Rig) -> list[str]:
    """Unlimited means no limit, or the station's maximum (simulator stations, and physical ones whose kind
    could not be read: CONTRACT.md restores those with set_power_limit to max_current)."""
    return [sid for spec in rig.stations for sid in rig.sessions[spec.resource_id]
            if rig.sim.session_limit(sid) not in (None, spec.max_current)
            or (spec.simulator and rig.sim.session_limit(sid) is None)]


async def everyone_restored(rig: Rig, timeout: float) -> None:
    try:
        await wait_for(lambda: not still_limited(rig), timeout)
    except TimeoutError:
        left = still_limited(rig)
        calls = {sid: history(rig, sid) for sid in left[:3]}
        raise AssertionError(f"{len(left)} session(s) still limited after {timeout} s: {calls}") from None


async def run_event(rig: Rig, bridge: Bridge, length_s: float = 6) -> datetime:
    start = soon(2)
    rig.vtn.add_event(bridge.ven.ven_id, intervals=[(start, timedelta(seconds=length_s), 2)])
    return start + timedelta(seconds=length_s)


@pytest.fixture
async def rig(tmp_path, request):
    spec = getattr(request, "param", None) or {}
    r = Rig(tmp_path, spec.get("stations") or stations(20),
            bridge_options=spec.get("bridge", {}), edrv_options={**COMPRESSED, **spec.get("edrv", {})})
    await r.start()
    yield r
    await r.stop()


@pytest.fixture
async def bridge(rig):
    b = await rig.started_bridge()
    yield b
    await b.stop()


# --- eDRV misbehaving ------------------------------------------------------------------------------------

EDRV_FAULTS = {
    "eDRV answers 20% 5xx": dict(error_rate=0.2),
    "429 storm with Retry-After": dict(rate_limit_rate=0.5, retry_after_s=0.5),
    "2 s latency": dict(latency_s=2.0),
}


@pytest.mark.parametrize("fault", list(EDRV_FAULTS))
async def test_edrv_faults_still_limit_and_restore_everyone(rig, bridge, fault):
    rig.sim.faults.update(**EDRV_FAULTS[fault])
    await run_event(rig, bridge)
    await everyone_restored(rig, 60)
    await bridge.engine.settle()
    check_applied_and_restored(rig, fault)


@pytest.mark.parametrize("rig", [{"edrv": {"request_timeout_s": 1}}], indirect=True)
async def test_timeouts_then_recovery(rig, bridge):
    rig.sim.faults.update(latency_s=3.0)  # every call outlives the client's timeout
    end = await run_event(rig, bridge, length_s=8)
    await asyncio.sleep(4)
    rig.sim.faults.update(latency_s=0.0)  # eDRV recovers mid-event
    await wait_for(lambda: datetime.now(timezone.utc) > end, 20)
    await everyone_restored(rig, 60)
    await bridge.engine.settle()
    check_applied_and_restored(rig, "request timeouts")


# --- the VTN restarting ---------------------------------------------------------------------------------

async def test_vtn_restart_mid_event_keeps_the_limit_and_restores(rig, bridge):
    end = await run_event(rig, bridge, length_s=10)
    await wait_for(lambda: len(rig.sim.limit_calls()) >= len(rig.stations), 20)
    await rig.vtn.stop()
    await asyncio.sleep(3)
    # Still limited while the VTN is away: the event is ours to carry out.
    assert all(rig.sim.session_limit(s) == LEVEL2 for ids in rig.sessions.values() for s in ids)
    await rig.vtn.start()
    await wait_for(lambda: datetime.now(timezone.utc) > end, 20)
    await everyone_restored(rig, 30)
    check_applied_and_restored(rig, "VTN restart mid-event")


# --- SIGKILL at random points of a 200-session event -----------------------------------------------------

KILL_RUNS = 20
RESTART_S = timedelta(seconds=4)  # generous: start, migrate, register, list 200 sessions, send their limits


@pytest.mark.parametrize("run", range(KILL_RUNS))
async def test_sigkill_at_a_random_point_then_restart(tmp_path, spawn, run):
    rnd = random.Random(run)
    r = Rig(tmp_path, stations(100, per_station=2), edrv_options=COMPRESSED)
    await r.start()
    try:
        config = r.write_config(tmp_path / "dr-bridge.toml")
        first = await spawn("run", "--config", str(config))
        await until(lambda: r.vtn.registrations, 30, first, "registration")
        ven_id = r.vtn.registrations[0]["ven_id"]
        start, length = soon(3), 6
        end = start + timedelta(seconds=length)
        r.vtn.add_event(ven_id, intervals=[(start, timedelta(seconds=length), 2)])
        # Anywhere from just after the VTN queued the event to just after its end.
        kill_at = datetime.now(timezone.utc) + timedelta(seconds=rnd.uniform(0, (end - start).total_seconds() + 5))
        await until(lambda: datetime.now(timezone.utc) >= kill_at, 30, first, "the kill time")
        await first.sigkill()
        await asyncio.sleep(rnd.uniform(0, 2))
        second = await spawn("run", "--config", str(config))
        # A bridge that is up again with time to act must carry out the rest of the event; one that comes
        # back only near its end (a process start takes seconds here) owes nothing but the restores.
        must_limit = datetime.now(timezone.utc) + RESTART_S < end
        await until(lambda: datetime.now(timezone.utc) > end, 30, second, "the end of the event")
        await everyone_restored(r, 60)
        label = "SIGKILL at a random point" + ("" if must_limit else " (back only near the end)")
        checked = check_applied_and_restored(r, label, must_limit=must_limit)
        assert checked == 200
        assert second.alive
    finally:
        await r.stop()


# --- the database going away ----------------------------------------------------------------------------

def _cut_connections(admin_url: str, name: str, allow: bool) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if allow else "false"}')
        if not allow:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


@pytest.fixture
async def pg_rig(tmp_path, pg_url):
    r = Rig(tmp_path, stations(20), bridge_options={"database_url": pg_url}, edrv_options=COMPRESSED)
    await r.start()
    yield r
    await r.stop()


async def test_database_briefly_unavailable_mid_event_loses_nothing(pg_rig, pg_url):
    from tests.conftest import PG_ADMIN_URL

    rig, name = pg_rig, pg_url.rsplit("/", 1)[-1]
    bridge = await rig.started_bridge()
    try:
        start = soon(2)
        event_id = rig.vtn.add_event(bridge.ven.ven_id, intervals=[(start, timedelta(seconds=4), 2)])
        await wait_for(lambda: len(rig.sim.limit_calls()) >= 20, 20)
        _cut_connections(PG_ADMIN_URL, name, allow=False)
        # The end of the event and a session starting after it both fall in the outage window.
        await wait_for(lambda: datetime.now(timezone.utc) > start + timedelta(seconds=4.5), 10)
        newcomer = rig.sim.start_session(rig.station_ids["R000"], send_webhook=False)
        await asyncio.sleep(1)
        # The restores at the end could not be written: the bridge says so rather than looking healthy.
        await wait_for(lambda: Reason.DATABASE_UNREACHABLE in bridge.readiness.not_ready(), 10)
        async with httpx.AsyncClient(timeout=5) as http:
            ready = await http.get(f"http://127.0.0.1:{rig.http_port}/readyz")
        assert ready.status_code == 503 and "database unreachable" in [r["reason"] for r in ready.json()["not_ready"]]
        _cut_connections(PG_ADMIN_URL, name, allow=True)
        await wait_for(lambda: Reason.DATABASE_UNREACHABLE not in bridge.readiness.not_ready(), 30)
        await everyone_restored(rig, 60)
        await bridge.engine.settle()
        check_applied_and_restored(rig, "database briefly unavailable")
        # Nothing lost: every call eDRV answered is in the event log.
        logged = {(a.session_id, a.purpose) for a in bridge.store.actions(event_id)}
        for ids in rig.sessions.values():
            for sid in ids:
                assert {(sid, "limit"), (sid, "restore")} <= logged, sid
        assert bridge.store.get_event(event_id).status == "completed"
        assert [c for c in rig.sim.limit_calls() if c[0] == newcomer] == []  # the event had ended: never limited
    finally:
        await bridge.stop()

