"""The `dr-bridge` command line. Each command is thin: it loads config and calls one module."""
from __future__ import annotations

import sys

import typer

from dr_bridge.checkconfig import check_config_command
from dr_bridge.edrv.simulator_cli import simulate_edrv

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="OpenADR 2.0b VEN that applies utility demand-response events to eDRV charging sessions.")
app.command("check-config", help="Validate a config file offline and print stations and the level table.")(
    check_config_command)
app.command("simulate-edrv", help="Run the eDRV simulator: a local stand-in for the eDRV API, for rehearsals.")(
    simulate_edrv)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
