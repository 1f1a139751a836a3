"""`dr-bridge opt-out`: an operator's opt-out, recorded in the database whether or not the daemon runs.

A running daemon applies it within a few seconds (the resource is restored and not limited again in that
event) and reports it to the VTN; a stopped one does both when it starts.
"""
from __future__ import annotations

from datetime import datetime

from dr_bridge.config import Config
from dr_bridge.domain import CANCELLED, COMPLETED
from dr_bridge.eventlog import event_from_json, iso
from dr_bridge.reporting import OPT_REASONS
from dr_bridge.store import OptOutRow, Store, is_outage
from dr_bridge.targets import select_stations


class OptOutError(Exception):
    """Refused input: the message is one line for the operator, code the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _opt_reason(reason: str | None, default: str) -> tuple[str, str]:
    """(text for the event log, OpenADR optReason): free text is kept and sent as the default reason."""
    if not reason:
        return default, default
    return reason, (reason if reason in OPT_REASONS else default)


def _check_resources(cfg: Config, resources: list[str]) -> None:
    known = {s.resource_id for s in cfg.stations()}
    unknown = [r for r in resources if r not in known]
    if unknown:
        raise OptOutError(f"--resource: not a configured resource: {', '.join(unknown)} "
                          f"(configured: {', '.join(sorted(known))})", 2)


def opt_out_of_event(cfg: Config, store: Store, event_id: str, resources: list[str],
                     reason: str | None) -> str:
    """Record the opt-out of some resources (none given: the whole event); returns what was done."""
    _check_resources(cfg, resources)
    row = store.get_event(event_id)
    if row is None:
        raise OptOutError(f"no event {event_id!r} in the event log", 1)
    if row.status in (COMPLETED, CANCELLED):
        raise OptOutError(f"event {event_id} is already {row.status}: there is nothing to opt out of", 1)
    targeted = {s.resource_id for s in select_stations(event_from_json(row.event_json), cfg.stations(),
                                                       row.ven_id)}
    untargeted = [r for r in resources if r not in targeted]
    if untargeted:
        raise OptOutError(f"event {event_id} does not target {', '.join(untargeted)} "
                          f"(it targets: {', '.join(sorted(targeted)) or 'nothing configured'})", 2)
    text, opt_reason = _opt_reason(reason, "overrideStatus")
    existing = {o.resource_id for o in store.opt_outs(event_id) if not is_outage(o)}
    if None in existing:
        return f"event {event_id} is already opted out as a whole"
    wanted = [r for r in dict.fromkeys(resources) if r not in existing] if resources else [None]
    if not wanted:
        return f"already opted out of event {event_id}: {', '.join(resources)}"
    for resource_id in wanted:
        store.add_opt_out(OptOutRow(event_id=event_id, modification_number=row.modification_number,
                                    resource_id=resource_id, reason=text, opt_reason=opt_reason,
                                    source="operator"))
    what = ", ".join(r for r in wanted if r) or "the whole event"
    return f"opt-out recorded for event {event_id}: {what} ({opt_reason})"


def declare_unavailable(cfg: Config, store: Store, resources: list[str], start: datetime, end: datetime,
                        reason: str | None) -> str:
    """Record that resources (none given: every configured one) are unavailable from start until end."""
    _check_resources(cfg, resources)
    if end <= start:
        raise OptOutError("--until must be after --from", 2)
    text, opt_reason = _opt_reason(reason, "notParticipating")
    chosen = list(dict.fromkeys(resources)) or sorted({s.resource_id for s in cfg.stations()})
    for resource_id in chosen:
        store.add_opt_out(OptOutRow(resource_id=resource_id, window_start=start, window_end=end, reason=text,
                                    opt_reason=opt_reason, source="operator"))
    return f"unavailable from {iso(start)} until {iso(end)}: {', '.join(chosen)} ({opt_reason})"
