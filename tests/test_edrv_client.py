"""EdrvClient against the eDRV simulator over loopback: real HTTP, no mocks."""
from __future__ import annotations

import json
import logging
import socket
import time
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dr_bridge.edrv.client import EdrvClient
from dr_bridge.edrv.errors import (EdrvAuthError, EdrvNotFound, EdrvRateLimited, EdrvRejected, EdrvServerError,
                                   EdrvTransportError)
from dr_bridge.edrv.models import Session, parse_energy_report
from dr_bridge.edrv.simulator import EdrvSimulator

KEY = "sim-key-7f3a9c"


@pytest.fixture
async def sim():
    simulator = EdrvSimulator(KEY, ev_delay_s=0.2, report_interval_s=0.2)
    await simulator.start()
    yield simulator
    await simulator.stop()


@pytest.fixture
async def client(sim):
    async with EdrvClient(sim.base_url, KEY, backoff_base_s=0.01, backoff_max_s=0.5) as edrv:
        yield edrv


def _posts(sim: EdrvSimulator, session_id: str) -> list[int | None]:
    return [r.status for r in sim.requests if r.method == "POST" and session_id in r.path]


async def test_list_chargestations_reads_simulator_flag(sim, client):
    physical = sim.add_station(connectors=3)
    simulated = sim.add_station(simulator=True, online=False)
    stations = {cs.id: cs for cs in await client.list_chargestations()}
    assert stations[physical].is_simulator is False and stations[physical].online
    assert stations[simulated].is_simulator is True and not stations[simulated].online
    assert len(stations[physical].connectors) == 3
    assert (await client.get_chargestation(physical)).id == physical


async def test_running_sessions_paginate_past_one_page(sim):
    station = sim.add_station(connectors=50)
    ids = [sim.start_session(station) for _ in range(46)]
    sim.end_session(ids.pop())
    async with EdrvClient(sim.base_url, KEY, page_size=20) as edrv:
        sessions = await edrv.list_running_sessions()
    assert sorted(s.id for s in sessions) == sorted(ids)
    pages = [r.query.get("paginate_page") for r in sim.requests if r.path.endswith("/sessions")]
    assert pages == ["1", "2", "3"]


@pytest.mark.parametrize("flags", [True, False], ids=["hasNext", "no-page-flags"])
async def test_listings_follow_edrv_past_a_page_size_it_caps(flags):
    """Asked for 1000 a page, eDRV serves 100: the listing goes on while eDRV says there is more (hasNext),
    or without that flag, until a page comes back shorter than the ones before."""
    async with EdrvSimulator(KEY, page_size_max=100, page_flags=flags) as sim:
        stations = [sim.add_station(connectors=1) for _ in range(230)]
        sessions = [sim.start_session(station) for station in stations[:225]]
        async with EdrvClient(sim.base_url, KEY, page_size=1000) as edrv:
            listed = await edrv.list_running_sessions()
            on_two = await edrv.list_running_sessions(stations[:2])
            listed_stations = await edrv.list_chargestations()
    assert sorted(s.id for s in listed) == sorted(sessions)
    assert sorted(s.id for s in on_two) == sorted(sessions[:2])
    assert sorted(cs.id for cs in listed_stations) == sorted(stations)
    pages = [r.query["paginate_page"] for r in sim.requests if r.path.endswith("/chargestations")]
    assert pages == ["1", "2", "3"]  # 100, 100, 30: the short page is the last, with or without hasNext


async def test_chargestation_and_status_filters_apply_even_if_server_ignores_them():
    async with EdrvSimulator(KEY, ignore_session_filters=True, status_case="lower") as sim:
        wanted, other = sim.add_station(), sim.add_station()
        mine = sim.start_session(wanted)
        sim.start_session(other)
        sim.end_session(sim.start_session(wanted))
        async with EdrvClient(sim.base_url, KEY) as edrv:
            sessions = await edrv.list_running_sessions([wanted])
        assert [s.id for s in sessions] == [mine]
        assert sessions[0].status == "started" and sessions[0].running
        assert sim.requests[0].query["chargestation"] == wanted  # still asked eDRV to filter


async def test_set_and_clear_on_physical_station(sim, client):
    session_id = sim.start_session(sim.add_station())
    action = await client.set_power_limit(session_id, "current", 16.0)
    assert action.type == "session.set_power_limit" and action.status == "requested"
    assert action.session_id == session_id and action.id
    await client.set_power_limit(session_id, "current", 12.5)
    await client.set_power_limit(session_id, "power", 7400)
    cleared = await client.clear_power_limit(session_id)
    assert cleared.type == "session.clear_power_limit"
    bodies = [(kind, body) for _, kind, body in sim.limit_calls()]
    assert bodies == [("set_power_limit", {"unit": "current", "limit": 16}),
                      ("set_power_limit", {"unit": "current", "limit": 12.5}),
                      ("set_power_limit", {"unit": "power", "limit": 7400}),
                      ("clear_power_limit", {})]
    assert type(bodies[0][1]["limit"]) is int
    assert [r.status for r in sim.requests] == [201] * 4


