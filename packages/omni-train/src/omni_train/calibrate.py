"""The planner's device efficiency fitted to a measured run (`omni-train plan RECIPE --calibrate RUN_DIR`).

A run directory holds the recipe it ran (config.yaml) and a record per logged step (metrics.jsonl:
tokens, tokens_per_s, tokens_per_s_per_device, label_tokens, data_wait_frac; omni_train.trainer). The
measured step is the median, over the steps after the first WARMUP, of tokens / tokens_per_s less the
time the step waited for data (the planner models the device, not the loader). The planner predicts that
run's layout on its world size (tokens_per_s / tokens_per_s_per_device) with the micro-batches' real
tokens and loss rows as measured, and the documents' attention work per token from the run's own data
(else one document per micro-batch); the device's efficiency is then scaled so the prediction equals the
measurement. Only the compute term scales: a run whose measured step is not above its predicted
communication and fixed costs cannot be fitted this way, and says so.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from omni_train.config import ConfigError, TrainConfig, load_config
from omni_train.documents import DocumentLengths, Packing, sample_lengths
from omni_train.memory import ModelFacts
from omni_train.planner import DeviceSpec, device_named, layout_of, plan, predict

WARMUP = 3  # steps left out of the median (compilation, allocator growth, the first loads)


@dataclass(frozen=True)
class MeasuredRun:
    path: Path  # its metrics.jsonl
    cfg: TrainConfig  # the recipe it ran (its config.yaml)
    world_size: int
    step_s: float  # median seconds per step, data wait excluded
    tokens: float  # median real tokens per step (all ranks; an SP group's micro-batch once)
    label_tokens: float | None  # median tokens with a loss per step, where recorded
    steps: tuple[int, int]  # the first and last step of the median
    data_wait: float  # median share of a step spent waiting for data


def read_run(path: str | Path, steps: tuple[int, int] | None = None) -> MeasuredRun:
    """A run directory (or its metrics.jsonl), its config.yaml beside it; `steps`: the first and last step
    to time (default: all after WARMUP)."""
    path = Path(path)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    config = metrics.parent / "config.yaml"
    for f in (metrics, config):
        if not f.is_file():
            raise ConfigError(f"--calibrate {path}: no {f.name} in {metrics.parent} (give a run directory)")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in records if r.get("tokens_per_s") and r.get("tokens")}
    ordered = [by_step[s] for s in sorted(by_step)]  # a resumed run's records replace the steps it redid
    if steps is not None:
        timed = [r for r in ordered if steps[0] <= r["step"] <= steps[1]]
    else:
        timed = ordered[WARMUP:] or ordered[1:] or ordered
    if not timed:
        raise ConfigError(f"--calibrate {metrics}: no step records with tokens and tokens_per_s")
    per_device = [
        r["tokens_per_s"] / r["tokens_per_s_per_device"] for r in timed if r.get("tokens_per_s_per_device")
    ]
    cfg = load_config(str(config))
    wait = [r.get("data_wait_frac") or 0.0 for r in timed]
    labels = [r["label_tokens"] for r in timed if r.get("label_tokens")]
    return MeasuredRun(
        path=metrics,
        cfg=cfg,
        world_size=round(statistics.median(per_device)) if per_device else cfg.launcher.num_workers,
        step_s=statistics.median(
            r["tokens"] / r["tokens_per_s"] * (1 - w) for r, w in zip(timed, wait, strict=True)
        ),
        tokens=statistics.median(r["tokens"] for r in timed),
        label_tokens=statistics.median(labels) if labels else None,
        steps=(timed[0]["step"], timed[-1]["step"]),
        data_wait=statistics.median(wait),
    )


@dataclass(frozen=True)
class Calibration:
    run: MeasuredRun
    device: DeviceSpec  # with the fitted efficiency
    factor: float  # fitted efficiency / the given one
    predicted_s: float  # the run's step as predicted before the fit

    def describe(self) -> str:
        r = self.run
        wait = f", {r.data_wait:.0%} data wait left out" if r.data_wait >= 0.005 else ""
        ranks = f"{r.world_size} rank" + ("s" if r.world_size != 1 else "")
        return (
            f"calibrated on {r.path} ({ranks}, steps {r.steps[0]}-{r.steps[1]}): measured "
            f"{r.step_s:.3f} s per step{wait}, predicted {self.predicted_s:.3f} s; efficiency "
            f"{self.device.efficiency / self.factor:.3f} -> {self.device.efficiency:.3f} (x{self.factor:.2f})"
        )


def calibrate(
    run: MeasuredRun, device: DeviceSpec, docs: DocumentLengths, facts: ModelFacts | None = None
) -> Calibration:
    """`device` with its efficiency scaled so the planner predicts `run`'s measured step. `docs`: the run's
    document lengths (their fallback: one document per micro-batch); `facts`: of the run's model."""
    from omni_train.assembly import meta_model

    cfg = run.cfg
    facts = facts or ModelFacts.of(meta_model(cfg.model_spec), cfg.model_spec)
    layout = layout_of(cfg, run.world_size)
    dims = cfg.dims(run.world_size)
    per_micro_batch = run.tokens / (dims.dp * layout.micro_batches)  # as measured (real, packed)
    if docs.lengths:
        packing = docs.packing(layout.max_tokens, cfg.data.pack_buffer, cfg.data.overlong)
        packing = packing.with_tokens(per_micro_batch)
    else:
        packing = Packing.one_document(per_micro_batch)
    if run.label_tokens:
        packing = dataclasses.replace(packing, labelled=min(1.0, run.label_tokens / run.tokens))
    step, times = predict(cfg, layout, device, facts, packing)
    rest = step - max(times["compute"], times["fsdp"])  # added terms: sp/ep, offload, fixed
    compute = run.step_s - rest
    if compute <= times["fsdp"] or compute <= 0:
        raise ConfigError(
            f"--calibrate {run.path}: the measured step ({run.step_s:.3f} s) is not above the predicted "
            f"communication and fixed costs ({times['fsdp']:.3f} s FSDP, {rest:.3f} s added): the device's "
            "efficiency cannot account for it; check DeviceSpec's bandwidths and micro_batch_s"
        )
    efficiency = device.efficiency * times["compute"] / compute
    return Calibration(
        run, dataclasses.replace(device, efficiency=efficiency), efficiency / device.efficiency, step
    )


