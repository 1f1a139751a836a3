"""The `dr-bridge` command line. Each command is thin: it loads config and calls one module.

Exit codes: 0 ok, 2 bad usage or config, 1 anything else; errors are one line on stderr (`--debug` for
the traceback).
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import List, Optional

import typer
from rich.console import Console

from dr_bridge.checkconfig import check_config_command, config_warnings
from dr_bridge.config import Config, ConfigError, load_config
from dr_bridge.edrv.simulator_cli import simulate_edrv

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="OpenADR 2.0b VEN that applies utility demand-response events to eDRV charging sessions.")
events_app = typer.Typer(no_args_is_help=True, help="Review the event log.")
app.add_typer(events_app, name="events")
app.command("check-config", help="Validate a config file offline and print stations and the level table.")(
    check_config_command)
app.command("simulate-edrv", help="Run the eDRV simulator: a local stand-in for the eDRV API, for rehearsals.")(
    simulate_edrv)

err = Console(stderr=True, soft_wrap=True)  # an error is one line, even in a narrow or piped stderr
ConfigOpt = typer.Option(..., "--config", "-c", help="The dr-bridge TOML config file.")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks and debug logs.")


def fail(message: str, code: int = 1) -> None:
    err.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(code)


def setup_logging(debug: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ")
    logging.Formatter.converter = __import__("time").gmtime
    for noisy in ("openleadr", "apscheduler", "httpx", "aiohttp.access", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)


def config_or_exit(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(str(exc), 2)


def open_store(cfg: Config):
    from dr_bridge.store import Store

    try:
        return Store.for_config(cfg)
    except Exception as exc:  # one line: which database, what went wrong
        fail(f"cannot open the database ({exc.__class__.__name__}: {str(exc).splitlines()[0]})")


def api_key_or_exit(cfg: Config) -> str:
    key = cfg.api_key()
    if not key:
        fail(f"environment variable {cfg.edrv.api_key_env} is not set (the eDRV API key; "
             f"edrv.api_key_env in {cfg.path})", 2)
    return key


@app.command("run", help="Run the daemon: OpenADR VEN, scheduler, eDRV client and HTTP server.")
def run_command(config: str = ConfigOpt,
                dry_run: bool = typer.Option(False, "--dry-run", help="Plan and log, never call eDRV."),
                restore_on_exit: bool = typer.Option(False, "--restore-on-exit",
                                                     help="On SIGTERM/SIGINT restore every limited session first."),
                debug: bool = DebugOpt) -> None:
    cfg = config_or_exit(config)
    api_key = api_key_or_exit(cfg)
    if cfg.edrv.webhook_secret_env and not cfg.webhook_secret():
        # Started without it, the bridge would take unsigned webhooks from anyone who can reach it.
        fail(f"environment variable {cfg.edrv.webhook_secret_env} is not set (the eDRV webhook secret; "
             f"edrv.webhook_secret_env in {cfg.path})", 2)
    setup_logging(debug)
    for where, problem in config_warnings(cfg):  # those fatal to `run` have stopped it above
        logging.getLogger("dr_bridge").warning("config: %s (%s in %s)", problem, where, cfg.path)
    from dr_bridge.daemon import AlreadyRunning, StationConflict, run_daemon

    try:
        code = asyncio.run(run_daemon(cfg, api_key, dry_run=dry_run, restore_on_exit=restore_on_exit))
    except (StationConflict, AlreadyRunning) as exc:
        fail(str(exc), 2)
    raise typer.Exit(code)


@app.command("release-all", help="Emergency: restore every session the bridge still limits, and opt out of every "
                                  "live event so that it holds (the running bridge, or the next start, tells the "
                                  "VTN; no VTN needed here).")
def release_all_command(config: str = ConfigOpt, debug: bool = DebugOpt) -> None:
    cfg = config_or_exit(config)
    api_key = api_key_or_exit(cfg)
    setup_logging(debug)
    from dr_bridge.release import release_all

    left = asyncio.run(release_all(cfg, api_key, Console()))
    raise typer.Exit(1 if left else 0)


@app.command("retire", help="Take this bridge out of service: release its station claims, so that another "
                             "bridge on the database may take its stations. Refused while it runs, still "
                             "limits a session or owes an event.")
def retire_command(config: str = ConfigOpt, debug: bool = DebugOpt) -> None:
    from dr_bridge.retire import RetireError, retire

    cfg = config_or_exit(config)
    store = open_store(cfg)
    try:
        message = retire(cfg, store)
    except RetireError as exc:
        fail(str(exc))
    finally:
        store.close()
    Console().print(message, markup=False, highlight=False)


@events_app.command("list", help="List events, newest last.")
def events_list(config: str = ConfigOpt, as_json: bool = typer.Option(False, "--json"),
                since: Optional[str] = typer.Option(None, "--since", help="ISO time: events ending after it."),
                status: Optional[str] = typer.Option(None, "--status", help="pending|active|completed|cancelled"),
                resource: Optional[str] = typer.Option(None, "--resource", help="Only events touching it.")) -> None:
    from dr_bridge import views
    from dr_bridge.domain import ACTIVE, CANCELLED, COMPLETED, PENDING
    from dr_bridge.eventlog import list_events, parse_iso

    statuses = (PENDING, ACTIVE, COMPLETED, CANCELLED)

    cfg = config_or_exit(config)
    try:
        since_dt = parse_iso(since)
    except ValueError:
        fail(f"--since: not an ISO 8601 time: {since!r}", 2)
    if status is not None and status not in statuses:
        fail(f"--status: {status!r} is not one of {', '.join(statuses)}", 2)  # not an empty list
    store = open_store(cfg)
    rows = list_events(store, since=since_dt, status=status, resource=resource, stations=cfg.stations())
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        views.print_event_list(views.console(), rows)


@events_app.command("show", help="One event: intervals, a timeline of every action and its outcome, opt-outs "
                                 "and restores, and the measured reduction.")
def events_show(event_id: str, config: str = ConfigOpt, as_json: bool = typer.Option(False, "--json"),
                all_rows: bool = typer.Option(False, "--all", help="The whole timeline, however long (a long one "
                                              "is otherwise cut short, the refused or failed calls listed after).")
                ) -> None:
    from dr_bridge import views
    from dr_bridge.eventlog import event_detail

    cfg = config_or_exit(config)
    detail = event_detail(open_store(cfg), event_id)
    if detail is None:
        fail(f"no event {event_id!r} in the event log")
    if as_json:
        print(json.dumps(detail, indent=2))
    else:
        views.print_event_detail(views.console(), detail, all_rows=all_rows)


@events_app.command("export", help="One event for auditors: csv (one row per action) or json (as show --json).")
def events_export(event_id: str, config: str = ConfigOpt,
                  fmt: str = typer.Option(..., "--format", help="csv or json")) -> None:
    from dr_bridge.eventlog import actions_csv, event_detail

    if fmt not in ("csv", "json"):
        fail(f"--format: {fmt!r} is not csv or json", 2)
    cfg = config_or_exit(config)
    detail = event_detail(open_store(cfg), event_id)
    if detail is None:
        fail(f"no event {event_id!r} in the event log")
    sys.stdout.write(actions_csv(detail) if fmt == "csv" else json.dumps(detail, indent=2) + "\n")


@app.command("opt-out", help="Opt resources (or a whole event) out, or declare them unavailable for a while; "
                              "a running daemon acts on it within 5 s and reports it to the VTN.")
def opt_out_command(event_id: Optional[str] = typer.Argument(None, help="The event; or give --from/--until."),
                    config: str = ConfigOpt,
                    resource: List[str] = typer.Option([], "--resource", help="A resource_id; repeat for more. "
                                                       "None: the whole event (or every resource)."),
                    from_: Optional[str] = typer.Option(None, "--from", help="ISO time: unavailable from."),
                    until: Optional[str] = typer.Option(None, "--until", help="ISO time: unavailable until."),
                    reason: Optional[str] = typer.Option(None, "--reason", help="An OpenADR opt reason "
                                                         "(overrideStatus, notParticipating, ...) or free text."),
                    debug: bool = DebugOpt) -> None:
    from dr_bridge.eventlog import parse_iso
    from dr_bridge.optout import OptOutError, declare_unavailable, opt_out_of_event

    cfg = config_or_exit(config)
    window = from_ is not None or until is not None
    if (event_id is None) == (not window) or (window and (from_ is None or until is None)):
        fail("give exactly one of EVENT_ID or the --from/--until window (both --from and --until)", 2)
    try:
        start, end = parse_iso(from_), parse_iso(until)
    except ValueError:
        fail("--from/--until: not ISO 8601 times (e.g. 2026-11-25T17:00:00Z)", 2)
    store = open_store(cfg)
    try:
        if event_id is not None:
            message = opt_out_of_event(cfg, store, event_id, resource, reason)
        else:
            message = declare_unavailable(cfg, store, resource, start, end, reason)
    except OptOutError as exc:
        fail(str(exc), exc.code)
    finally:
        store.close()
    Console().print(message, markup=False, highlight=False)


@app.command("demo", help="A full event against a local VTN and the eDRV simulator, in under a minute.")
def demo_command(keep_running: bool = typer.Option(False, "--keep-running",
                                                   help="Keep the simulator and bridge up after the event."),
                 debug: bool = DebugOpt) -> None:
    from dr_bridge.demo import run_demo

    from dr_bridge.views import console

    raise typer.Exit(asyncio.run(run_demo(console(), keep_running=keep_running, debug=debug)))


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # the promise: one clear line, the traceback only with --debug
        if debug:
            raise
        first = (str(exc).splitlines() or [""])[0]  # a driver's error can run to several lines
        err.print(f"error: {exc.__class__.__name__}: {first}", markup=False, highlight=False)
        sys.exit(1)
