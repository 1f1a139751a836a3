"""Every benchmark in one command; prints a table and writes bench/results.json.

    python bench/run.py            # the full run (about 9 minutes on 2 cores)
    python bench/run.py --quick    # 1,000 sessions only, fewer mid-event sessions (about 3 minutes)
    python bench/run.py --show bench/results.json   # the table of an earlier run

Each figure comes from its own process: the eDRV simulator (bench/_simserver.py), the bridge
(bench/_bridge.py) and each bare loop (bench/_baseline.py), all over loopback. The targets are ratios to
baselines measured in the same run, since the machine is shared and absolute figures are noisy.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import aiohttp

from dr_bridge.localvtn import reserve_port

ROOT = Path(__file__).resolve().parent.parent
STATIONS = 2000
CONCURRENCY = 32  # the bridge's default [edrv] max_concurrency; every loop uses the same
REPEATS = 3  # runs of the bridge and of bare aiohttp per scenario (the median is kept)


def python(*args: str, timeout: float) -> dict:
    """Run `python -m bench.<module> ...` and parse its one JSON line."""
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


class Simulator:
    """The simulator process, its target file (base URL, key, station and session ids) and its admin API."""

    def __init__(self, workdir: Path, sessions: int, webhook_url: str | None = None) -> None:
        self.target = workdir / f"target-{sessions}.json"
        self.target.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench._simserver", "--stations", str(STATIONS), "--sessions", str(sessions),
               "--ready", str(self.target)] + (["--webhook-url", webhook_url] if webhook_url else [])
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        deadline = time.monotonic() + 120
        while not self.target.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("the simulator did not start")
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one call, but give the reader a whole one
        self.info = json.loads(self.target.read_text())
        self.admin = self.info["base_url"].rsplit("/v1.1", 1)[0]

    def latency(self, ms: float) -> None:
        asyncio.run(_post(f"{self.admin}/_admin/faults", {"latency_s": ms / 1000}))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _post(url: str, body: dict) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.post(url, json=body) as resp:
            resp.raise_for_status()


async def start_sessions(admin: str, station_ids: list[str], count: int, rate: float) -> None:
    """Start `count` sessions at `rate` per second (bounded in count and time), each one's session.started
    webhook going to the bridge. Every 7th station, so some join a busy station and re-share its budget."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        t0 = time.monotonic()
        for k in range(count):
            await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()))
            async with http.post(f"{admin}/_admin/sessions",
                                 json={"station_id": station_ids[(7 * k) % len(station_ids)]}) as resp:
                resp.raise_for_status()


def dispatch_rows(workdir: Path, sessions: int, latencies: list[int], transports: bool) -> list[dict]:
    rows = []
    sim = Simulator(workdir, sessions)
    try:
        for ms in latencies:
            sim.latency(ms)
            where = {"scenario": f"dispatch {sessions:,} sessions", "latency_ms": ms}
            # The bridge and bare aiohttp, which the targets compare, run REPEATS times in turn, and each row
            # is the median run: a slow spell of a shared machine then hits both, and not one run decides.
            bridge_runs, aiohttp_runs = [], []
            for _ in range(REPEATS):
                bridge_runs.append(_bridge_run(workdir, sim, where, "bridge", []))
                aiohttp_runs.append(_baseline_run(sim, where, "aiohttp", sessions))
            rows.append(_median(bridge_runs))
            # Diagnostic rows, one run each: the bridge with Python's garbage collector as it comes (`dr-bridge
            # run` tunes it), and with SQLite's synchronous=NORMAL, to show how much of the event log's cost is
            # its fsync per commit (the bridge ships with the default, FULL).
            rows.append(_bridge_run(workdir, sim, where, "bridge, Python's default GC", ["--default-gc"]))
            if transports:
                rows.append(_bridge_run(workdir, sim, where, "bridge, SQLite synchronous=NORMAL",
                                        ["--sqlite-synchronous", "NORMAL"]))
            rows.append(_median(aiohttp_runs))
            clients = ["httpx", "sequential"]
            if transports:
                clients += ["httpx-aiohttp", "httpx-aiohttptransport", "httpx-own-transport", "edrv-client"]
            rows += [_baseline_run(sim, where, client, sessions) for client in clients]
    finally:
        sim.stop()
    return rows


