"""The `omni-train` command line."""

from __future__ import annotations

from typing import Annotated

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
    # None: ParallelDims' default, read when it is built (importing omni_dist here would load torch)
    dp_replicate: int | None = typer.Option(None, help="Model replicas (HSDP replicate degree)."),
    dp_shard: int | None = typer.Option(None, help="FSDP shard degree; -1 infers it from the others."),
    sp: int | None = typer.Option(None, help="Ulysses sequence-parallel degree."),
    ep: int | None = typer.Option(None, help="Expert-parallel degree (inside dp_shard x sp)."),
    timeout: float = typer.Option(120.0, help="Seconds before the run is stopped as hung."),
) -> None:
    """Start NPROC local CPU ranks, build the device mesh, and print every view's rank groups. An unset
    degree takes omni_dist.ParallelDims' default."""
    from omni_dist import ParallelConfigError, ParallelDims
    from omni_dist.spawn import run_ranks
    from omni_train.layout import format_layout, rank_views

    given = dict(dp_replicate=dp_replicate, dp_shard=dp_shard, sp=sp, ep=ep)
    degrees = {name: value for name, value in given.items() if value is not None}
    try:
        dims = ParallelDims(world_size=nproc, **degrees)
    except ParallelConfigError as e:
        raise typer.BadParameter(str(e)) from None
    per_rank = run_ranks(rank_views, nproc, args=(degrees,), timeout_s=timeout)
    typer.echo(format_layout(dims, per_rank))


@app.command()
def plan(
    config: str = typer.Argument(..., help="Training recipe (YAML)."),
    gpus: int = typer.Option(..., "--gpus", min=1, help="Devices to plan for."),
    gpu_mem: float = typer.Option(None, "--gpu-mem", min=1, help="GiB per device (default: the device's)."),
    device: str = typer.Option("h100", help="Device rates: h100 or h200."),
    top: int = typer.Option(5, min=1, help="Layouts to print."),
    doc_tokens: str = typer.Option(
        None,
        "--doc-tokens",
        help="Tokens per document instead of sampling the data: N, A-B (uniform) or a comma list.",
    ),
    doc_sample: int = typer.Option(
        256, "--doc-sample", min=0, help="Documents to read from data.sources for their lengths (0: none)."
    ),
    calibrate: str = typer.Option(
        None,
        "--calibrate",
        help="A run directory (or its metrics.jsonl): fit the device's efficiency to its measured steps.",
    ),
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key: --set data.max_tokens=8192 (repeatable)."),
    ] = None,
) -> None:
    """Predict memory and step time of the recipe's layouts for GPUS devices; print the fastest that fit."""
    import dataclasses

    from omni_train.config import ConfigError, load_config
    from omni_train.planner import DEVICES, format_plan
    from omni_train.planner import plan as plan_layouts

    if device not in DEVICES:
        raise typer.BadParameter(f"--device {device!r}: one of {', '.join(DEVICES)}")
    spec = DEVICES[device]
    if gpu_mem is not None:
        spec = dataclasses.replace(spec, memory_gib=gpu_mem)
    if doc_tokens is not None:
        from omni_train.documents import given_lengths

        try:
            given_lengths(doc_tokens)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    try:
        cfg = load_config(config, overrides or [])
        model, facts, docs = _plan_inputs(cfg, doc_tokens, doc_sample)
        notes = [f"document lengths: {docs.summary()}", *(f"note: {n}" for n in facts.notes)]
        if docs.warning:
            notes.append(
                f"warning: {docs.warning}; attention is counted as one document per micro-batch, which "
                "overstates it for shorter documents (give --doc-tokens)"
            )
        if calibrate is not None:
            fit = _calibration(calibrate, cfg, spec, doc_tokens, doc_sample, model, facts)
            spec = fit.device
            notes.append(fit.describe())
        feasible, infeasible = plan_layouts(cfg, gpus, spec, docs, facts=facts)
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(format_plan(cfg, feasible, infeasible, gpus, spec, top, notes))


