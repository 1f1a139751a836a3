"""`dr-bridge run`: wires the store, the eDRV client, the engine, the VEN and the HTTP server together."""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Callable

from dr_bridge.config import Config
from dr_bridge.edrv.client import EdrvClient
from dr_bridge.engine import Engine
from dr_bridge.health import Readiness, Reason
from dr_bridge.instance import InstanceLock
from dr_bridge.openadr import Telemetry, Ven
from dr_bridge.reporting import Reporter, resource_power_kw
from dr_bridge.store import Store, utcnow

log = logging.getLogger("dr_bridge")

# Collect the youngest generation after this many new container objects rather than Python's 700. At an
# interval start with thousands of sessions, the default made the collector run every few calls, and each
# full collection walked every object alive; bench/ measures both (the "default GC" row).
GC_YOUNG_THRESHOLD = 10_000
# And the middle generation after 100 of those rather than 10. Each of its collections walks everything
# alive that is younger than the start-up objects: at an interval start with 10,000 sessions, every
# session's dispatch task; four such collections took 80-164 ms of a 2.4-3.5 s dispatch (gc.callbacks).
GC_MIDDLE_THRESHOLD = 100
LOCK_WAIT_S = 5.0  # a bridge restarted right after a kill waits this long for the old lock to be dropped
LOCK_CHECK_S = 5.0


class StationConflict(Exception):
    """A configured station is claimed by another bridge on the same database, and not shared by both."""


class AlreadyRunning(Exception):
    """Another instance of this very bridge runs on the same database."""


class Bridge:
    """The whole daemon in one object, so tests and the demo run exactly what `dr-bridge run` runs."""

    def __init__(self, cfg: Config, api_key: str, *, dry_run: bool = False,
                 clock: Callable[[], datetime] = utcnow, vtn_backoff_s: float = 1.0, http: bool = True):
        self.cfg = cfg
        self.store = Store.for_config(cfg)
        from dr_bridge.http import HttpServer, Metrics

        self.metrics = Metrics()
        self.client = EdrvClient(cfg.edrv.base_url, api_key, timeout_s=cfg.edrv.request_timeout_s,
                                 max_concurrency=cfg.edrv.max_concurrency, backoff_max_s=cfg.edrv.max_retry_after_s,
                                 on_call=self._observe_call)
        self.readiness = Readiness()
        self.engine = Engine(cfg, self.store, self.client, dry_run=dry_run, clock=clock, readiness=self.readiness)
        state = self.store.ven_state()
        self.ven = Ven(vtn_url=cfg.vtn.url, ven_name=cfg.vtn.ven_name, ven_id=state.ven_id or cfg.vtn.ven_id or None,
                       registration_id=state.registration_id, cert=cfg.vtn.cert or None, key=cfg.vtn.key or None,
                       ca_file=cfg.vtn.ca_file or None, vtn_fingerprint=cfg.vtn.vtn_fingerprint or None,
                       on_event=self.engine.handle_event, on_registered=self.engine.registered,
                       on_event_list=self.engine.handle_event_list, telemetry=self._telemetry(cfg),
                       backoff_initial_s=vtn_backoff_s)
        self.readiness.add_probe(self._registration_probe)
        self.reporter = Reporter(cfg, self.store, self.ven, dry_run=dry_run)
        self.http = HttpServer(cfg, self, self.metrics) if http else None
        self._ven_task: asyncio.Task | None = None
        self._latency: dict[tuple[str, str], Any] = {}

    def _telemetry(self, cfg: Config) -> Telemetry | None:
        if not cfg.vtn.telemetry_min_sampling_s:
            return None
        stations = cfg.stations()
        resources = sorted({s.resource_id for s in stations})
        return Telemetry(resources, partial(resource_power_kw, self.store, stations),
                         min_sampling=timedelta(seconds=cfg.vtn.telemetry_min_sampling_s))

    def _registration_probe(self) -> tuple[Reason, str] | None:
        if not self.ven.registered:
            return Reason.NOT_REGISTERED, f"not registered with VTN {self.cfg.vtn.url}: events cannot reach the bridge"
        silent = self.ven.vtn_silent()
        if silent is not None:
            return Reason.VTN_SILENT, (f"VTN {self.cfg.vtn.url} has answered no poll for {silent:.0f} s: no event "
                                       "can reach the bridge; check the VTN and the network to it")
        return None

    def _observe_call(self, op: str, latency_s: float, outcome: str) -> None:
        histogram = self._latency.get((op, outcome))
        if histogram is None:  # labels() validates and locks on every call: look each pair up once
            histogram = self._latency[(op, outcome)] = self.metrics.edrv_latency.labels(op=op, outcome=outcome)
        histogram.observe(latency_s)
        self.engine.observe_edrv(op, outcome)

    def claim_stations(self) -> None:
        """Two bridges limiting one station unawares would undo each other's limits and restores: refuse,
        unless both mark the station shared (then they coordinate through the database)."""
        stations = self.cfg.stations()
        conflicts = self.store.claim_stations((s.id, s.resource_id, s.shared) for s in stations)
        if not conflicts:
            return
        first = conflicts[0]
        index = next(i for i, s in enumerate(stations) if s.id == first.chargestation_id)
        more = f" ({len(conflicts) - 1} more station(s) likewise)" if len(conflicts) > 1 else ""
        raise StationConflict(
            f"{self.cfg.path or 'config'}: chargestations[{index}]: station {first.chargestation_id} is also "
            f"configured in bridge {first.bridge!r} on this database; remove it from one of them, or set "
            f"shared = true for it in both; a bridge out of service frees its stations with `dr-bridge retire`{more}")

    async def start(self) -> None:
        self.claim_stations()
        await self.engine.start()
        if self.http is not None:
            await self.http.start()
        self._ven_task = asyncio.create_task(self.ven.run(), name="ven")
        await self.reporter.start()

    async def stop(self, restore: bool = False) -> list[str]:
        await self.reporter.stop()
        left = await self.engine.stop(restore=restore)
        try:
            await asyncio.wait_for(self.ven.stop(), 3)
        except Exception as exc:  # stopping must not hang on a VTN that does not answer
            log.warning("VEN did not stop cleanly: %s", exc)
        if self._ven_task is not None:
            self._ven_task.cancel()
            await asyncio.gather(self._ven_task, return_exceptions=True)
        if self.http is not None:
            await self.http.stop()
        await self.engine.journal.flush()  # what webhooks handled meanwhile queued (a "processed" mark, say)
        await self.client.aclose()
        self.store.close()
        return left


