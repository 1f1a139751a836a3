import typer


def check_config_command(config: str = typer.Option(..., "--config"), strict: bool = typer.Option(False, "--strict")):
    raise typer.Exit(1)
