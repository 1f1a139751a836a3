"""The VEN adapter against a real openleadr VTN on loopback (no mocks), plus the pure normalisation."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import pytest

from dr_bridge.domain import Event, SignalInterval
from dr_bridge.localvtn import LocalVtn
from dr_bridge.openadr import Ven, event_from_openleadr

UTC = timezone.utc
MIN = timedelta(minutes=1)


def soon(minutes: int = 5) -> datetime:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).replace(microsecond=0)


# ---- normalisation (pure) ------------------------------------------------------------------------------

def _with_durations(event_duration: timedelta, *durations: timedelta) -> dict:
    return {"event_descriptor": {"event_id": "E-D", "modification_number": 0},
            "active_period": {"dtstart": datetime(2026, 3, 1, 12, tzinfo=UTC), "duration": event_duration},
            "event_signals": [{"signal_name": "SIMPLE", "signal_type": "level", "signal_id": "s",
                               "intervals": [{"duration": d, "uid": i, "signal_payload": 3 - i}
                                             for i, d in enumerate(durations)]}]}


def test_a_zero_duration_is_open_ended_only_on_the_last_interval_and_a_negative_one_is_refused() -> None:
    start = datetime(2026, 3, 1, 12, tzinfo=UTC)
    # Read as open-ended, the empty first interval held level 3 over the whole event instead of level 2.
    event = event_from_openleadr(_with_durations(60 * MIN, timedelta(0), 60 * MIN))
    assert [(iv.start, iv.end, iv.value) for iv in event.intervals] == [
        (start, start, 3.0), (start, start + 60 * MIN, 2.0)]
    # Negative durations were read as open-ended too: limited until the backstop instead of refused.
    for bad in (_with_durations(-15 * MIN, 15 * MIN), _with_durations(60 * MIN, -15 * MIN)):
        with pytest.raises(ValueError, match="negative"):
            event_from_openleadr(bad)


def test_normalises_third_party_event_dict() -> None:
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    d = {
        "event_descriptor": {"event_id": "E1", "modification_number": 3, "priority": 2,
                             "market_context": "http://u.example/p", "event_status": "near",
                             "test_event": "false", "created_date_time": "2026-03-01T10:00:00"},
        "active_period": {"dtstart": "2026-03-01T12:00:00", "duration": timedelta(0),
                          "tolerance": {"tolerate": {"startafter": timedelta(seconds=120)}},
                          "ramp_up": timedelta(seconds=300), "recovery": timedelta(seconds=60)},
        "event_signals": [
            {"signal_name": "SIMPLE", "signal_type": "level", "signal_id": "s1",
             "intervals": [{"duration": 15 * MIN, "uid": 0, "signal_payload": 1.0},
                           {"duration": 30 * MIN, "uid": 1, "signal_payload": 2.0},
                           {"duration": timedelta(0), "uid": 2, "signal_payload": 3}]},
            {"signal_name": "LOAD_CONTROL", "signal_type": "x-loadControlCapacity", "signal_id": "s2",
             "intervals": [{"dtstart": "2026-03-01T12:10:00.5", "duration": 10 * MIN, "uid": 0,
                            "signal_payload": 0.5}]},
        ],
        "targets": [{"resource_id": "A"}, {"group_id": "G"}, {"resource_id": "B"}],
        "response_required": "never",
    }
    event = event_from_openleadr(d)

    assert event.event_id == "E1" and event.modification_number == 3
    assert event.start == start and event.start.tzinfo is not None
    assert event.end is None  # duration 0: open-ended
    assert event.intervals == [
        SignalInterval("SIMPLE", "level", start, start + 15 * MIN, 1.0),
        SignalInterval("SIMPLE", "level", start + 15 * MIN, start + 45 * MIN, 2.0),
        SignalInterval("SIMPLE", "level", start + 45 * MIN, None, 3.0),
        SignalInterval("LOAD_CONTROL", "x-loadControlCapacity", start + 10 * MIN + timedelta(seconds=0.5),
                       start + 20 * MIN + timedelta(seconds=0.5), 0.5),
    ]
    assert event.targets == {"resource_id": ["A", "B"], "group_id": ["G"]}
    assert event.start_after == timedelta(seconds=120)
    assert event.ramp_up == timedelta(seconds=300) and event.recovery == timedelta(seconds=60)
    assert event.event_status == "near" and event.test_event is False
    assert event.priority == 2 and event.market_context == "http://u.example/p"
    assert event.response_required == "never"

    # A deep copy: openleadr rewrites its dict later (event_status) and must not reach our Event.
    d["event_descriptor"]["event_status"] = "active"
    d["event_signals"][0]["intervals"][0]["signal_payload"] = 9.0
    assert event.event_status == "near" and event.intervals[0].value == 1.0


def test_normalises_openleadr_vtn_event_dict() -> None:
    start = datetime(2026, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    d = {
        "event_descriptor": {"event_id": "E2", "modification_number": 0, "event_status": "far",
                             "test_event": "true"},
        "active_period": {"dtstart": start, "duration": 30 * MIN},
        "event_signals": [{"signal_name": "SIMPLE", "signal_type": "level", "signal_id": "s",
                           "intervals": [{"dtstart": start, "duration": 30 * MIN, "uid": 0,
                                          "signal_payload": 2.0}]}],
        "targets": [{"ven_id": "V"}],
        "targets_by_type": {"ven_id": ["V"]},
        "response_required": "always",
    }
    event = event_from_openleadr(d)
    assert event.start == datetime(2026, 3, 1, 10, 0, tzinfo=UTC) and event.start.utcoffset() == timedelta(0)
    assert event.end == event.start + 30 * MIN
    assert event.test_event is True and event.start_after == timedelta(0) and event.ramp_up is None
    assert event.targets == {"ven_id": ["V"]}


# ---- against a real openleadr VTN ----------------------------------------------------------------------

class Recorder:
    """The callbacks an engine would give the VEN; answers per event id from `answers`."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.registered: list[tuple[str, str]] = []
        self.event_lists: list[set[str]] = []
        self.answers: dict[str, str] = {}  # event_id -> "optIn" | "optOut" | "raise"

    async def on_event(self, event: Event) -> tuple[str, str]:
        self.events.append(event)
        answer = self.answers.get(event.event_id, "optIn")
        if answer == "raise":
            raise RuntimeError("engine bug")
        return answer, "test"

    def on_registered(self, ven_id: str, registration_id: str) -> None:
        self.registered.append((ven_id, registration_id))

    async def on_event_list(self, ids: set[str]) -> None:
        self.event_lists.append(ids)

    def seen(self, event_id: str, modification_number: int = 0) -> Event | None:
        return next((e for e in reversed(self.events)
                     if e.event_id == event_id and e.modification_number == modification_number), None)


