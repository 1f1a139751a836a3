"""The VTN takes the registration away (cancels it, forgets the VEN, refuses to register it again) while
`dr-bridge run` is up: the bridge says so in /readyz and its log, registers again with backoff, and then
hears and acts on later events as before."""
from __future__ import annotations

from datetime import timedelta

import httpx
import pytest

from tests.test_restart import LIMIT, calls, config, registered, rig, soon, spawn, until  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


class Readyz:
    """Polls /readyz; remembers every set of not-ready reasons it saw."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/readyz"
        self.seen: list[tuple[int, list[str]]] = []

    def __call__(self) -> tuple[int, list[str]]:
        try:
            answer = httpx.get(self.url, timeout=2)
        except httpx.HTTPError:
            return 0, []
        reasons = [r["reason"] for r in answer.json().get("not_ready") or []]
        self.seen.append((answer.status_code, reasons))
        return answer.status_code, reasons

    def said_not_registered(self) -> bool:
        self()
        return any(status == 503 and "not registered" in reasons for status, reasons in self.seen)

    def ready(self) -> bool:
        return self()[0] == 200


async def _registered_and_ready(rig, config, spawn):  # noqa: F811
    """`dr-bridge run`, registered, and /readyz 200: (the process, its VEN id, a /readyz poller)."""
    bridge = await spawn("run", "--config", str(config))
    ven_id = await registered(rig, 1, bridge)
    readyz = Readyz(rig.http_port)
    await until(readyz.ready, 20, bridge, "/readyz 200 once registered")
    return bridge, ven_id, readyz


async def _acts_on_a_later_event(rig, bridge, ven_id: str) -> None:  # noqa: F811
    rig.vtn.add_event(ven_id, intervals=[(soon(3), timedelta(seconds=4), 2)], targets=[{"resource_id": "A"}])
    await until(lambda: calls(rig, "A") == [LIMIT], 40, bridge, "the later event acted on")


async def test_a_cancelled_registration_is_taken_up_again_with_backoff(rig, config, spawn):  # noqa: F811
    bridge, ven_id, readyz = await _registered_and_ready(rig, config, spawn)

    rig.vtn.refuse_registrations(2)  # so the bridge has to back off, and /readyz has time to say so
    rig.vtn.cancel_registration(ven_id)
    await until(lambda: rig.vtn.cancelled_registrations, 20, bridge, "the VTN to cancel the registration")
    # openleadr removed its polling job and the bridge sat deaf, /readyz 200.
    await until(readyz.said_not_registered, 20, bridge, "/readyz 503 'not registered'")
    # openleadr drops the registration before it sends its confirmation, so /readyz can say so first.
    await until(lambda: rig.vtn.cancelled_registrations[0]["confirmed"], 10, bridge,
                "the VEN to confirm the cancellation to the VTN")

    assert await registered(rig, 2, bridge, timeout=40) == ven_id, "the same VEN id, registered again"
    await until(readyz.ready, 20, bridge, "/readyz 200 once registered again")
    log = bridge.stderr()
    assert "registration lost (the VTN cancelled the registration)" in log
    assert "registration attempt 1 failed" in log and "registration attempt 2 failed" in log  # the backoff
    await _acts_on_a_later_event(rig, bridge, ven_id)


async def test_a_refused_reregistration_is_not_taken_for_a_registration(rig, config, spawn):  # noqa: F811
    bridge, ven_id, readyz = await _registered_and_ready(rig, config, spawn)

    # The VTN lost its registrations, and answers the re-registration it asks for with an error: openleadr
    # kept the old registration id, so the bridge looked registered while the VTN sent it no event.
    rig.vtn.refuse_registrations(3)
    rig.vtn.forget_ven(ven_id)
    await until(readyz.said_not_registered, 20, bridge, "/readyz 503 'not registered'")
    assert await registered(rig, 2, bridge, timeout=40) == ven_id
    await until(readyz.ready, 20, bridge, "/readyz 200 once registered again")
    assert "registration lost (the VTN asked for a re-registration, which failed)" in bridge.stderr()
    await _acts_on_a_later_event(rig, bridge, ven_id)


async def test_a_vtn_that_stops_answering_is_reported_silent_until_it_answers_again(rig, config, spawn):  # noqa: F811
    bridge, ven_id, readyz = await _registered_and_ready(rig, config, spawn)

    # Registered still, but no event can arrive: /readyz said 200 for as long as the VTN was away.
    await rig.vtn.stop()
    await until(lambda: readyz()[1] == ["VTN silent"], 40, bridge, "/readyz 503 'VTN silent'")
    assert readyz()[0] == 503
    await rig.vtn.start()
    await until(readyz.ready, 30, bridge, "/readyz 200 once the VTN answers again")
    log = bridge.stderr()
    assert "has answered no poll for" in log and "answers polls again" in log
    await _acts_on_a_later_event(rig, bridge, ven_id)
