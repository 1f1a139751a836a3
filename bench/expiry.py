"""How long the event loop stalls when many limit calls go unanswered at once.

    python bench/expiry.py [--sessions 1000 10000] [--out test-artifacts/bench/expiry.json]

When eDRV's outcome webhooks stop during a large event, every call in flight passes its action_timeout_s
together. The engine's check (Engine._expire_unanswered, the daemon's code) marks each one unanswered and
has it re-sent once. Measured here on a temporary SQLite event log: the longest stall of the event loop while the check
runs (a 1 ms ticker on the same loop), and the time until every row reads "unanswered". The baseline, in the
same run, is one ORM commit per row on the loop (Store.update_action), which is how the check wrote them
before. Target: no stall over 200 ms, so webhooks and the VTN are still answered meanwhile.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from dr_bridge.config import config_from_dict
from dr_bridge.engine import Engine
from dr_bridge.store import Store

TIMEOUT_S = 1


def _engine(workdir: Path) -> Engine:
    cfg = config_from_dict({
        "bridge": {"database_url": f"sqlite:///{workdir / 'bridge.db'}"},
        "vtn": {"url": "http://127.0.0.1:9/OpenADR2/Simple/2.0b", "ven_name": "bench"},
        "edrv": {"action_timeout_s": TIMEOUT_S},
        "levels": {"1": {"fraction": 0.5}},
        "chargestations": [{"id": "cs-1", "max_current": 32}],
    }, source="bench")
    return Engine(cfg, Store.open(cfg.bridge.database_url, bridge="bench"), client=None)


async def _requested(engine: Engine, n: int) -> list[int]:
    row = dict(event_id="E1", chargestation_id="cs-1", resource_id="cs-1", kind="set_power_limit",
               purpose="limit", unit="current", limit=16.0, status="requested", detail="")
    ids = await engine.journal.write(*(("add_action", {**row, "session_id": f"S{i}"}, {}) for i in range(n)))
    await asyncio.sleep(TIMEOUT_S + 0.1)  # all past their timeout
    return ids


async def _stall(work) -> tuple[float, float]:
    """(longest gap between 1 ms ticks while `work` runs, seconds until it is done), both in ms."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    await work()
    done = time.perf_counter() - started
    stop.set()
    await ticker
    return round(1000 * max(gaps), 1), round(1000 * done, 1)


async def measure(n: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engine = _engine(Path(tmp))
        ids = await _requested(engine, n)

        async def one_commit_each() -> None:
            for action_id in ids:
                engine.store.update_action(action_id, status="failed", detail="no outcome")

        stall, done = await _stall(one_commit_each)
        rows.append({"sessions": n, "path": "one ORM commit per row (before)", "stall_ms": stall, "done_ms": done})

        ids = await _requested(engine, n)

        async def engine_check() -> None:
            await engine._expire_unanswered()
            await engine.journal.flush()

        stall, done = await _stall(engine_check)
        failed = engine.store.action_counts().get("unanswered", 0)
        rows.append({"sessions": n, "path": "Engine._expire_unanswered (group commit)", "stall_ms": stall,
                     "done_ms": done, "failed_rows": failed})
        engine.store.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--out", default="test-artifacts/bench/expiry.json")
    args = parser.parse_args()
    rows = [r for n in args.sessions for r in asyncio.run(measure(n))]
    print("| unanswered calls | path | longest loop stall | all marked failed after | vs before |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        base = next(b for b in rows if b["sessions"] == r["sessions"])
        print(f"| {r['sessions']:,} | {r['path']} | {r['stall_ms']:,.1f} ms | {r['done_ms']:,.1f} ms "
              f"| {r['stall_ms'] / base['stall_ms']:.3f} |")
    for r in rows:
        if "failed_rows" in r:
            print(f"target: {r['sessions']:,} unanswered, longest stall < 200 ms: {r['stall_ms']:.1f} ms, "
                  f"{'met' if r['stall_ms'] < 200 else 'missed'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