def make_ven(vtn: LocalVtn, rec: Recorder, **kwargs) -> Ven:
    return Ven(vtn_url=vtn.url, ven_name="ev-fleet", on_event=rec.on_event, on_registered=rec.on_registered,
               on_event_list=rec.on_event_list, **kwargs)


def response(vtn: LocalVtn, event_id: str) -> str | None:
    return next((r["opt_type"] for r in reversed(vtn.responses) if r["event_id"] == event_id), None)


@pytest.fixture
async def vtn() -> AsyncIterator[LocalVtn]:
    server = LocalVtn(poll_s=1)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def rec() -> Recorder:
    return Recorder()


@pytest.fixture
async def ven(vtn: LocalVtn, rec: Recorder) -> AsyncIterator[Ven]:
    client = make_ven(vtn, rec)
    await asyncio.wait_for(client.run(), 10)
    yield client
    await client.stop()


async def test_registers_and_reports_ids(vtn: LocalVtn, rec: Recorder, ven: Ven) -> None:
    assert ven.registered
    assert ven.ven_id and ven.registration_id
    assert rec.registered == [(ven.ven_id, ven.registration_id)]
    assert vtn.registrations[-1]["ven_id"] == ven.ven_id
    assert vtn.registrations[-1]["registration_id"] == ven.registration_id


