"""The trainer: a short loop that delegates to components (mesh, model, data, optimizer, checkpoints,
metrics). `train(cfg)` runs in every rank; the launchers only start processes around it.

Loss normalisation: each step's loss is the sum of token losses over every micro-batch of every rank
divided by the global count of labelled tokens (one all-reduce per step), and gradients are summed
over data-parallel ranks, so any layout and any split into micro-batches trains the same model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from omni_data.loader import OmniLoader, Step
from omni_data.preflight import merge_reports, summary
from omni_dist import ParallelMesh, destroy_distributed, init_distributed
from omni_dist.attention import SequenceParallel
from omni_dist.checkpoint import CheckpointManager, ModelPart, OptimizerPart, RNGPart
from omni_dist.device_feed import DeviceFeed
from omni_dist.gather import all_gather_json
from omni_dist.grad_norm import clip_grad_norm_
from omni_dist.loss import global_token_count
from omni_dist.packed import to_device
from omni_dist.parallelize import set_gradient_sync
from omni_dist.rank_slice import RankSlice
from omni_train.assembly import (
    build_loader,
    build_model,
    build_optimizer,
    chat_processor,
    sequence_parallel,
    tokenizer,
    trainable_parameters,
)
from omni_train.config import TrainConfig, dump
from omni_train.errors import TrainingError
from omni_train.hardware import peak_flops, peak_memory_gb
from omni_train.hooks import (
    Checkpoints,
    Evaluation,
    Heartbeat,
    MetricsLog,
    ProfilerHook,
    SampleLog,
    StepHook,
    StepState,
)
from omni_train.metrics import Metrics
from omni_train.profiling import StepProfiler

log = logging.getLogger("omni_train")


class _LoaderPart:
    """The data loader as a checkpoint part: each rank saves its streams' cursors and buffered restore
    keys; on load every rank gets all saved ranks' states (the data position is global, so the run can
    resume on another DP/SP layout)."""

    per_rank = True
    gather_ranks = True

    def __init__(self, loader: OmniLoader):
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


@dataclass
class Counters:
    step: int = 0
    bad_in_a_row: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0
    losses: list[float] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "bad_in_a_row": self.bad_in_a_row,
            "skipped_steps": self.skipped_steps,
            "tokens_seen": self.tokens_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.bad_in_a_row = state["step"], state["bad_in_a_row"]
        self.skipped_steps, self.tokens_seen = state["skipped_steps"], state["tokens_seen"]


def _device(env) -> torch.device:
    if torch.cuda.is_available():
        # Ray gives each actor only its own GPU; torchrun shows all of the node's.
        index = env.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, env.local_world_size)))
    return torch.device("cpu")


def local_label_tokens(micro_batches, sp: SequenceParallel | None) -> int:
    """This rank's loss tokens over the step's micro-batches (text labels + generated tokens)."""
    return sum(RankSlice.of(b, sp).loss_tokens for b in micro_batches)


@dataclass
class StepResult:
    """A step's numbers, still on the device until `read` (once per step, after the optimizer step):
    nothing in forward, backward or the optimizer step waits for them."""

    loss: torch.Tensor  # the step's global mean loss (0-d, float64)
    counts: torch.Tensor  # global [loss tokens, real micro-batches, real tokens, FLOPs] (all-reduced)
    parts: torch.Tensor  # global [summed loss per part..., count per part...] (all-reduced)
    names: list[str]  # the parts, in `parts` order
    sp_size: int

    def read(self, *extra: torch.Tensor) -> tuple[dict[str, Any], list[float]]:
        """One device-to-host transfer: the step's metrics, and the values of `extra` (0-d tensors)."""
        device = self.loss.device
        values = torch.cat(
            [
                self.loss.view(1),
                self.counts,
                self.parts,
                *(t.to(device, torch.float64).view(1) for t in extra),
            ]
        ).tolist()
        loss, (tokens, _, real, flops) = values[0], values[1:5]
        n = len(self.names)
        sums, counts = values[5 : 5 + n], values[5 + n : 5 + 2 * n]
        # A part with no tokens in this step (e.g. no generation target) has no loss, not a zero loss.
        parts = {
            name: (sums[i] / counts[i] if counts[i] > 0 else None, counts[i])
            for i, name in enumerate(self.names)
        }
        record = {
            "loss": loss,
            "label_tokens": int(tokens),
            "tokens": int(real) // self.sp_size,  # SP ranks share a micro-batch
            "parts": parts,
            "flops": flops / self.sp_size,
        }
        return record, values[5 + 2 * n :]


