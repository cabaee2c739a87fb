"""The `omni-data` command line: `preprocess` (raw data -> shards on Ray) and `inspect` (what is in them)."""

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


@app.command()
def preprocess(
    spec: str = typer.Argument(..., help="Preprocessing spec (YAML)."),
    address: str = typer.Option(
        None, "--address", help="Ray cluster address (default: RAY_ADDRESS or a local one)."
    ),
    output: str = typer.Option(None, "--output", help="Override the spec's output directory."),
) -> None:
    """Turn raw data (JSONL/Parquet manifests, media folders) into WebDataset shards + a Parquet index."""
    import dataclasses
    import logging

    from omni_data.preprocess.job import run_preprocess
    from omni_data.preprocess.spec import PreprocessSpec, SpecError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        parsed = PreprocessSpec.from_yaml(spec)
    except (SpecError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if address:
        parsed = dataclasses.replace(parsed, ray=dataclasses.replace(parsed.ray, address=address))
    if output:
        parsed = dataclasses.replace(parsed, output=output)
    summary = run_preprocess(parsed)
    typer.echo(summary.text())
    typer.echo(f"output: {parsed.output} (index.parquet, errors.jsonl, shard-*.tar)")


@app.command()
def inspect(
    path: str = typer.Argument(..., help="A preprocessed directory, a shard directory, or a shard pattern."),
    plot: str = typer.Option(None, "--plot", help="Write length histograms to this PNG."),
) -> None:
    """Sample counts, tokens per modality (percentiles), media sizes and error counts."""
    import json

    from omni_data.preprocess.inspect_shards import collect
    from omni_data.preprocess.inspect_shards import plot as draw

    stats = collect(path)
    hists = stats.pop("_hist")
    typer.echo(json.dumps(stats, indent=1))
    if plot:
        draw(hists, plot)
        typer.echo(f"histograms: {plot}")


def main() -> None:
    app()