async def test_reregistration_reports_the_new_ids(vtn: LocalVtn, rec: Recorder, ven: Ven) -> None:
    ven_id, first_registration = rec.registered[0]
    vtn.forget_ven(ven_id)
    await vtn.wait_for(lambda: len(rec.registered) == 2)
    assert rec.registered[1][0] == ven_id and rec.registered[1][1] != first_registration
    assert ven.registered and ven.registration_id == rec.registered[1][1]
    event_id = vtn.add_event(ven_id, intervals=[(soon(), 10 * MIN, 1)])
    await vtn.wait_for(lambda: rec.seen(event_id))


async def test_a_vtn_cancelling_the_registration_is_registered_with_again(vtn: LocalVtn, rec: Recorder) -> None:
    ven = make_ven(vtn, rec, backoff_initial_s=0.2)
    await asyncio.wait_for(ven.run(), 10)
    try:
        ven_id = ven.ven_id
        vtn.cancel_registration(ven_id)
        await vtn.wait_for(lambda: not ven.registered)  # openleadr removed its polling job: deaf until now
        await vtn.wait_for(lambda: len(vtn.registrations) == 2 and ven.registered)
        assert vtn.cancelled_registrations[0]["confirmed"]
        assert rec.registered[-1] == (ven_id, vtn.registrations[-1]["registration_id"])
        event_id = vtn.add_event(ven_id, intervals=[(soon(), 10 * MIN, 1)])
        await vtn.wait_for(lambda: rec.seen(event_id))
        assert await vtn.wait_for(lambda: response(vtn, event_id)) == "optIn"
    finally:
        await ven.stop()


async def test_a_ven_that_stopped_polling_says_so_and_registers_again(vtn: LocalVtn, rec: Recorder) -> None:
    ven = make_ven(vtn, rec, backoff_initial_s=0.2)
    await asyncio.wait_for(ven.run(), 10)
    try:
        ven._client.scheduler.remove_all_jobs()  # as openleadr does on its own on several paths
        assert not ven.registered
        await vtn.wait_for(lambda: len(vtn.registrations) == 2 and ven.registered, timeout=15)
        event_id = vtn.add_event(ven.ven_id, intervals=[(soon(), 10 * MIN, 1)])
        await vtn.wait_for(lambda: rec.seen(event_id))
    finally:
        await ven.stop()


async def test_distribution_hook_repairs_timestamps_and_ignores_error_answers(rec: Recorder) -> None:
    ven = Ven(vtn_url="http://127.0.0.1:9/OpenADR2/Simple/2.0b", ven_name="v", on_event=rec.on_event,
              on_event_list=rec.on_event_list)
    event = {"event_descriptor": {"event_id": "E", "created_date_time": "2026-03-01T10:00:00"},
             "active_period": {"dtstart": "2026-03-01T12:00:00", "duration": MIN},
             "event_signals": [{"intervals": [{"dtstart": "2026-03-01T12:00:00", "duration": MIN}]}]}
    await ven._after_parse_xml("oadrDistributeEvent",
                               {"events": [event], "response": {"response_code": 200}})
    # openleadr would leave these as strings and then fail to answer the event at all.
    assert event["active_period"]["dtstart"] == datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert event["event_signals"][0]["intervals"][0]["dtstart"] == datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert event["event_descriptor"]["created_date_time"] == datetime(2026, 3, 1, 10, tzinfo=UTC)
    assert rec.event_lists == [{"E"}]

    await ven._after_parse_xml("oadrDistributeEvent", {"response": {"response_code": 452}})
    await ven._after_parse_xml("oadrResponse", {"response": {"response_code": 200}})
    assert rec.event_lists == [{"E"}]  # an error answer or an empty poll says nothing about the events


