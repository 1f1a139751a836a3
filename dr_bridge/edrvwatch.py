"""What eDRV's answers say about whether the bridge can act at all.

Every eDRV call's outcome passes through here (the client's on_call hook). Two states stop the bridge from
limiting or restoring anything, and each is a readiness reason: eDRV refusing the bridge (HTTP 401/403, a
rotated or revoked key, a key without the permission), and eDRV out of reach (server errors or no
connection) for longer than a reconcile interval. A single failed call is neither: dispatch retries it.
"""
from __future__ import annotations

import time
from typing import Callable, Literal

from dr_bridge.health import Readiness, Reason

# Outcomes (EdrvClient's on_call) that say eDRV was reached and accepted the key for this call.
ACCEPTED = ("ok", "not_found", "rejected")
_UNREACHED = ("server_error", "transport_error")

Change = Literal["refusing", "accepting"] | None


class EdrvWatch:
    def __init__(self, readiness: Readiness, *, key_env: str, base_url: str, unreachable_after_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.readiness = readiness
        self.key_env = key_env
        self.base_url = base_url
        self.unreachable_after_s = unreachable_after_s
        self.clock = clock
        self.last_call: float | None = None  # any outcome, failures included: something was asked of eDRV
        self._refused: set[str] = set()  # operations eDRV last answered 401/403
        self._failing_since: float | None = None  # first of an unbroken run of server or connection errors

    @property
    def refusing(self) -> bool:
        return bool(self._refused)

    def observe(self, op: str, outcome: str) -> Change:
        """One call's outcome; "refusing" when eDRV has just begun to refuse the bridge, "accepting" when it
        has just stopped (a call was accepted since)."""
        now = self.last_call = self.clock()
        if outcome in _UNREACHED:
            if self._failing_since is None:
                self._failing_since = now
            self.check_reach()
            return None
        self._failing_since = None
        self.readiness.clear(Reason.EDRV_UNREACHABLE, f"eDRV answered {op}")
        if outcome == "auth_error":
            self._refused.add(op)
            new = self.readiness.raise_(Reason.EDRV_REFUSING, self._refusing_detail())
            return "refusing" if new else None
        if outcome in ACCEPTED and self._refused:
            # Any accepted call clears every refusal: the key is accepted, and an operation refused once (a
            # limit, say) is not tried again while its resources are opted out, so waiting for that very
            # operation would keep the bridge refusing every later event until a restart.
            self._refused.clear()
            self.readiness.clear(Reason.EDRV_REFUSING, f"eDRV accepts the API key again ({op})")
            return "accepting"
        return None

    def check_reach(self) -> None:
        if self._failing_since is None:
            return
        failing_s = self.clock() - self._failing_since
        if failing_s >= self.unreachable_after_s:
            self.readiness.raise_(Reason.EDRV_UNREACHABLE, (
                f"no answer from eDRV at {self.base_url} for {failing_s:.0f} s (server errors or no connection): "
                f"check the network path to eDRV and eDRV's status; limits and restores are retried meanwhile"))

    def _refusing_detail(self) -> str:
        return (f"eDRV refuses the bridge (HTTP 401/403 on {', '.join(sorted(self._refused))}): the API key in "
                f"{self.key_env} is wrong, expired or lacks permission; put a valid key there and restart the "
                f"bridge. Until eDRV accepts it, nothing can be limited or restored, and the resources of active "
                f"and pending events are reported to the VTN as opted out")
