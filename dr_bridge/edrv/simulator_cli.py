import typer


def simulate_edrv(port: int = typer.Option(8099, "--port")):
    raise typer.Exit(1)