async def test_event_arrives_as_domain_event_and_vtn_gets_opt_in(vtn: LocalVtn, rec: Recorder, ven: Ven) -> None:
    start = soon()
    event_id = vtn.add_event(ven.ven_id, intervals=[(start, 15 * MIN, 0.5), (start + 15 * MIN, 15 * MIN, 0.2)],
                             signal_name="LOAD_CONTROL", signal_type="x-loadControlCapacity",
                             targets=[{"resource_id": "EVSE-01"}, {"resource_id": "EVSE-02"}],
                             start_after=timedelta(seconds=120), ramp_up=5 * MIN, recovery=2 * MIN)
    event = await vtn.wait_for(lambda: rec.seen(event_id))
    assert event.intervals == [
        SignalInterval("LOAD_CONTROL", "x-loadControlCapacity", start, start + 15 * MIN, 0.5),
        SignalInterval("LOAD_CONTROL", "x-loadControlCapacity", start + 15 * MIN, start + 30 * MIN, 0.2),
    ]
    assert event.start == start and event.end == start + 30 * MIN
    assert event.targets == {"resource_id": ["EVSE-01", "EVSE-02"]}
    # These survive only because LocalVtn restores the active period after add_raw_event (openleadr #187).
    assert (event.start_after, event.ramp_up, event.recovery) == (timedelta(seconds=120), 5 * MIN, 2 * MIN)
    assert await vtn.wait_for(lambda: response(vtn, event_id)) == "optIn"


async def test_opt_out_and_a_raising_handler_only_affect_their_own_event(
        vtn: LocalVtn, rec: Recorder, ven: Ven) -> None:
    ids = {answer: vtn.add_event(ven.ven_id, intervals=[(soon(), 10 * MIN, 1)]) for answer in
           ("optIn", "optOut", "raise")}
    for answer, event_id in ids.items():
        rec.answers[event_id] = answer
    await vtn.wait_for(lambda: all(response(vtn, e) for e in ids.values()))
    assert response(vtn, ids["optIn"]) == "optIn"
    assert response(vtn, ids["optOut"]) == "optOut"
    assert response(vtn, ids["raise"]) == "optOut"


async def test_modification_and_cancellation_reach_on_event(vtn: LocalVtn, rec: Recorder, ven: Ven) -> None:
    start = soon()
    event_id = vtn.add_event(ven.ven_id, intervals=[(start, 10 * MIN, 1)])
    await vtn.wait_for(lambda: response(vtn, event_id))

    assert vtn.modify_event(event_id, intervals=[(start, 10 * MIN, 3), (start + 10 * MIN, 5 * MIN, 2)],
                            targets=[{"resource_id": "EVSE-09"}]) == 1
    modified = await vtn.wait_for(lambda: rec.seen(event_id, 1))
    assert [i.value for i in modified.intervals] == [3.0, 2.0]
    assert modified.end == start + 15 * MIN
    assert modified.targets == {"resource_id": ["EVSE-09"]}

    vtn.cancel_event(event_id)
    cancelled = await vtn.wait_for(lambda: rec.seen(event_id, 2))
    assert cancelled.cancelled


async def test_removed_event_is_missing_from_the_next_event_list(vtn: LocalVtn, rec: Recorder, ven: Ven) -> None:
    first = vtn.add_event(ven.ven_id, intervals=[(soon(), 10 * MIN, 1)])
    second = vtn.add_event(ven.ven_id, intervals=[(soon(10), 10 * MIN, 2)])
    await vtn.wait_for(lambda: rec.event_lists and rec.event_lists[-1] == {first, second})

    vtn.remove_event(first)
    await vtn.wait_for(lambda: rec.event_lists[-1] == {second})
    vtn.remove_event(second)
    await vtn.wait_for(lambda: rec.event_lists[-1] == set())
    assert not any(e.cancelled for e in rec.events)  # no explicit cancellation was ever sent


