"""The `omni-train` command line."""

from __future__ import annotations

import typer

from omni_train import __version__

app = typer.Typer(
    name="omni-train",
    help="Train omni-modal LLMs: launch, run, inspect parallel layouts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"omni-train {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """OmniScale training."""


@app.command()
def layout(
    nproc: int = typer.Option(4, "--nproc", "-n", min=1, help="Number of local ranks to start."),
    dp_replicate: int = typer.Option(1, help="Model replicas (HSDP replicate degree)."),
    dp_shard: int = typer.Option(-1, help="FSDP shard degree; -1 infers it from the others."),
    sp: int = typer.Option(1, help="Ulysses sequence-parallel degree."),
    ep: int = typer.Option(1, help="Expert-parallel degree (inside dp_shard x sp)."),
    timeout: float = typer.Option(120.0, help="Seconds before the run is stopped as hung."),
) -> None:
    """Start NPROC local CPU ranks, build the device mesh, and print every view's rank groups."""
    from omni_dist import ParallelConfigError, ParallelDims
    from omni_dist.spawn import run_ranks
    from omni_train.layout import format_layout, rank_views

    degrees = {"dp_replicate": dp_replicate, "dp_shard": dp_shard, "sp": sp, "ep": ep}
    try:
        dims = ParallelDims(world_size=nproc, **degrees)
    except ParallelConfigError as e:
        raise typer.BadParameter(str(e)) from None
    per_rank = run_ranks(rank_views, nproc, args=(degrees,), timeout_s=timeout)
    typer.echo(format_layout(dims, per_rank))


def main() -> None:
    app()