def compare_run(path: str | Path, device_name: str, steps: tuple[int, int] | None = None) -> dict:
    """The planner's view of a measured run (e.g. a bench's), for a report: its predicted step (documents
    sampled from its data) against the measured one, the efficiency the run achieved on `device_name`'s
    rates (planner.device_named), and the layouts the planner ranks first for the run's recipe."""
    from omni_train.assembly import meta_model

    run = read_run(path, steps)
    spec = run.cfg.model_spec
    model = meta_model(spec)
    facts = ModelFacts.of(model, spec)
    device = device_named(device_name)
    docs = sample_lengths(run.cfg, model=model)
    d = run.cfg.data
    packing = docs.packing(d.max_tokens, d.pack_buffer, d.overlong)
    step, times = predict(run.cfg, layout_of(run.cfg, run.world_size), device, facts, packing)
    fit = calibrate(run, device, docs, facts)
    ranked = plan(run.cfg, run.world_size, device, docs, facts=facts)[0][:3]
    return {
        "device": device.name,
        "documents": docs.summary() + (f" ({docs.warning})" if docs.warning else ""),
        "predicted_step_s": step,
        "predicted_terms_s": times,
        "predicted_tokens_per_micro_batch": packing.tokens,
        "measured_step_s": run.step_s,
        "predicted_over_measured": step / run.step_s,
        "efficiency": device.efficiency,
        "efficiency_measured": fit.device.efficiency,
        "ranked_first": [
            {
                "overrides": c.layout.overrides(run.cfg),
                "step_s": c.step_s,
                "tokens_per_s": c.tokens_per_s_per_device,
            }
            for c in ranked
        ],
    }
