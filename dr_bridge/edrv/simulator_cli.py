"""`dr-bridge simulate-edrv`: run the eDRV simulator as a server, for rehearsals against a real bridge."""
from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import tomllib
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from dr_bridge.edrv.simulator import EdrvSimulator


class Naming(str, enum.Enum):
    accepted = "accepted"
    completed = "completed"


def _read_config(path: Path) -> dict[str, Any]:
    # tomllib directly: the simulator must start even when the config would fail the bridge's stricter checks
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint="--config") from None


def _webhook_url_from(config: dict[str, Any]) -> str | None:
    http = config.get("http")
    if not isinstance(http, dict):
        return None
    host = str(http.get("host", "127.0.0.1"))
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{http.get('port', 8090)}{http.get('webhook_path', '/edrv/webhooks')}"


def _populate(sim: EdrvSimulator, config: dict[str, Any] | None, stations: int, sim_stations: int,
              sessions_per_station: int, naming: str) -> None:
    connectors = max(2, sessions_per_station)
    if config is not None:
        for entry in config.get("chargestations") or []:
            sim.add_station(str(entry["id"]), simulator=bool(entry.get("simulator", False)),
                            max_current=entry.get("max_current", 32), phases=entry.get("phases", 3),
                            voltage=entry.get("voltage", 230), connectors=connectors, naming=naming)
    else:
        for _ in range(stations):
            sim.add_station(connectors=connectors, naming=naming)
        for _ in range(sim_stations):
            sim.add_station(simulator=True, connectors=connectors, naming=naming)
    for station_id in sim.station_ids():
        for _ in range(sessions_per_station):
            sim.start_session(station_id, send_webhook=False)


def _show(console: Console, sim: EdrvSimulator) -> None:
    table = Table(title="eDRV simulator")
    for column in ("chargestation", "kind", "max A", "session", "power kW"):
        table.add_column(column, overflow="fold")
    for station_id in sim.station_ids():
        station = sim.station_info(station_id)
        kind = "simulator" if station["simulator"] else "physical"
        sessions = sim.session_ids(station_id) or ["-"]
        for session_id in sessions:
            power = f"{sim.session_power_kw(session_id):.2f}" if session_id != "-" else "-"
            table.add_row(station_id, kind, f"{station['max_current']:g}", session_id, power)
    console.print(table)


async def _serve(sim: EdrvSimulator, host: str, port: int, console: Console) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    base_url = await sim.start(host, port)
    console.print(f"eDRV simulator listening: [bold]{base_url}[/bold]  (admin API under /_admin, no auth)")
    _show(console, sim)
    try:
        await stop.wait()
    finally:
        await sim.stop()
    console.print("eDRV simulator stopped")


def simulate_edrv(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. The /_admin API has no auth: "
                             "keep it on loopback unless the network is trusted."),
    port: int = typer.Option(8099, "--port", help="TCP port to listen on (0 picks a free one)."),
    api_key_env: str = typer.Option("EDRV_API_KEY", "--api-key-env",
                                    help="Environment variable holding the bearer key clients must send; "
                                         "when unset the key is 'sim-key'."),
    webhook_url: str | None = typer.Option(None, "--webhook-url",
                                           help="Where to POST webhooks. Default: the http section of "
                                                "--config, else no webhooks are delivered."),
    webhook_secret_env: str | None = typer.Option(None, "--webhook-secret-env",
                                                  help="Environment variable with the secret used to sign "
                                                       "webhooks (edrv-signature: t=...,v1=...)."),
    config: Path | None = typer.Option(None, "--config", exists=True, dir_okay=False,
                                       help="dr-bridge TOML config: create its chargestations (id, "
                                            "max_current, phases, voltage, simulator)."),
    stations: int = typer.Option(2, "--stations", min=0, help="Physical stations to create (without --config)."),
    sim_stations: int = typer.Option(1, "--sim-stations", min=0,
                                     help="eDRV simulator stations (current only, no clear) to create "
                                          "(without --config)."),
    sessions_per_station: int = typer.Option(1, "--sessions-per-station", min=0,
                                             help="Charging sessions started on each station at launch."),
    seed: int = typer.Option(0, "--seed", help="Seed for ids, EV reaction jitter and injected faults."),
    naming: Naming = typer.Option(Naming.accepted, "--naming",
                                  help="Outcome webhook names: .accepted/.rejected or .completed/.failed."),
    latency: float = typer.Option(0.0, "--latency", min=0, help="Seconds added to every API response."),
    error_rate: float = typer.Option(0.0, "--error-rate", min=0, max=1,
                                     help="Share of API requests answered 503."),
    rate_limit_rate: float = typer.Option(0.0, "--rate-limit-rate", min=0, max=1,
                                          help="Share of API requests answered 429 with Retry-After."),
    drop_webhook_rate: float = typer.Option(0.0, "--drop-webhook-rate", min=0, max=1,
                                            help="Share of webhooks silently not delivered."),
    page_size_max: int = typer.Option(1000, "--page-size-max", min=1,
                                      help="The most items a listing returns per page, whatever is asked."),
) -> None:
    """Run the eDRV simulator until Ctrl-C or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = Console()
    settings = _read_config(config) if config else None
    api_key = os.environ.get(api_key_env)
    if not api_key:
        api_key = "sim-key"
        console.print(f"{api_key_env} is not set: clients must send the key 'sim-key'")
    if webhook_url is None and settings is not None:
        webhook_url = _webhook_url_from(settings)
    if webhook_secret_env is None and settings is not None:
        webhook_secret_env = (settings.get("edrv") or {}).get("webhook_secret_env") or None
    secret = os.environ.get(webhook_secret_env) if webhook_secret_env else None
    if webhook_secret_env and not secret:
        console.print(f"{webhook_secret_env} is not set: webhooks go out unsigned")
    sim = EdrvSimulator(api_key, webhook_url=webhook_url, webhook_secret=secret, seed=seed,
                        page_size_max=page_size_max)
    sim.faults.update(latency_s=latency, error_rate=error_rate, rate_limit_rate=rate_limit_rate,
                      drop_webhook_rate=drop_webhook_rate)
    try:
        _populate(sim, settings, stations, sim_stations, sessions_per_station, naming.value)
    except (KeyError, TypeError, ValueError) as exc:
        raise typer.BadParameter(f"cannot create stations: {exc}", param_hint="--config") from None
    if webhook_url:
        console.print(f"webhooks go to {webhook_url}")
    asyncio.run(_serve(sim, host, port, console))