def forward_backward(
    model,
    micro_batches,
    mesh: ParallelMesh,
    sp: SequenceParallel | None,
    device: torch.device,
    backward: bool = True,
    sync_once: bool = False,
    feed: DeviceFeed | None = None,
) -> StepResult:
    """One step's micro-batches: token-weighted loss over all of them and all ranks.

    Everything the host needs to know of the batches (loss tokens, FLOPs) is counted from them before the
    first launch, and the loss and per-part sums stay on the device (StepResult.read), so the step never
    waits on the device. Parts: "text", every decoder and, for MoE foundations, "moe_aux", each averaged
    over its tokens (sequences for moe_aux). Gradients accumulate over the micro-batches; dividing every
    micro-batch by the global token count makes k micro-batches equal one holding the same samples. A MoE
    foundation's load-balancing loss is HF's per sequence: each micro-batch's, averaged over the step's
    micro-batches (fillers excluded), times its coefficient.
    `sync_once`: FSDP reduces the gradients after the last micro-batch only (`grad_sync: step`).
    """
    views = [RankSlice.of(b, sp) for b in micro_batches]  # each rank's slice, read by the model too
    local = [
        sum(v.loss_tokens for v in views),
        sum(not b.is_padding for b in micro_batches),
        sum(b.num_tokens for b in micro_batches),
        sum(sum(model.flops(b).values()) for b in micro_batches),  # from the host's cu_seqlens and grids
    ]
    counts = global_token_count(torch.tensor(local, dtype=torch.float64), mesh["loss"])
    tokens = counts[0].clamp(min=1)
    sp_size = sp.size if sp is not None else 1
    sequences = (counts[1] / sp_size).clamp(min=1)  # the SP ranks of a group count the same micro-batch
    total = torch.zeros((), dtype=torch.float64, device=device)
    part_sums: dict[str, torch.Tensor] = {}  # name -> summed loss; part_counts: name -> its token count
    part_counts: dict[str, float] = {}
    feed = feed or DeviceFeed(device)
    for i, batch in enumerate(feed(micro_batches)):
        if backward and sync_once:
            set_gradient_sync(model, i == len(micro_batches) - 1)
        out = model(views[i].on(batch))  # this rank's view of the batch now on the device
        loss = out.loss_sum / tokens.to(out.loss_sum.dtype)
        parts = dict(out.parts)
        if out.aux_loss is not None:
            loss = loss + out.aux_loss_coef * out.aux_loss / sequences.to(out.aux_loss.dtype)
            # reported as the mean over the step's sequences: each SP rank holds 1/sp of one
            parts["moe_aux"] = (out.aux_loss, 0.0 if batch.is_padding else 1 / sp_size)
        if backward:
            loss.backward()
        total += loss.detach().double()
        for name, (value, n) in parts.items():
            part_sums[name] = part_sums.get(name, 0.0) + value.detach().double()
            part_counts[name] = part_counts.get(name, 0.0) + n
    names = sorted(part_sums)  # the same parts on every rank (the same model)
    # counts are host numbers: an asynchronous copy, not a blocking one
    n = to_device(torch.tensor([part_counts[k] for k in names], dtype=torch.float64), device)
    packed = torch.cat([total.view(1), *(part_sums[k].view(1) for k in names), n])
    dist.all_reduce(packed, group=mesh["loss"].get_group())
    return StepResult(packed[0], counts, packed[1:], names, sp_size)