async def test_simulator_station_refuses_power_and_clear(sim, client):
    session_id = sim.start_session(sim.add_station(simulator=True))
    await client.set_power_limit(session_id, "current", 10)
    with pytest.raises(EdrvRejected) as power:
        await client.set_power_limit(session_id, "power", 4000)
    assert power.value.status_code == 400
    with pytest.raises(EdrvRejected) as clear:
        await client.clear_power_limit(session_id)
    assert "only available on physical" in clear.value.message
    assert _posts(sim, session_id) == [201, 400, 400]  # 400s are not retried


async def test_ended_session_is_rejected_and_unknown_is_not_found(sim, client):
    session_id = sim.start_session(sim.add_station())
    sim.end_session(session_id)
    with pytest.raises(EdrvRejected):
        await client.set_power_limit(session_id, "current", 10)
    with pytest.raises(EdrvNotFound):
        await client.get_session("0" * 24)
    assert not (await client.get_session(session_id)).running


async def test_wrong_key_is_auth_error_and_never_leaks(sim, client, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "wrong-key-5ecret-value"
    sim.add_station()
    async with EdrvClient(sim.base_url, secret, backoff_base_s=0.01) as edrv:
        with pytest.raises(EdrvAuthError) as exc:
            await edrv.list_chargestations()
        assert secret not in repr(edrv)
    assert exc.value.status_code == 401
    assert secret not in str(exc.value) and secret not in repr(exc.value)
    sim.faults.fail_next(1, 503)  # the good key's client logs a retry: that line must not show its key either
    await client.list_chargestations()
    assert "retry 1/3" in caplog.text
    assert secret not in caplog.text and KEY not in caplog.text
    assert [r.status for r in sim.requests] == [401, 503, 200]


async def test_retries_server_errors_then_succeeds(sim, client):
    session_id = sim.start_session(sim.add_station())
    sim.faults.fail_next(2, 503)
    await client.set_power_limit(session_id, "current", 10)
    assert _posts(sim, session_id) == [503, 503, 201]


async def test_gives_up_after_max_retries_and_zero_disables_retry(sim, client):
    session_id = sim.start_session(sim.add_station())
    sim.faults.fail_next(10, 500)
    with pytest.raises(EdrvServerError):
        await client.set_power_limit(session_id, "current", 10)
    assert len(_posts(sim, session_id)) == 4  # first try + max_retries=3
    sim.clear_requests()
    with pytest.raises(EdrvServerError):
        await client.clear_power_limit(session_id, max_retries=0)
    assert len(_posts(sim, session_id)) == 1


async def test_rate_limit_waits_retry_after(sim, client):
    session_id = sim.start_session(sim.add_station())
    sim.faults.retry_after_s = 0.4
    sim.faults.fail_next(1, 429)
    await client.set_power_limit(session_id, "current", 10)
    first, second = [r for r in sim.requests if r.method == "POST"]
    assert (first.status, second.status) == (429, 201)
    assert second.at - first.at >= 0.35  # backoff_base_s is 0.01: only Retry-After explains the gap


async def test_rate_limit_wait_is_capped_and_surfaces_retry_after(sim):
    session_id = sim.start_session(sim.add_station())
    sim.faults.retry_after_s = 30
    sim.faults.fail_next(3, 429)
    async with EdrvClient(sim.base_url, KEY, max_retries=2, backoff_max_s=0.1) as edrv:
        started = time.monotonic()
        with pytest.raises(EdrvRateLimited) as exc:
            await edrv.set_power_limit(session_id, "current", 10)
    assert time.monotonic() - started < 2
    assert exc.value.retry_after == 30


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_transport_errors_retry_and_report_to_hook():
    calls: list[tuple[str, str]] = []
    url = f"http://127.0.0.1:{_closed_port()}/v1.1"
    async with EdrvClient(url, KEY, max_retries=2, backoff_base_s=0.01,
                          on_call=lambda op, latency, outcome: calls.append((op, outcome))) as edrv:
        with pytest.raises(EdrvTransportError):
            await edrv.get_session("abc")
    assert calls == [("get_session", "transport_error")] * 3


async def test_hook_sees_each_outcome(sim):
    calls: list[tuple[str, str]] = []
    session_id = sim.start_session(sim.add_station(simulator=True))
    sim.faults.fail_next(1, 429)
    sim.faults.retry_after_s = 0
    async with EdrvClient(sim.base_url, KEY, on_call=lambda op, lat, out: calls.append((op, out))) as edrv:
        await edrv.set_power_limit(session_id, "current", 8)
        with pytest.raises(EdrvRejected):
            await edrv.clear_power_limit(session_id)
    assert calls == [("set_power_limit", "rate_limited"), ("set_power_limit", "ok"),
                     ("clear_power_limit", "rejected")]


async def test_limit_calls_reach_edrv_as_json(sim, client):
    """The client writes the headers httpx would add itself: they must still describe the body."""
    session_id = sim.start_session(sim.add_station())
    await client.set_power_limit(session_id, "power", 7400.5)
    await client.clear_power_limit(session_id)
    await client.get_session(session_id)
    posts = [r for r in sim.requests if r.method == "POST"]
    assert [(r.path.rsplit("/", 1)[-1], r.json) for r in posts] == [
        ("set_power_limit", {"unit": "power", "limit": 7400.5}), ("clear_power_limit", {})]
    for r in posts:
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["Content-Length"] == str(len(json.dumps(r.json, separators=(",", ":"))))
    get = sim.requests[-1]
    assert get.method == "GET" and "Content-Type" not in get.headers and "Content-Length" not in get.headers
    assert {r.headers["Host"] for r in sim.requests} == {sim.base_url.split("/")[2]}


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from(["http://127.0.0.1:8080/v1.1", "https://api.example.test/v1.1/", "http://h:1"]),
       session_id=st.text(), action=st.sampled_from(["set_power_limit", "clear_power_limit", ""]))
