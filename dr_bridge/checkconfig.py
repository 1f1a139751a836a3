"""`dr-bridge check-config`: validate a config offline and show what each level would do to each station.

The level table is the operator's preview of an event: it answers "what will level 2 do to depot-north-01?"
before a utility ever sends one. It computes the station budget (one session's share); how several sessions
split it is the policy's job at run time.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import NoReturn

import typer
from rich import box
from sqlalchemy.engine import url as sa_url
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dr_bridge.config import Config, ConfigError, LevelSetting, StationConfig, load_config


def check_config_command(config: str = typer.Option(..., "--config", help="The TOML config file."),
                         strict: bool = typer.Option(False, "--strict",
                                                     help="Treat warnings (e.g. an unset API-key variable) as errors.")):
    try:
        cfg = load_config(config)
    except ConfigError as error:
        _fail(str(error))

    for key, problem in config_warnings(cfg) + webhook_warnings(cfg):
        if strict:
            _fail(f"{config}: {key}: {problem}")
        typer.echo(f"warning: {problem} ({key} in {config})", err=True)

    # A fixed width when piped keeps the output identical in logs, CI and tests.
    console = Console(width=None if sys.stdout.isatty() else 100, highlight=False)
    console.print(settings_table(cfg))
    console.print(stations_table(cfg))
    console.print(levels_table(cfg))
    console.print("config OK")


def config_warnings(cfg: Config) -> list[tuple[str, str]]:
    """Things that are valid in the file but will hurt at run time; --strict makes them errors."""
    warnings: list[tuple[str, str]] = []
    if cfg.api_key() is None:
        warnings.append(("edrv.api_key_env", f"environment variable {cfg.edrv.api_key_env} is not set; "
                                             "dr-bridge run will refuse to start without the eDRV API key"))
    if cfg.edrv.webhook_secret_env and cfg.webhook_secret() is None:
        warnings.append(("edrv.webhook_secret_env", f"environment variable {cfg.edrv.webhook_secret_env} "
                                                    "is not set; dr-bridge run will refuse to start without "
                                                    "the webhook secret"))
    if cfg.http.token_env and cfg.http_token() is None:
        warnings.append(("http.token_env", f"environment variable {cfg.http.token_env} is not set; "
                                           "the event-log pages cannot be opened"))
    for key in ("cert", "key", "ca_file"):
        file = getattr(cfg.vtn, key)
        if file and not Path(file).is_file():
            warnings.append((f"vtn.{key}", f"file {file} does not exist"))
    if cfg.edrv.max_retry_after_s > 120:
        warnings.append(("edrv.max_retry_after_s",
                         f"{_num(cfg.edrv.max_retry_after_s)} s: a restore eDRV rate-limits (429) after an event "
                         "may wait this long each time, and its session stays limited meanwhile"))
    # A level above every configured one takes the strictest rule below it; a level below them all has
    # none to take, so an event at that level is answered optOut: a utility penalty, not a config error.
    uncovered = [level for level in (1, 2, 3) if not any(1 <= lvl <= level for lvl in cfg.levels)]
    if uncovered:
        names = ", ".join(str(level) for level in uncovered)
        which = "that level" if len(uncovered) == 1 else "these levels"
        warnings.append(("levels", f"no rule at or below level {names} ([levels] replaces the defaults as a "
                                   f"whole): an event at {which} is answered optOut"))
    for index, station in enumerate(cfg.chargestations):
        if station.max_current < cfg.bridge.min_current:
            warnings.append((f"chargestations[{index}].max_current",
                             f"{_num(station.max_current)} A is below bridge.min_current "
                             f"{_num(cfg.bridge.min_current)} A; every limit will follow below_min"))
    located = [index for index, station in enumerate(cfg.chargestations) if station.locations]
    if located and len(located) < len(cfg.chargestations):
        index = next(i for i in range(len(cfg.chargestations)) if i not in located)
        warnings.append((f"chargestations[{index}].locations",
                         f"station {cfg.chargestations[index].id} names no location while others do: an event "
                         "targeted at a location never selects it"))
    return warnings


def webhook_warnings(cfg: Config) -> list[tuple[str, str]]:
    """The allowance of unsigned webhooks, for check-config and for every start of the HTTP server that takes
    them (not in config_warnings: a start refused before it serves anything need not say it)."""
    if not cfg.edrv.allow_unsigned_webhooks:
        return []
    return [("edrv.allow_unsigned_webhooks", _UNSIGNED_IGNORED if cfg.edrv.webhook_secret_env else
             f"webhooks are accepted unsigned: anyone who can reach {cfg.http.webhook_path} can post one (a "
             "session's start, a charger's refusal, power readings); set edrv.webhook_secret_env to eDRV's webhook "
             "secret instead")]


_UNSIGNED_IGNORED = "allow_unsigned_webhooks is ignored: edrv.webhook_secret_env is set, so every webhook must be signed"


def webhook_policy(cfg: Config) -> str:
    """Which webhooks the bridge takes, in one line: the operator's answer to "can anyone post one?"."""
    if cfg.edrv.webhook_secret_env:
        state = "set" if cfg.webhook_secret() is not None else "NOT SET"
        return f"signed only (secret from ${cfg.edrv.webhook_secret_env}, {state})"
    if cfg.edrv.allow_unsigned_webhooks:
        return "UNSIGNED ACCEPTED (edrv.allow_unsigned_webhooks = true)"
    return ("all REFUSED (401): no edrv.webhook_secret_env; set it, or edrv.allow_unsigned_webhooks = true; "
            "until then sessions are seen by listing only")