async def test_send_opt_sends_one_resource(vtn: LocalVtn, rec: Recorder, ven: Ven) -> None:
    event_id = vtn.add_event(ven.ven_id, intervals=[(soon(), 10 * MIN, 1)],
                             targets=[{"resource_id": "EVSE-01"}, {"resource_id": "EVSE-02"}])
    await vtn.wait_for(lambda: rec.seen(event_id))
    assert await ven.send_opt(event_id, 0, "EVSE-02", "overrideStatus") is True
    assert len(vtn.opts) == 1
    opt = vtn.opts[0]
    assert opt["resource_ids"] == ["EVSE-02"]
    assert (opt["event_id"], opt["modification_number"]) == (event_id, 0)
    assert (opt["opt_type"], opt["opt_reason"], opt["ven_id"]) == ("optOut", "overrideStatus", ven.ven_id)


async def test_send_availability_sends_a_window(vtn: LocalVtn, ven: Ven) -> None:
    start = soon()
    assert await ven.send_availability("EVSE-03", start, start + 2 * timedelta(hours=1)) is True
    [opt] = vtn.opts
    assert opt["event_id"] is None and opt["resource_ids"] == ["EVSE-03"]
    assert opt["opt_type"] == "optOut" and opt["opt_reason"] == "notParticipating"
    assert opt["vavailability"] == [{"dtstart": start, "duration": timedelta(hours=2)}]


async def test_whole_event_change_of_mind(vtn: LocalVtn, rec: Recorder, ven: Ven) -> None:
    event_id = vtn.add_event(ven.ven_id, intervals=[(soon(), 10 * MIN, 1)])
    assert await vtn.wait_for(lambda: response(vtn, event_id)) == "optIn"
    assert await ven.send_created_event(event_id, 0, "optOut") is True
    assert response(vtn, event_id) == "optOut"
    assert [r["opt_type"] for r in vtn.responses if r["event_id"] == event_id] == ["optIn", "optOut"]


async def test_registers_once_the_vtn_comes_up(rec: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    vtn = LocalVtn(poll_s=1)  # not started: the VEN starts against a VTN that is down
    ven = make_ven(vtn, rec, backoff_initial_s=0.2, backoff_max_s=1.0)
    caplog.set_level(logging.INFO)
    running = asyncio.create_task(ven.run())
    try:
        await asyncio.sleep(3)
        assert not running.done() and not ven.registered
        failures = [r for r in caplog.records if "registration attempt" in r.getMessage()]
        assert len(failures) >= 2
        assert all(r.exc_info is None for r in failures)
        assert not [r for r in caplog.records if r.name == "openleadr"]  # held back: one line per attempt

        await vtn.start()
        await asyncio.wait_for(running, 10)
        assert ven.registered and rec.registered == [(ven.ven_id, ven.registration_id)]
        event_id = vtn.add_event(ven.ven_id, intervals=[(soon(), 10 * MIN, 2)])
        await vtn.wait_for(lambda: rec.seen(event_id))
    finally:
        running.cancel()
        await ven.stop()
        await vtn.stop()


async def test_stop_ends_the_registration_backoff(rec: Recorder) -> None:
    ven = make_ven(LocalVtn(), rec, backoff_initial_s=30, backoff_max_s=60)  # VTN never started
    running = asyncio.create_task(ven.run())
    await asyncio.sleep(0.3)
    await ven.stop()
    await asyncio.wait_for(running, 2)
    assert not ven.registered and rec.registered == []


async def test_restart_reuses_the_persisted_ven_id(vtn: LocalVtn, rec: Recorder) -> None:
    first = make_ven(vtn, rec)
    await asyncio.wait_for(first.run(), 10)
    ven_id, registration_id = rec.registered[-1]
    await first.stop()
    assert not first.registered

    rec2 = Recorder()
    second = make_ven(vtn, rec2, ven_id=ven_id, registration_id=registration_id)
    await asyncio.wait_for(second.run(), 10)
    try:
        assert second.ven_id == ven_id
        assert [r["ven_id"] for r in vtn.registrations] == [ven_id, ven_id]
        assert rec2.registered == [(ven_id, second.registration_id)]
        event_id = vtn.add_event(ven_id, intervals=[(soon(), 10 * MIN, 1)])
        await vtn.wait_for(lambda: rec2.seen(event_id))
    finally:
        await second.stop()
