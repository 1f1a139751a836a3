"""What eDRV's answers say about whether the bridge can act (EdrvWatch), outcome by outcome."""
from __future__ import annotations

from dr_bridge.edrvwatch import EdrvWatch
from dr_bridge.health import Readiness, Reason


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def watch(clock: Clock | None = None) -> tuple[EdrvWatch, Readiness]:
    readiness = Readiness()
    return EdrvWatch(readiness, key_env="EDRV_API_KEY", base_url="https://api.edrv.example/v1.1",
                     unreachable_after_s=60, clock=clock or Clock()), readiness


def test_refusing_stands_until_eDRV_accepts_a_call_again():
    w, readiness = watch()
    assert w.observe("list_running_sessions", "ok") is None
    assert w.observe("set_power_limit", "auth_error") == "refusing"
    assert w.observe("list_running_sessions", "auth_error") is None  # still the same refusal: no second alarm
    detail = readiness.not_ready()[Reason.EDRV_REFUSING]
    assert "EDRV_API_KEY" in detail and "list_running_sessions, set_power_limit" in detail
    assert w.observe("set_power_limit", "rate_limited") is None  # a 429 does not say the key is good
    assert w.refusing and Reason.EDRV_REFUSING in readiness.not_ready()
    # Any accepted call does, even of another kind: a limit refused once is not tried again while its
    # resources are opted out, so waiting for that very call would keep the bridge refusing until a restart.
    assert w.observe("get_chargestation", "rejected") == "accepting"  # a 400: the key was accepted
    assert not w.refusing and readiness.not_ready() == {}
    assert w.observe("set_power_limit", "auth_error") == "refusing"  # and a new refusal is a new alarm


def test_unreachable_only_after_failing_for_the_whole_window_and_cleared_by_any_answer():
    clock = Clock()
    w, readiness = watch(clock)
    w.observe("list_running_sessions", "server_error")
    clock.t = 59
    w.observe("list_running_sessions", "transport_error")
    assert readiness.not_ready() == {}
    clock.t = 61
    w.check_reach()
    assert "api.edrv.example" in readiness.not_ready()[Reason.EDRV_UNREACHABLE]
    w.observe("get_chargestation", "rate_limited")  # an answer, if not a welcome one
    assert readiness.not_ready() == {}
    clock.t = 200
    w.observe("get_chargestation", "transport_error")
    clock.t = 230
    w.check_reach()
    assert readiness.not_ready() == {}, "a new run of failures starts its own window"