def tune_gc() -> int:
    """Once the daemon has started: move what start-up made (modules, config, the ORM's and openleadr's
    objects, which live as long as the process) out of the collector's sight, and collect less often.
    Both cut the collector's share of the CPU and its pauses, which land on dispatch and on webhook
    answers. Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    _, _, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_MIDDLE_THRESHOLD, oldest)
    return gc.get_freeze_count()


async def run_daemon(cfg: Config, api_key: str, *, dry_run: bool, restore_on_exit: bool) -> int:
    lock = InstanceLock.for_config(cfg)
    if not await asyncio.to_thread(lock.acquire, LOCK_WAIT_S):
        raise AlreadyRunning(
            f"bridge {cfg.vtn.ven_name!r} is already running on this database ({lock.where} held by another "
            f"process): two instances would send every limit and restore twice; stop the other one first")
    try:
        return await _run_locked(cfg, api_key, lock, dry_run=dry_run, restore_on_exit=restore_on_exit)
    finally:
        lock.release()


async def _run_locked(cfg: Config, api_key: str, lock: InstanceLock, *, dry_run: bool,
                      restore_on_exit: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bridge = Bridge(cfg, api_key, dry_run=dry_run)
    try:
        await bridge.start()
    except StationConflict:  # raised before anything started: close what __init__ opened
        await bridge.client.aclose()
        bridge.store.close()
        raise
    taken_over = asyncio.Event()
    guard = asyncio.create_task(_guard(lock, stop, taken_over), name="instance-lock")
    frozen = tune_gc()
    log.debug("garbage collector: %d start-up objects frozen, young generation collected every %d",
              frozen, GC_YOUNG_THRESHOLD)
    log.info("dr-bridge running%s: VTN %s, eDRV %s, %d station(s)", " (dry run)" if bridge.engine.dry_run else "",
             cfg.vtn.url, cfg.edrv.base_url, len(bridge.engine.fleet.stations))
    await stop.wait()
    guard.cancel()
    await asyncio.gather(guard, return_exceptions=True)
    restore = restore_on_exit and not taken_over.is_set()  # the other instance carries the event on
    log.info("stopping%s", ": restoring every limited session first" if restore else "")
    left = await bridge.stop(restore=restore)
    if left:
        log.warning("%d session(s) stay limited while the event goes on (a restart resumes it): %s",
                    len(left), ", ".join(left))
    else:
        log.info("no session is left limited")
    return 1 if taken_over.is_set() else 0


async def _guard(lock: InstanceLock, stop: asyncio.Event, taken_over: asyncio.Event) -> None:
    """Stop this instance if another took the bridge's lock while ours was lost with the database."""
    while True:
        await asyncio.sleep(LOCK_CHECK_S)
        try:
            held = await asyncio.to_thread(lock.check)
        except Exception:  # whatever it was, the next check tries again; the guard must not end silently
            log.exception("could not check the instance lock")
            continue
        if not held:
            log.error("another instance of this bridge took its lock while the database connection was lost: "
                      "stopping this one, which leaves every session to it")
            taken_over.set()
            stop.set()
            return