def _plan_inputs(cfg, doc_tokens: str | None, doc_sample: int):
    """The recipe's model on meta, its facts and the document lengths `plan` uses."""
    from omni_train.assembly import meta_model
    from omni_train.memory import ModelFacts

    model = meta_model(cfg.model_spec)
    return model, ModelFacts.of(model, cfg.model_spec), _document_lengths(cfg, doc_tokens, doc_sample, model)


def _document_lengths(cfg, doc_tokens: str | None, doc_sample: int, model):
    from omni_train.documents import DocumentLengths, given_lengths, sample_lengths

    if doc_tokens is not None:
        return given_lengths(doc_tokens)
    if doc_sample == 0:
        return DocumentLengths.fallback("--doc-sample 0")
    return sample_lengths(cfg, doc_sample, model)


def _calibration(path: str, cfg, spec, doc_tokens: str | None, doc_sample: int, model, facts):
    """The device fitted to the run at `path` (its documents: --doc-tokens, else sampled from its data)."""
    from omni_train.calibrate import calibrate, read_run

    run = read_run(path)
    if run.cfg.model != cfg.model:  # another model: calibrate and the sampler build its own
        model, facts = None, None
    return calibrate(run, spec, _document_lengths(run.cfg, doc_tokens, doc_sample, model), facts)


@app.command()
def run(
    config: str = typer.Argument(..., help="Training recipe (YAML)."),
    nproc: int = typer.Option(
        None, "--nproc", "-n", min=1, help="Local processes (default launcher.num_workers)."
    ),
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set train.lr=1e-4 (repeatable).")
    ] = None,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved config, mesh, plan and memory; do not train."
    ),
) -> None:
    """Train on this machine in NPROC local processes (gloo on CPU, nccl on GPU); also works under torchrun."""
    import os

    from omni_train.config import ConfigError, check_layout, load_config

    try:
        cfg = load_config(config, overrides or [])
        world = int(os.environ.get("WORLD_SIZE", 0)) or nproc or cfg.launcher.num_workers
        check_layout(cfg, world)
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    if dry_run:
        from omni_train.dry_run import describe

        typer.echo(describe(cfg, world))
        return
    from omni_train.local import run_local

    try:
        results = run_local(cfg, world)
    except ConfigError as e:  # e.g. data.prepare failed or the data is still missing: one line, no traceback
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun every rank runs this command; rank 0 reports
    summary = results[0]
    if summary["losses"]:
        _echo_learned(cfg, summary)
    else:
        typer.echo(f"already at step {summary['step']} (train.steps): nothing to train")
    typer.echo(f"run dir: {cfg.run_dir}  (metrics.jsonl, config.yaml, checkpoints/, tensorboard/)")


