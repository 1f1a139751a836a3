"""The eDRV simulator in its own process, so its CPU does not count against the client being measured.

    python -m bench._simserver --stations 2000 --sessions 10000 --ready FILE [--webhook-url URL]

Writes {"base_url", "api_key", "stations", "sessions"} to FILE once it listens, then serves until SIGTERM.
Latency is changed at run time through the simulator's own /_admin/faults, so one instance serves every
client of a scenario.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from pathlib import Path

from dr_bridge.edrv.simulator import EdrvSimulator

API_KEY = "bench-key"


async def serve(args: argparse.Namespace) -> None:
    # EV power reports every hour rather than every 5 s: 10,000 session.updated webhooks per tick would
    # measure webhook ingestion, not dispatch.
    sim = EdrvSimulator(API_KEY, webhook_url=args.webhook_url, seed=1, report_interval_s=3600,
                        page_size_max=1000)
    per_station = -(-args.sessions // max(1, args.stations))
    stations = [sim.add_station(connectors=per_station + 2) for _ in range(args.stations)]
    sessions = [sim.start_session(stations[i % len(stations)], send_webhook=False) for i in range(args.sessions)]
    base_url = await sim.start("127.0.0.1", 0)
    Path(args.ready).write_text(json.dumps({"base_url": base_url, "api_key": API_KEY, "stations": stations,
                                            "sessions": sessions}))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stations", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--webhook-url", default=None)
    parser.add_argument("--ready", required=True)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