def test_the_url_built_without_parsing_is_the_one_parsing_gives(base, session_id, action):
    client = EdrvClient(base, KEY)
    path = f"sessions/{quote(session_id, safe='')}" + (f"/{action}" if action else "")
    built, parsed = client._url(path, None), httpx.URL(f"{client.base_url}/{path}")
    assert (str(built), built.raw_path, built.host, built.port) == (
        str(parsed), parsed.raw_path, parsed.host, parsed.port)


@settings(max_examples=200, deadline=None)
@given(body=st.dictionaries(st.text(), st.one_of(st.integers(), st.floats(allow_nan=False), st.text())),
       method=st.sampled_from(["POST", "PUT"]))
def test_a_request_with_a_body_is_the_one_httpx_would_build(body, method):
    client = EdrvClient("http://127.0.0.1:8080/v1.1", KEY)
    url = client._url("sessions/65f1a2b3c4d5e6f7a8b9c0d1/set_power_limit", None)
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    short = client._with_body(method, url, content)
    usual = httpx.Request(method, url, content=content, headers=client._json_headers, extensions=client._timeout)
    assert (short.method, short.url, short.headers.raw, short.headers.multi_items(), short.content,
            short.extensions) == (usual.method, usual.url, usual.headers.raw, usual.headers.multi_items(),
                                  usual.content, usual.extensions)
    assert short.headers.encoding == usual.headers.encoding == "ascii"


def test_a_plain_path_is_not_parsed_again(monkeypatch):
    client = EdrvClient("http://127.0.0.1:8080/v1.1", KEY)

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed")

    monkeypatch.setattr(httpx._urls, "urlparse", no_parsing)
    url = client._url("sessions/65f1a2b3c4d5e6f7a8b9c0d1/set_power_limit", None)
    assert str(url) == "http://127.0.0.1:8080/v1.1/sessions/65f1a2b3c4d5e6f7a8b9c0d1/set_power_limit"


async def test_a_session_id_with_odd_characters_reaches_its_own_path(sim, client):
    with pytest.raises(EdrvNotFound):
        await client.set_power_limit("../a b/é?x", "current", 10, max_retries=0)
    assert sim.requests[-1].path == "/v1.1/sessions/../a b/é?x/set_power_limit"  # as eDRV decodes it: whole


async def test_a_limit_that_is_not_a_number_is_never_sent(sim, client):
    session_id = sim.start_session(sim.add_station())
    with pytest.raises(ValueError):
        await client.set_power_limit(session_id, "current", float("nan"))
    assert _posts(sim, session_id) == []


async def test_unit_is_validated_before_sending(sim, client):
    session_id = sim.start_session(sim.add_station())
    with pytest.raises(ValueError):
        await client.set_power_limit(session_id, "amps", 5)
    assert sim.requests == []


def test_energy_report_units_are_normalised():
    assert parse_energy_report({"power": {"value": "7400", "unit": "W"}, "current": {"value": "10.5", "unit": "A"},
                                "timestamp": "2024-05-01T10:30:00Z"})[:2] == (7.4, 10.5)
    power, current, at = parse_energy_report({"power": {"value": 11.0, "unit": "kW"}})
    assert (power, current, at) == (11.0, None, None)
    assert parse_energy_report(None) == (None, None, None)
    assert parse_energy_report({"power": {"value": "n/a", "unit": "kW"}})[0] is None
    session = Session.from_json({"_id": "s1", "status": "STARTED", "chargestation": {"_id": "c1"},
                                 "energy_report": {"timestamp": "2024-05-01T10:30:00.000Z",
                                                   "power": {"value": "3627", "unit": "W"}},
                                 "target": {"energy": "10"}})
    assert session.running and session.chargestation_id == "c1" and session.power_kw == pytest.approx(3.627)
    assert session.energy_report_at is not None and session.energy_report_at.tzinfo is not None
    assert session.target_energy_kwh == 10.0
    assert not Session.from_json({"_id": "s2", "status": "Ended"}).running
