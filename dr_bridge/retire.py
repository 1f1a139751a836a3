"""`dr-bridge retire`: a bridge that is taken out of service releases its stations.

Each bridge claims its stations in the database at start, and another bridge configured with one of them is
refused until the claim goes. A bridge that stops for good never drops its claims itself, so this does,
once the bridge is stopped (it holds no instance lock, instance.py; retire holds it meanwhile, so the bridge
cannot start halfway) and nothing is left to it: no session it still limits (it alone knows to restore them)
and no event it agreed to and has not finished (the utility counts on it). Its event log stays for review.
"""
from __future__ import annotations

from dr_bridge.config import Config
from dr_bridge.domain import ACTIVE, PENDING
from dr_bridge.instance import InstanceLock
from dr_bridge.store import Store


class RetireError(Exception):
    """Refused: the message is one line for the operator."""


def retire(cfg: Config, store: Store) -> str:
    lock = InstanceLock.for_config(cfg)
    if not lock.acquire():
        raise RetireError(f"bridge {cfg.vtn.ven_name!r} is running ({lock.where} held by another process): "
                          f"stop it first")
    try:
        return _retire(cfg, store)
    finally:
        lock.release()


def _retire(cfg: Config, store: Store) -> str:
    name = cfg.vtn.ven_name
    limited = store.session_states(limited_only=True)
    if limited:
        raise RetireError(f"bridge {name!r} still limits {len(limited)} session(s) (e.g. {limited[0].session_id}): "
                          f"stop it and run `dr-bridge release-all --config {cfg.path}` first")
    owed = [e.event_id for e in store.events([PENDING, ACTIVE]) if e.opt == "optIn" and not e.dry_run]
    if owed:
        raise RetireError(f"bridge {name!r} opted in to event(s) not yet over: {', '.join(owed)}; opt out of them "
                          f"(`dr-bridge opt-out EVENT_ID --config {cfg.path}`) or let them end first")
    released = store.release_claims()
    if not released:
        return f"bridge {name!r} held no station claims; nothing to release"
    return (f"bridge {name!r} retired: released {len(released)} station(s) ({', '.join(released)}); "
            f"its event log stays. Starting it again claims them again, if no other bridge has.")