class Trainer:
    def __init__(self, cfg: TrainConfig, on_progress: Callable[[int, float | None], None] | None = None):
        """`on_progress(step, loss)` is called once ready (loss None) and after every step (heartbeats)."""
        self.cfg = cfg
        self.on_progress = on_progress or (lambda step, loss: None)
        self.env = init_distributed()
        self.device = _device(self.env)
        self.rank0 = self.env.rank == 0
        self.mesh = ParallelMesh.build(cfg.dims(self.env.world_size), device_type=self.device.type)
        p = cfg.parallel
        self.sp = sequence_parallel(cfg, self.mesh)
        built = build_model(cfg, self.mesh, self.device)
        self.model, self.report = built.model, built.report
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, self.device)
        self.feed = DeviceFeed(self.device)
        self.peak = peak_flops(self.device, getattr(torch, p.param_dtype))
        tok = tokenizer(cfg, self.model)
        self.pad_id = tok.pad_token_id or 0
        self.processor = chat_processor(self.model, cfg.model_spec, tok)
        self.loader = self._loader()
        self.counters = Counters()
        self.checkpoints = CheckpointManager(
            cfg.checkpoint_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
        )
        self.parts = {
            "model": ModelPart(self.model),
            "optimizer": OptimizerPart(self.model, self.optimizer),
            "scheduler": self.scheduler,
            "rng": RNGPart(),
            "data": _LoaderPart(self.loader),
            "trainer": self.counters,
        }

    def _loader(self, sources=None, epochs=None) -> OmniLoader:
        return build_loader(self.cfg, self.processor, self.mesh, self.device, self.pad_id, sources, epochs)

    def _forward_backward(self, step: Step, backward: bool = True) -> StepResult:
        sync_once = self.cfg.parallel.grad_sync == "step"
        return forward_backward(
            self.model, step.micro_batches, self.mesh, self.sp, self.device, backward, sync_once, self.feed
        )

    def train(self) -> Counters:
        """The loop: fetch, step, then the hooks (omni_train.hooks) in their documented order."""
        self._resume()
        resumed_at = self.counters.step
        self._announce()
        self.on_progress(resumed_at, None)
        hooks = self._hooks(resumed_at)
        start = time.perf_counter()
        try:
            steps = iter(self.loader)
            while self.counters.step < self.cfg.train.steps:
                n = self.counters.step + 1
                for hook in hooks:
                    hook.before_step(n)
                t0 = time.perf_counter()
                batch = next(steps, None)
                if batch is None:
                    raise TrainingError("the data ended before train.steps (set data epochs or fewer steps)")
                waited = time.perf_counter() - t0
                record = self._step(batch)
                seconds = time.perf_counter() - t0
                self.counters.step = n
                record.update(self._rates(record, seconds, waited, start))
                for hook in hooks:
                    hook.after_step(StepState(n, batch, record))
            for hook in hooks:
                hook.on_end(self.counters.step)
            self._data_report()
            self.checkpoints.wait()
        finally:
            for hook in hooks:
                hook.close()
        return self.counters

    def _announce(self) -> None:
        """Rank 0: the run dir, its config.yaml, and one line on the layout."""
        if not self.rank0:
            return
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.run_dir / "config.yaml").write_text(dump(self.cfg))
        log.info(
            "run dir %s: %d ranks, mesh %s, %d FSDP units",
            self.cfg.run_dir,
            self.env.world_size,
            self.mesh.dims,
            len(self.report.fsdp_units),
        )

    def _hooks(self, resumed_at: int) -> list[StepHook]:
        """The periodic work, built once from the config, in the order the loop calls it."""
        cfg, hooks = self.cfg, []
        if cfg.train.profile is not None:
            profiler = StepProfiler(cfg.train.profile, cfg.run_dir, self.device, self.env.rank)
            hooks.append(ProfilerHook(profiler))
        hooks.append(Heartbeat(self.on_progress))
        if cfg.logging.sample_ids and (self.sp is None or self.sp.rank == 0):  # one writer per DP rank
            hooks.append(SampleLog(cfg.run_dir / "samples" / f"dp{self.mesh.dp_rank}.jsonl"))
        log_cfg = cfg.logging
        metrics = Metrics(
            cfg.run_dir, cfg.train.steps, resumed_at, log_cfg.tensorboard, log_cfg.console, enabled=self.rank0
        )
        hooks.append(MetricsLog(metrics, log_cfg.log_every, cfg.train.steps))
        if cfg.train.eval_every and cfg.data.eval_sources:
            hooks.append(Evaluation(self.evaluate, metrics.log, cfg.train.eval_every))
        c = cfg.checkpoint
        hooks.append(
            Checkpoints(self.checkpoints, self.parts, c.interval, cfg.train.steps, c.save_final, resumed_at)
        )
        return hooks

    def _data_report(self) -> None:
        """RUN_DIR/data_report.json and one log line: bad shards, skipped samples, over all DP ranks."""
        reports = all_gather_json(self.loader.report(), self.mesh["dp"].get_group(), self.device)
        if self.rank0:
            report = merge_reports(reports)
            (self.cfg.run_dir / "data_report.json").write_text(json.dumps(report, indent=1))
            log.info("%s (RUN_DIR/data_report.json)", summary(report))

    def _step(self, step: Step) -> dict[str, Any]:
        """Forward/backward, clip and the optimizer step, all launched without waiting on the device (a
        non-finite loss or norm skips the update on the device); then one read of the step's numbers."""
        result = self._forward_backward(step)
        lr = self.scheduler.get_last_lr()[0]
        norm = clip_grad_norm_(trainable_parameters(self.model), self.cfg.train.grad_clip)
        finite = torch.isfinite(result.loss) & torch.isfinite(norm)
        self.optimizer.step(skip=~finite)
        self.optimizer.zero_grad(set_to_none=True)
        record, (norm, finite) = result.read(norm, finite)
        finite = bool(finite)
        if finite:
            self.scheduler.step()
            self.counters.bad_in_a_row = 0
        else:
            self.counters.bad_in_a_row += 1
            self.counters.skipped_steps += 1
            if self.rank0:
                log.warning(
                    "step %d: non-finite loss %s / grad norm %s: update skipped",
                    self.counters.step + 1,
                    record["loss"],
                    norm,
                )
            if self.counters.bad_in_a_row >= self.cfg.train.max_bad_steps:
                raise TrainingError(
                    f"{self.counters.bad_in_a_row} steps in a row had a non-finite loss or "
                    "gradient norm: lower train.lr, check the data, or use fp32"
                )
        self.counters.tokens_seen += record["tokens"]
        self.counters.losses.append(record["loss"])
        return {
            "step": self.counters.step + 1,
            "loss": record["loss"],
            "grad_norm": norm,
            "lr": lr,
            **{f"loss_{name}": value for name, (value, _) in record["parts"].items()},
            "tokens": record["tokens"],
            "label_tokens": record["label_tokens"],
            "skipped": not finite,
            "_flops": record["flops"],
        }

    def _rates(self, record: dict[str, Any], seconds: float, waited: float, start: float) -> dict[str, Any]:
        flops = record.pop("_flops")
        world = self.env.world_size
        return {
            "tokens_per_s": record["tokens"] / seconds,
            "tokens_per_s_per_device": record["tokens"] / seconds / world,
            "mfu": flops / seconds / (self.peak * world) if self.peak else None,
            "mem_gb": peak_memory_gb(self.device),
            "data_wait_frac": waited / seconds,
            "elapsed_s": time.perf_counter() - start,
        }

    # -- evaluation and state ----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float | None]:
        """Token-weighted mean losses over the eval set (`train.eval_steps` steps of it; 0: all of it):
        {"eval/loss": all parts, "eval/loss_<part>": each part}."""
        loader = self._loader(self.cfg.data.eval_sources, epochs=1)
        limit = self.cfg.train.eval_steps
        self.model.eval()
        total, weight = 0.0, 0.0
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        try:
            for i, step in enumerate(loader):
                if limit and i >= limit:
                    break
                record, _ = self._forward_backward(step, backward=False).read()
                tokens = record["label_tokens"]
                total, weight = total + record["loss"] * tokens, weight + tokens
                for name, (mean, n) in record["parts"].items():
                    if mean is not None:
                        sums[name] = sums.get(name, 0.0) + mean * n
                        counts[name] = counts.get(name, 0.0) + n
        finally:
            self.model.train()
        out = {"eval/loss": total / weight if weight else None}
        return out | {f"eval/loss_{n}": sums[n] / counts[n] for n in sorted(sums) if counts[n]}

    def _resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        if mode == "none":
            return
        path = None if mode == "auto" else mode
        if path is None and self.checkpoints.latest() is None:
            return
        step = self.checkpoints.load(self.parts, path)
        if self.rank0:
            log.info("resumed from step %d (%s)", step, path or self.checkpoints.latest())


def train(cfg: TrainConfig, on_progress: Callable[[int, float | None], None] | None = None) -> dict[str, Any]:
    """Entry point of every rank (local processes, torchrun, or Ray actors)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = not dist.is_initialized()
    try:
        counters = Trainer(cfg, on_progress).train()
    finally:
        if started:
            destroy_distributed()
    return {"step": counters.step, "losses": counters.losses, "skipped_steps": counters.skipped_steps}