def level_limit(setting: LevelSetting, station: StationConfig) -> tuple[float, int, str]:
    """The station budget at this level: (amps per phase, watts, unit it is sent in)."""
    watts_per_amp = station.voltage * station.phases
    if setting.power is not None:
        watts = math.floor(min(setting.power, station.max_current * watts_per_amp))
        amps = _floor_tenth(watts / watts_per_amp)
        unit = "power"
    else:
        wanted = station.max_current * setting.fraction if setting.fraction is not None else setting.current
        amps = _floor_tenth(min(wanted or 0.0, station.max_current))
        watts = math.floor(amps * watts_per_amp + 1e-6)
        unit = "current"
    if station.simulator:
        unit = "current"  # simulator stations accept nothing else
    elif station.limit_unit is not None:
        unit = station.limit_unit
    return amps, watts, unit


def settings_table(cfg: Config) -> Table:
    table = Table.grid(padding=(0, 2))
    key_state = "set" if cfg.api_key() is not None else "NOT SET"
    rows = [
        ("config", str(cfg.path)),
        ("vtn", f"{cfg.vtn.url}  ven_name={cfg.vtn.ven_name}"
                + (f"  ven_id={cfg.vtn.ven_id}" if cfg.vtn.ven_id else "")
                + ("  tls client cert" if cfg.vtn.cert else "")),
        ("edrv", f"{cfg.edrv.base_url}  API key from ${cfg.edrv.api_key_env} ({key_state})"),
        ("database", _without_password(cfg.bridge.database_url)),
        ("http", f"{cfg.http.host}:{cfg.http.port}  webhooks at {cfg.http.webhook_path}"),
        ("webhooks", webhook_policy(cfg)),
        ("mode", f"dry_run={_flag(cfg.bridge.dry_run)} (answers opt{cfg.bridge.dry_run_opt.capitalize()})  "
                 f"test_events={cfg.bridge.test_events}  min_current={_num(cfg.bridge.min_current)} A  "
                 f"below_min={cfg.bridge.below_min}"),
    ]
    for name, value in rows:
        table.add_row(Text(name, style="bold"), Text(value))
    return table


def stations_table(cfg: Config) -> Table:
    # Tight padding: a 24-hex id plus nine columns has to fit 100 columns without truncating names.
    table = Table(title="Stations", box=box.SIMPLE_HEAD, title_justify="left", padding=(0, 0))
    for header, justify in (("id", "left"), ("resource_id", "left"), ("group", "left"), ("max A", "right"),
                            ("phases", "right"), ("V", "right"), ("max kW", "right"), ("unit", "left"),
                            ("sim", "left"), ("prio", "right")):
        table.add_column(header, justify=justify, no_wrap=header == "id")  # type: ignore[arg-type]
    for station in cfg.chargestations:
        max_kw = station.max_current * station.voltage * station.phases / 1000
        table.add_row(*(Text(cell) for cell in (
            station.id, station.resource_id or station.id, station.group or "-", _num(station.max_current),
            str(station.phases), _num(station.voltage), f"{max_kw:.1f}", station.limit_unit or "auto",
            "auto" if station.simulator is None else _flag(station.simulator), str(station.priority))))
    return table


def levels_table(cfg: Config) -> Table:
    table = Table(title="Level -> station limit (the station's budget; running sessions share it)",
                  box=box.SIMPLE_HEAD, title_justify="left", padding=(0, 0))
    for header, justify in (("level", "right"), ("rule", "left"), ("station", "left"), ("limit A", "right"),
                            ("limit W", "right"), ("sent as", "left"), ("note", "left")):
        table.add_column(header, justify=justify, no_wrap=header == "station")  # type: ignore[arg-type]
    for station in cfg.chargestations:
        max_w = math.floor(station.max_current * station.voltage * station.phases)
        table.add_row(*(Text(cell) for cell in ("0", "no limit", station.resource_id or station.id,
                                                _num(station.max_current), str(max_w), "restore", "")))
    for level, setting in sorted(cfg.levels.items()):
        table.add_section()
        for station in cfg.chargestations:
            amps, watts, unit = level_limit(setting, station)
            table.add_row(*(Text(cell) for cell in (
                str(level), setting.describe(), station.resource_id or station.id, _num(amps), str(watts), unit,
                _below_min_note(cfg, amps))))
    return table


def _below_min_note(cfg: Config, amps: float) -> str:
    # Per session, as the policy applies it: a share under min_current is raised or paused (below_min).
    if amps == 0:
        return "off (0 A)"
    if amps < cfg.bridge.min_current:
        return "below min: pause" if cfg.bridge.below_min == "pause" else \
            f"below min: {_num(cfg.bridge.min_current)} A"
    return ""


def _floor_tenth(amps: float) -> float:
    # The small epsilon keeps 0.1-steps computed in binary floating point (e.g. 2.3) from flooring a step down.
    return math.floor(amps * 10 + 1e-6) / 10


def _num(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _without_password(url: str) -> str:
    # SQLAlchemy's own parse: a password may hold "/" or "@", which a pattern would cut short and print
    try:
        return sa_url.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: say nothing of it rather than risk the password
        return re.sub(r"://.*@", "://***@", url)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