def _bridge_run(workdir: Path, sim: Simulator, where: dict, client: str, extra: list[str]) -> dict:
    bridge_dir = Path(tempfile.mkdtemp(dir=workdir))
    bridge = python("bench._bridge", "dispatch", "--target", str(sim.target), "--workdir", str(bridge_dir),
                    "--max-seconds", "400", *extra, timeout=500)
    return {**where, "client": client, "ok": bridge["acked"], "seconds": bridge["seconds"], "rps": bridge["rps"],
            "store_s": bridge["store_s"], "actions_recorded": bridge["actions_recorded"],
            "peak_rss_mb": bridge["peak_rss_mb"], "cpu_us_per_action": bridge["cpu_us_per_action"]}


def _baseline_run(sim: Simulator, where: dict, client: str, sessions: int) -> dict:
    seconds = "8" if client == "sequential" else "15"
    r = python("bench._baseline", client, "--target", str(sim.target), "--concurrency", str(CONCURRENCY),
               "--max-requests", str(sessions), "--max-seconds", seconds, timeout=120)
    return {**where, "client": client, "ok": r["ok"], "seconds": r["seconds"], "rps": r["rps"],
            "cpu_us_per_request": r["cpu_us_per_request"]}


def _median(runs: list[dict]) -> dict:
    """The run with the median rate, and every run's rate in the order they ran."""
    median = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
    return {**median, "runs_rps": [r["rps"] for r in runs]}