@app.command()
def launch(
    config: str = typer.Argument(..., help="Training recipe (YAML)."),
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a key: --set launcher.num_workers=4 (repeatable)."),
    ] = None,
    address: str = typer.Option(
        None, "--address", help="Ray cluster address (default: RAY_ADDRESS or a local one)."
    ),
) -> None:
    """Train on a Ray cluster: place and supervise the workers, restart from checkpoint on failures."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from omni_train.config import ConfigError, check_layout, load_config

    try:
        cfg = load_config(config, overrides or [])
        check_layout(cfg, cfg.launcher.num_workers)
    except ConfigError as e:
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    from omni_train.ray_launcher import LaunchError
    from omni_train.ray_launcher import launch as ray_launch

    try:
        results, timings = ray_launch(cfg, address)
    except ConfigError as e:  # e.g. data.prepare failed or the data is still missing: one line, no traceback
        typer.echo(f"config error: {e}", err=True)
        raise typer.Exit(2) from None
    except LaunchError as e:
        typer.echo(f"launch failed: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: all workers stopped", err=True)
        raise typer.Exit(130) from None
    summary = results[0]
    if summary["losses"]:
        _echo_learned(cfg, summary)
    typer.echo(
        f"run dir: {cfg.run_dir}  (metrics.jsonl, config.yaml, checkpoints/, tensorboard/, launch.json)"
    )
    if timings:
        typer.echo("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


@app.command()
def convert(
    checkpoint: str = typer.Argument(..., help="A checkpoint directory (one step of RUN_DIR/checkpoints)."),
    out: str = typer.Argument(..., help="Output directory."),
    to: str = typer.Option(
        "hf", "--to", help="hf: a pretrained model's own HF directory, else safetensors + config per part."
    ),
    config: str = typer.Option(
        None, "--config", help="The run's config.yaml (default: RUN_DIR/config.yaml)."
    ),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Tensor dtype of the export."),
) -> None:
    """Export a training checkpoint as Hugging Face safetensors (a pretrained family: its own directory)."""
    if to != "hf":
        raise typer.BadParameter(f"--to must be 'hf', got {to!r}")
    from omni_train.convert import convert_checkpoint

    parts = convert_checkpoint(checkpoint, out, config, dtype)
    typer.echo(f"wrote {', '.join(parts)} under {out}")


@app.command()
def generate(
    run_dir: str = typer.Argument(..., help="A training run directory (config.yaml, checkpoints/)."),
    prompt: str = typer.Option(
        None, "--prompt", "-p", help="The user's text; --image/--video/--audio attach to it."
    ),
    image: Annotated[
        list[str] | None, typer.Option("--image", help="An input image file (repeatable).")
    ] = None,
    video: Annotated[
        list[str] | None, typer.Option("--video", help="An input video file (repeatable).")
    ] = None,
    audio: Annotated[
        list[str] | None, typer.Option("--audio", help="An input audio file (repeatable).")
    ] = None,
    requests: str = typer.Option(
        None,
        "--requests",
        help="JSONL: one sample document per line (the data schema); media paths relative to the file; "
        'a trailing assistant turn is dropped; "image_answer": true draws.',
    ),
    out: str = typer.Option(
        None,
        "--out",
        help="Answers as JSONL (id, prompt, answer, images); default RUN_DIR/generations.jsonl. "
        "Images are written next to it as <id>-<k>.png.",
    ),
    step: int = typer.Option(None, "--step", help="Checkpoint step (default: the newest complete one)."),
    max_new_tokens: int = typer.Option(
        128, min=1, help="Generated positions per answer, image tokens included."
    ),
    temperature: float = typer.Option(0.0, min=0.0, help="Sampling temperature; 0: greedy."),
    top_k: int = typer.Option(None, min=1, help="Sample only from the k most likely tokens."),
    cfg_scale: float = typer.Option(None, help="Classifier-free guidance scale for image tokens."),
    seed: int = typer.Option(0, help="Sampling seed; every request starts from it."),
    image_answer: bool = typer.Option(
        False, "--image-answer", help="Start every answer with the image start marker: the model draws."
    ),
) -> None:
    """Answer prompts with a trained run: media in, text and images out (console, JSONL, PNG files)."""
    from pathlib import Path

    from omni_dist.checkpoint import CheckpointError
    from omni_train.config import ConfigError
    from omni_train.generate import GenerateError, Sampling, generate_answers, prompt_request, read_requests

    media = {"image": image or [], "video": video or [], "audio": audio or []}
    if prompt is None and requests is None:
        raise typer.BadParameter("give --prompt TEXT or --requests FILE.jsonl (or both)")
    if prompt is None and any(media.values()):
        raise typer.BadParameter("--image/--video/--audio attach to --prompt: give one")
    sampling = Sampling(max_new_tokens, temperature, top_k, cfg_scale, seed, image_answer)
    try:
        batch = [prompt_request(prompt, media)] if prompt is not None else []
        batch += read_requests(requests) if requests is not None else []
        generate_answers(
            run_dir, batch, out or Path(run_dir) / "generations.jsonl", step, sampling, typer.echo
        )
    except (GenerateError, ConfigError, CheckpointError) as e:
        typer.echo(f"generate error: {e}", err=True)
        raise typer.Exit(2) from None


def _echo_learned(cfg, summary: dict) -> None:
    from omni_train.metrics import closing_summary

    typer.echo(f"trained to step {summary['step']}")
    for line in closing_summary(cfg.run_dir):
        typer.echo(line)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
