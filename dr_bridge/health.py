"""Whether the bridge can act, and if not, why.

Liveness is only "the process answers"; readiness is "the bridge can do what the utility counts on". Each
part of the bridge that finds it cannot act raises a reason here (and clears it once it can again), or
registers a probe that is asked whenever readiness is read. /readyz and /healthz, the metrics and the log all
read from this one place, so they can never tell different stories.

Raising a reason logs it once, at ERROR, with what to do; clearing it logs once, at INFO. A reason raised
again while it stands only updates its detail, so a refusal repeated on every call is still one log line.
"""
from __future__ import annotations

import logging
from enum import StrEnum
from typing import Callable

log = logging.getLogger("dr_bridge.health")


class Reason(StrEnum):
    NOT_REGISTERED = "not registered"
    VTN_SILENT = "VTN silent"
    EDRV_REFUSING = "eDRV refusing"
    EDRV_UNREACHABLE = "eDRV unreachable"
    WEBHOOKS_SILENT = "webhooks silent"
    RESTORES_OVERDUE = "restores overdue"
    DATABASE_UNREACHABLE = "database unreachable"


Probe = Callable[[], "tuple[Reason, str] | None"]


class Readiness:
    def __init__(self) -> None:
        self._raised: dict[Reason, str] = {}
        self._probes: list[Probe] = []

    def raise_(self, reason: Reason, detail: str) -> bool:
        """Mark the bridge not ready for `reason`; True if it was ready for it until now."""
        new = reason not in self._raised
        self._raised[reason] = detail
        if new:
            log.error("not ready (%s): %s", reason, detail)
        return new

    def clear(self, reason: Reason, why: str = "") -> bool:
        """The bridge can act again as far as `reason` goes; True if it was raised."""
        if self._raised.pop(reason, None) is None:
            return False
        log.info("ready again (%s cleared)%s", reason, f": {why}" if why else "")
        return True

    def raised(self, reason: Reason) -> bool:
        return reason in self._raised

    def add_probe(self, probe: Probe) -> None:
        self._probes.append(probe)

    def not_ready(self) -> dict[Reason, str]:
        """Every reason the bridge cannot act for now, with its detail; empty when ready."""
        reasons = dict(self._raised)
        for probe in self._probes:
            try:
                found = probe()
            except Exception as exc:  # a probe that fails says so rather than taking readiness down with it
                log.warning("readiness probe %s failed: %s", getattr(probe, "__name__", probe), exc)
                continue
            if found is not None:
                reasons.setdefault(found[0], found[1])
        return reasons