def midevent_rows(workdir: Path, count: int, latencies: list[int], rate: float) -> list[dict]:
    rows = []
    for ms in latencies:
        port = reserve_port("127.0.0.1")
        sim = Simulator(workdir, 1000, webhook_url=f"http://127.0.0.1:{port}/edrv/webhooks")
        try:
            sim.latency(ms)
            bridge_dir = Path(tempfile.mkdtemp(dir=workdir))
            ready = bridge_dir / "ready"
            proc = subprocess.Popen([sys.executable, "-m", "bench._bridge", "midevent", "--target", str(sim.target),
                                     "--workdir", str(bridge_dir), "--http-port", str(port), "--expect", str(count),
                                     "--ready", str(ready), "--max-seconds", str(count / rate + 60)],
                                    cwd=ROOT, stdout=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 180
                while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                if not ready.exists():
                    raise RuntimeError("the bridge did not get ready for the mid-event sessions")
                asyncio.run(start_sessions(sim.admin, sim.info["stations"], count, rate))
                out, _ = proc.communicate(timeout=count / rate + 120)
            finally:
                if proc.poll() is None:
                    proc.kill()
            r = json.loads(out.strip().splitlines()[-1])
            rows.append({"scenario": f"session starting mid-event ({count:,} at {rate:g}/s)", "latency_ms": ms,
                         "client": "bridge", **r})
        finally:
            sim.stop()
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    """The issue's targets, each judged against the baselines of the same scenario in this run."""
    def rps(scenario: str, ms: int, client: str) -> float | None:
        return next((r["rps"] for r in rows if r["scenario"] == scenario and r["latency_ms"] == ms
                     and r["client"] == client), None)

    out = []
    for scenario in dict.fromkeys(r["scenario"] for r in rows if r["scenario"].startswith("dispatch")):
        for ms, against, need in ((0, "aiohttp", 0.5), (20, "aiohttp", 0.8), (20, "sequential", 20.0)):
            bridge, base = rps(scenario, ms, "bridge"), rps(scenario, ms, against)
            if bridge is not None and base:
                ratio = bridge / base
                out.append({"target": f"{scenario}, {ms} ms: bridge / {against} >= {need:g}",
                            "value": round(ratio, 2), "met": ratio >= need})
    for r in rows:
        if r["scenario"].startswith("session starting"):
            out.append({"target": f"mid-event session, {r['latency_ms']} ms: p99 < 200 ms",
                        "value": r["p99_ms"], "met": r["p99_ms"] < 200 and r["limited"] == r["started"]})
        if r["client"] == "bridge" and r["scenario"] == "dispatch 10,000 sessions" and r["latency_ms"] == 0:
            out.append({"target": "bridge peak RSS with 10,000 live sessions < 300 MB", "value": r["peak_rss_mb"],
                        "met": r["peak_rss_mb"] < 300})
    return out


def table(rows: list[dict], judged: list[dict]) -> str:
    lines = ["| scenario | latency | client | requests ok | seconds | req/s | vs aiohttp | notes |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "rps" in r:
            base = next((x["rps"] for x in rows if x["scenario"] == r["scenario"]
                         and x["latency_ms"] == r["latency_ms"] and x["client"] == "aiohttp"), None)
            notes = [f"CPU {r['cpu_us_per_request']} µs/request"] if "cpu_us_per_request" in r else []
            if r["ok"] < int(r["scenario"].split()[1].replace(",", "")):
                notes.append("stopped at its time bound")
            if "runs_rps" in r:
                notes.append(f"median of {len(r['runs_rps'])} runs: " + " / ".join(f"{x:,.0f}" for x in r["runs_rps"])
                             + " req/s")
            notes = "; ".join(notes)
            if r["client"].startswith("bridge"):
                cpu = f"CPU {r['cpu_us_per_action']} µs/action, " if "cpu_us_per_action" in r else ""
                notes = (f"{cpu}event log {r['store_s']:.1f} s ({1000 * r['store_s'] / max(1, r['ok']):.1f} "
                         f"ms/action), {r['actions_recorded']:,} actions recorded, peak RSS {r['peak_rss_mb']:.0f} MB"
                         + (f"; {notes}" if notes else ""))
            lines.append(f"| {r['scenario']} | {r['latency_ms']} ms | {r['client']} | {r['ok']:,} | {r['seconds']:.2f} "
                         f"| {r['rps']:,.0f} | {r['rps'] / base:.2f} | {notes} |" if base else "")
        else:
            lines.append(f"| {r['scenario']} | {r['latency_ms']} ms | bridge | {r['limited']:,} of {r['started']:,} "
                         f"| | | | webhook received → limit sent: p50 {r['p50_ms']} ms, **p99 {r['p99_ms']} ms**, "
                         f"max {r['max_ms']} ms ({r['ahead']} already sent); session start → limit sent: "
                         f"p50 {r['start_p50_ms']} ms, p99 {r['start_p99_ms']} ms |")
    lines += ["", "| target | value | met |", "|---|---:|---|"]
    lines += [f"| {v['target']} | {v['value']} | {'yes' if v['met'] else 'no'} |" for v in judged]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 sessions only; 200 mid-event sessions")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--show", metavar="RESULTS", help="print the table of an earlier results.json and exit")
    args = parser.parse_args()
    if args.show:
        saved = json.loads(Path(args.show).read_text())
        print(table(saved["rows"], saved["targets"]))
        return
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dr-bridge-bench-") as tmp:
        workdir = Path(tmp)
        rows = dispatch_rows(workdir, 1000, [0, 20], transports=True)
        if not args.quick:
            rows += dispatch_rows(workdir, 10_000, [0, 20], transports=False)
        rows += midevent_rows(workdir, 200 if args.quick else 1000, [0, 20], rate=10)
    judged = verdicts(rows)
    result = {"at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick,
              "machine": f"{platform.python_implementation()} {platform.python_version()}, "
                         f"{platform.machine()}, {_cores()} cores",
              "stations": STATIONS, "concurrency": CONCURRENCY,
              "minutes": round((time.monotonic() - started) / 60, 1), "rows": rows, "targets": judged}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(rows, judged))
    print(f"\n{result['minutes']} min; written to {args.out}")


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    main()
