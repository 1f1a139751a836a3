"""How long working out an event's measured reduction takes at fleet scale, and that it is off the event loop.

    python bench/measure.py [--stations 400] [--sessions 5]

A completed 30-minute level-2 event over every station, with a reading per session every 30 s from 30 minutes
before it (the baseline) to its end, on a temporary SQLite database. Prints the time the measurement took
(it runs in a worker thread since it can take seconds) beside a baseline measured in the same run: loading
the same readings as ORM objects (Store.readings_between), which is what the measurement used to do on the
event loop, with a scan of them per resource on top. Also prints the longest the event loop went without
running while the measurement ran.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from dr_bridge.config import config_from_dict
from dr_bridge.domain import Event, SignalInterval
from dr_bridge.eventlog import event_to_json
from dr_bridge.reporting import Reporter
from dr_bridge.store import EventRow, ReadingRow, Store


def build(stations: int, sessions: int) -> tuple[Reporter, Store, datetime, int]:
    d = tempfile.mkdtemp()
    cfg = config_from_dict({
        "bridge": {"database_url": f"sqlite:///{d}/bench.db"},
        "vtn": {"url": "http://127.0.0.1:9/OpenADR2/Simple/2.0b", "ven_name": "bench"},
        "chargestations": [{"id": f"st{i:05d}", "max_current": 32} for i in range(stations)]}, source="bench")
    store = Store.for_config(cfg)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    start, end = now - timedelta(minutes=35), now - timedelta(minutes=5)
    ev = Event("E1", 0, start, end, [SignalInterval("SIMPLE", "level", start, end, 2)])
    store.save_event(EventRow(event_id="E1", start=start, effective_start=start, end=end, status="completed",
                              modification_number=0, opt="optIn", event_json=event_to_json(ev)), [])
    rows, t = [], start - timedelta(minutes=30)
    while t <= end:
        rows += [dict(bridge="bench", at=t, session_id=f"s{i}-{k}", chargestation_id=f"st{i:05d}", power_kw=11.0)
                 for i in range(stations) for k in range(sessions)]
        t += timedelta(seconds=30)
    with store.engine.begin() as conn:
        conn.execute(sa.insert(ReadingRow.__table__), rows)
    return Reporter(cfg, store, ven=None), store, now, len(rows)


async def measure(reporter: Reporter, now: datetime) -> tuple[float, float]:
    """(seconds the measurement took, the longest gap between two turns of the event loop meanwhile)."""
    reporter.clock = lambda: now
    worst, done = 0.0, False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            worst, last = max(worst, time.perf_counter() - last), time.perf_counter()

    tick = asyncio.create_task(ticker())
    started = time.perf_counter()
    await reporter.measure()
    took = time.perf_counter() - started
    done = True
    await tick
    return took, worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stations", type=int, default=400)
    parser.add_argument("--sessions", type=int, default=5)
    args = parser.parse_args()
    reporter, store, now, readings = build(args.stations, args.sessions)
    took, worst = asyncio.run(measure(reporter, now))  # first: the baseline's objects would slow its GC
    started = time.perf_counter()
    loaded = store.readings_between([f"st{i:05d}" for i in range(args.stations)], now - timedelta(hours=2), now)
    ids = [{f"st{i:05d}"} for i in range(args.stations)]
    for one in ids:  # the per-resource scan the measurement used to do
        [r for r in loaded if r.chargestation_id in one]
    baseline = time.perf_counter() - started
    rows = len(store.performance("E1"))
    print(json.dumps({"stations": args.stations, "readings": readings, "performance_rows": rows,
                      "measure_s": round(took, 2), "baseline_orm_load_and_scan_s": round(baseline, 2),
                      "ratio": round(took / baseline, 2), "longest_loop_gap_ms": round(1000 * worst, 1)}))


if __name__ == "__main__":
    main()
