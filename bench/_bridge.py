"""The real bridge (daemon.Bridge: Engine, Dispatcher, EdrvClient, SQLite event log) in its own process,
started as `dr-bridge run` starts it (its garbage collector tuned once started: daemon.tune_gc).

    python -m bench._bridge dispatch --target FILE --workdir DIR
    python -m bench._bridge midevent --target FILE --workdir DIR --http-port P --expect N --ready FILE

dispatch: an event received 8 s before its interval starts (utilities announce events minutes to a day
ahead; 8 s leaves room for the engine's listing ahead of the boundary, PREFETCH_S), over every station;
measures the interval start to the first set_power_limit sent and to the last one answered 2xx, the time
spent inside the event log (on the event loop, and the group commits in the journal's thread), the
process's CPU time per action over the same span, and peak RSS.
midevent: an event already in force; for each session.started webhook, its receipt to the new session's
set_power_limit being sent (both stamped here, one clock), and the session's start in the simulator to that
send (wall clock, same machine: this includes the simulator's webhook queue). Prints one JSON line.

The probes wrap methods of this one Bridge instance (and the webhook handler), nothing else changes:
every action is still written to the event log, and the count of rows written is in the output.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

from bench._baseline import cpu_seconds
from dr_bridge import http as bridge_http
from dr_bridge.config import config_from_dict
from dr_bridge.daemon import Bridge, tune_gc
from dr_bridge.domain import Event, SignalInterval
from dr_bridge.engine import PREFETCH_S

STORE_CALLS = (  # the event-log methods dispatch and webhooks call per action on the event loop
    "add_action", "update_action", "save_session_state", "action_by_edrv_id")


class Probe:
    def __init__(self) -> None:
        self.sent: dict[str, float] = {}  # session id -> first set_power_limit sent (unix s)
        self.acked: dict[str, float] = {}  # session id -> last set_power_limit answered 2xx
        self.received: dict[str, float] = {}  # session id -> its session.started webhook received
        self.began: dict[str, float] = {}  # session id -> when the simulator started it (its createdAt)
        self.store_s = 0.0  # time spent inside the event log's methods (on the loop, or the journal's thread)

    def attach(self, bridge: Bridge) -> None:
        send = bridge.client.set_power_limit

        async def set_power_limit(session_id: str, unit: str, limit: float, **kw):
            self.sent.setdefault(session_id, time.time())
            action = await send(session_id, unit, limit, **kw)  # returns only on HTTP 2xx with ok: true
            self.acked[session_id] = time.time()
            return action

        bridge.client.set_power_limit = set_power_limit
        for name in STORE_CALLS:
            setattr(bridge.store, name, self._timed(getattr(bridge.store, name)))
        # and the group commits of dispatch and webhooks (journal.py), which run in a worker thread
        bridge.engine.journal.write_batch = self._timed(bridge.engine.journal.write_batch)

    def _timed(self, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.store_s += time.perf_counter() - started
        return timed

    def watch_webhooks(self) -> None:
        """Stamp session.started webhooks as the HTTP handler gets them (before the bridge persists them)."""
        handler = bridge_http.HttpServer.webhook

        async def webhook(server, request):
            received = time.time()
            response = await handler(server, request)
            body = await request.read()  # aiohttp keeps the bytes the handler read
            if b"session.started" in body:
                session = json.loads(body)["data"]
                self.received.setdefault(session["_id"], received)
                began = datetime.fromisoformat(session["createdAt"].replace("Z", "+00:00")).timestamp()
                self.began.setdefault(session["_id"], began)
            return response

        bridge_http.HttpServer.webhook = webhook


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bridge(target: dict, workdir: Path, http_port: int | None) -> Bridge:
    cfg = config_from_dict({
        "bridge": {"database_url": f"sqlite:///{workdir / 'bridge.db'}"},
        # No VTN: the event is handed to the engine directly. The VEN retries a closed port in the background.
        "vtn": {"url": f"http://127.0.0.1:{_closed_port()}/OpenADR2/Simple/2.0b", "ven_name": "bench"},
        "edrv": {"base_url": target["base_url"], "api_key_env": "DR_BRIDGE_BENCH_KEY"},
        "http": {"host": "127.0.0.1", "port": http_port or _closed_port()},
        "levels": {"1": {"fraction": 0.75}, "2": {"fraction": 0.5}, "3": {"current": 6}},
        # simulator = false: with the flag left to eDRV, the first pass reads each station once, one by one
        "chargestations": [{"id": sid, "max_current": 32, "simulator": False} for sid in target["stations"]],
    }, source="bench")
    return Bridge(cfg, target["api_key"], http=http_port is not None)


async def _start(bridge: Bridge, probe: Probe, args: argparse.Namespace) -> None:
    probe.attach(bridge)
    await bridge.start()
    if not args.default_gc:
        tune_gc()  # as `dr-bridge run` does once started


def _synchronous(bridge: Bridge, mode: str) -> None:
    """A diagnostic only: how much of the event log's cost is SQLite's fsync per commit."""
    @sa.event.listens_for(bridge.store.engine, "connect")
    def _pragma(dbapi_conn, _record):  # noqa: ANN001
        dbapi_conn.execute(f"PRAGMA synchronous={mode}")

    bridge.store.engine.dispose()  # connections opened so far get the pragma too


def _event(event_id: str, start: datetime) -> Event:
    end = start + timedelta(hours=1)
    return Event(event_id, 0, start, end, [SignalInterval("SIMPLE", "level", start, end, 2.0)])


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


async def dispatch(args: argparse.Namespace) -> dict:
    target = json.loads(Path(args.target).read_text())
    n = len(target["sessions"])
    probe = Probe()
    bridge = _bridge(target, Path(args.workdir), None)  # no webhooks: the baselines get none either
    if args.sqlite_synchronous:
        _synchronous(bridge, args.sqlite_synchronous)
    await _start(bridge, probe, args)
    start = datetime.now(timezone.utc) + timedelta(seconds=PREFETCH_S + 3)
    cpu_at_start: list[float] = []
    asyncio.get_running_loop().call_later(start.timestamp() - time.time(),
                                          lambda: cpu_at_start.append(cpu_seconds()))
    await bridge.engine.handle_event(_event("bench-dispatch", start))
    deadline = start.timestamp() + args.max_seconds
    while len(probe.acked) < n and time.time() < deadline:
        await asyncio.sleep(0.05)
    cpu_s = cpu_seconds() - cpu_at_start[0]
    store_s, rss = probe.store_s, _peak_rss_mb()
    recorded = sum(bridge.store.action_counts().values())
    await bridge.stop()
    seconds = max(probe.acked.values()) - start.timestamp() if probe.acked else float("nan")
    first = min(probe.sent.values()) - start.timestamp() if probe.sent else float("nan")
    return {"sessions": n, "acked": len(probe.acked), "seconds": round(seconds, 3), "first_sent_s": round(first, 3),
            "rps": round(len(probe.acked) / seconds, 1), "store_s": round(store_s, 3),
            "cpu_us_per_action": round(1e6 * cpu_s / max(1, len(probe.acked))),
            "actions_recorded": recorded, "peak_rss_mb": rss}


async def midevent(args: argparse.Namespace) -> dict:
    target = json.loads(Path(args.target).read_text())
    probe = Probe()
    probe.watch_webhooks()
    bridge = _bridge(target, Path(args.workdir), args.http_port)
    await _start(bridge, probe, args)
    await bridge.engine.handle_event(_event("bench-midevent", datetime.now(timezone.utc) - timedelta(seconds=1)))
    await bridge.engine.settle(timeout=120)  # the sessions already running hold their limits
    deadline = time.time() + 120
    while time.time() < deadline and {"planned", "requested"} & set(bridge.store.action_counts()):
        await asyncio.sleep(0.2)  # and their outcome webhooks are in, so the sessions below start on a quiet bridge
    Path(args.ready).write_text("ready")
    deadline = time.time() + args.max_seconds
    while time.time() < deadline and (len(probe.received) < args.expect or
                                      any(sid not in probe.sent for sid in probe.received)):
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # let the last outcome webhooks land before the log is counted
    recorded = sum(bridge.store.action_counts().values())
    await bridge.stop()
    done = [sid for sid in probe.received if sid in probe.sent]
    # A pass started by another webhook may list a new session before its own webhook arrives: its limit
    # was then sent before the webhook was received, which counts as 0 ms (and is counted as "ahead").
    after_webhook = [max(0.0, 1000 * (probe.sent[sid] - probe.received[sid])) for sid in done]
    after_start = [1000 * (probe.sent[sid] - probe.began[sid]) for sid in done]
    return {"started": len(probe.received), "limited": len(done),
            "ahead": sum(probe.sent[sid] < probe.received[sid] for sid in done),
            **_percentiles("", after_webhook), **_percentiles("start_", after_start),
            "actions_recorded": recorded, "store_s": round(probe.store_s, 3)}


def _percentiles(prefix: str, values: list[float]) -> dict:
    if not values:
        return {f"{prefix}{k}_ms": float("nan") for k in ("p50", "p99", "max")}
    ms = sorted(values)
    pick = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 1)  # noqa: E731
    return {f"{prefix}p50_ms": pick(0.50), f"{prefix}p99_ms": pick(0.99), f"{prefix}max_ms": round(ms[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["dispatch", "midevent"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--expect", type=int, default=1000)
    parser.add_argument("--ready", default="")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--sqlite-synchronous", choices=["NORMAL"], default=None,
                        help="diagnostic: SQLite's synchronous pragma for the event log (default: as shipped)")
    parser.add_argument("--default-gc", action="store_true",
                        help="diagnostic: leave Python's garbage collector as it comes, not as `dr-bridge run` sets it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the unreachable VTN's retries are not the point here
    run = dispatch if args.mode == "dispatch" else midevent
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
