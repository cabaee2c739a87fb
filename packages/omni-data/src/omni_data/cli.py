"""The `omni-data` command line (preprocessing and inspection commands arrive with the data issues)."""

from __future__ import annotations

import typer

from omni_data import __version__

app = typer.Typer(
    name="omni-data",
    help="Prepare and inspect OmniScale training data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"omni-data {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """OmniScale data tools."""


def main() -> None:
    app()
