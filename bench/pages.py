"""How fast the event-log pages load for an event with 10,000 actions.

    python bench/pages.py [--actions 10000] [--events 500] [--runs 15] [--out test-artifacts/bench/pages.json]

Builds the event log through the Store API on a temporary SQLite database (one big event: 200 resources x 25
sessions, each limited and restored, with 2-minute readings; plus small events for the list), serves the
pages with the token on (the daemon's code path: pages.mount behind pages.token_middleware) on loopback,
and times whole HTTP requests from a client. The baseline is a trivial page measured in the same run (a
small static file through the same middleware), so the ratio holds on a slower machine. Target: the list
and the detail page under 200 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import sqlalchemy as sa
from aiohttp import web

from dr_bridge import pages
from dr_bridge.config import config_from_dict
from dr_bridge.store import ActionRow, EventRow, IntervalRow, PerformanceRow, ReadingRow, Store

TOKEN = "bench-token"
TARGET_MS = 200
START = datetime(2026, 11, 25, 17, 0, tzinfo=timezone.utc)
EVENT_ID = "EVT-BIG-10000"


def build(db: Path, n_actions: int, n_events: int) -> tuple[Store, dict]:
    store = Store.open(f"sqlite:///{db}")
    resources, per = 200, max(1, n_actions // 400)  # each session: one limit, one restore
    stations = [{"id": f"CS-{r:03d}", "resource_id": f"depot-{r:03d}", "max_current": 32} for r in range(resources)]
    end = START + timedelta(hours=1)
    store.save_event(EventRow(event_id=EVENT_ID, ven_id="VEN", status="completed", opt="optIn", start=START,
                              end=end, effective_start=START),
                     [IntervalRow(event_id=EVENT_ID, start=START, end=START + timedelta(minutes=30),
                                  signal_name="SIMPLE", signal_type="level", value=1),
                      IntervalRow(event_id=EVENT_ID, start=START + timedelta(minutes=30), end=end,
                                  signal_name="SIMPLE", signal_type="level", value=2)])
    actions, readings = [], []
    for r, st in enumerate(stations):
        for k in range(per):
            sid = f"{r:04x}{k:020x}"
            common = dict(event_id=EVENT_ID, session_id=sid, chargestation_id=st["id"], resource_id=st["resource_id"])
            refused = (r * per + k) % 97 == 0
            actions.append(dict(common, at=START + timedelta(milliseconds=5 * k), kind="set_power_limit",
                                purpose="limit", unit="current", limit=round(24 / per, 1),
                                status="rejected" if refused else "accepted", attempts=4 if refused else 1,
                                detail="station refused the limit" if refused else ""))
            actions.append(dict(common, at=end + timedelta(milliseconds=5 * k), kind="clear_power_limit",
                                purpose="restore", status="accepted", attempts=1, detail=""))
            for m in range(-15, 61, 2):
                kw = 22.0 / per if m < 0 or m >= 60 else 16.5 / per
                readings.append(dict(at=START + timedelta(minutes=m, seconds=k % 60), session_id=sid,
                                     chargestation_id=st["id"], power_kw=kw))
    perf = [PerformanceRow(event_id=EVENT_ID, resource_id=st["resource_id"], signal_name="SIMPLE",
                           signal_type="level", interval_start=START, window_start=START,
                           window_end=START + timedelta(minutes=30), baseline_kw=22.0, mean_kw=16.5,
                           reduction_kw=5.5, reduction_pct=25.0, requested_kw=16.56) for st in stations]
    with store.session() as s:  # the Store's session: bulk inserts, or building the log takes minutes
        s.execute(sa.insert(ActionRow), actions)
        s.execute(sa.insert(ReadingRow), readings)
        s.execute(sa.insert(EventRow), [dict(event_id=f"EVT-{i:05d}", ven_id="VEN", status="completed",
                                             opt="optIn", start=START - timedelta(days=i + 1),
                                             end=START - timedelta(days=i + 1) + timedelta(hours=1),
                                             effective_start=START - timedelta(days=i + 1), event_json="{}",
                                             received_at=START - timedelta(days=i + 2),
                                             updated_at=START) for i in range(n_events)])
        s.commit()
    store.save_performance(EVENT_ID, perf)
    cfg = {"vtn": {"url": "http://127.0.0.1:1/OpenADR2/Simple/2.0b", "ven_name": "bench"},
           "http": {"token_env": "DR_BRIDGE_BENCH_TOKEN"}, "chargestations": stations}
    return store, cfg


def serve(store: Store, cfg) -> tuple[int, callable]:
    """The pages on a loopback port, in their own thread and loop, as the daemon serves them."""
    app = web.Application(middlewares=[pages.token_middleware(TOKEN, True, {"/healthz"})])
    pages.mount(app, lambda: store, config_from_dict(cfg, source="bench"))
    ready, box = threading.Event(), {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        box["port"], box["loop"] = site._server.sockets[0].getsockname()[1], loop
        ready.set()
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    ready.wait(10)
    return box["port"], lambda: box["loop"].call_soon_threadsafe(box["loop"].stop)


def measure(client: httpx.Client, path: str, runs: int) -> dict:
    for _ in range(2):  # warm: first-request imports and SQLite's page cache
        client.get(path).raise_for_status()
    times, size = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        r = client.get(path)
        times.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
        size = len(r.content)
    times.sort()
    return {"path": path, "median_ms": round(statistics.median(times), 1),
            "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 1), "max_ms": round(times[-1], 1),
            "bytes": size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actions", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=500, help="small events besides the big one, for the list")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", default="test-artifacts/bench/pages.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        store, cfg = build(Path(tmp) / "bench.db", args.actions, args.events)
        built_s = time.perf_counter() - t
        port, stop = serve(store, cfg)
        ev = f"/events/{EVENT_ID}"
        cases = [("baseline: a small static file", "/static/pages.css"),
                 ("events list", "/events"),
                 ("events list, filtered by resource", "/events?resource=depot-007"),
                 ("event detail page", ev),
                 ("event detail, last page", ev + "?page=10"),
                 ("chart data (JSON)", ev + "/chart.json"),
                 ("export CSV", ev + "/export.csv")]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=60) as client:
            results = [{"case": name, **measure(client, path, args.runs)} for name, path in cases]
        stop()
        store.close()

    base = results[0]["median_ms"]
    for r in results:
        r["ratio"] = round(r["median_ms"] / base, 1)
    print(f"event log: {args.actions} actions in one event, {args.events + 1} events; built in {built_s:.1f} s; "
          f"{args.runs} requests each, python {sys.version.split()[0]}")
    print(f"{'case':36} {'median ms':>10} {'p95 ms':>8} {'max ms':>8} {'x base':>7} {'kB':>7}")
    for r in results:
        print(f"{r['case']:36} {r['median_ms']:>10} {r['p95_ms']:>8} {r['max_ms']:>8} {r['ratio']:>7} "
              f"{r['bytes'] / 1024:>7.0f}")
    gated = [r for r in results if r["case"] in ("events list", "event detail page")]
    ok = all(r["median_ms"] < TARGET_MS for r in gated)
    print(f"target: list and detail pages under {TARGET_MS} ms (median): {'met' if ok else 'NOT met'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"actions": args.actions, "events": args.events + 1, "runs": args.runs,
                               "target_ms": TARGET_MS, "target_met": ok, "results": results}, indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
