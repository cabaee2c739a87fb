"""Quickstart training throughput with 1 and 2 processes, and where a step's time goes.

    uv run python bench/trainer.py [--steps 30] [--warmup 5]

Builds the quickstart dataset if missing, then for 1 and 2 local processes (FSDP) runs the trainer's own
step (Trainer._step) on its loader's steps with timers: data wait, forward (hooks on the model's forward),
optimizer (hooks on its step), and the rest of the step (backward, clip, the token count and the metrics
read); a torch profiler over the timed steps on rank 0 gives the share of the step spent inside
collectives (gloo all-gather / reduce-scatter / all-reduce; on CPU they block, on GPU they overlap).
Prints one JSON object with tokens/s per run and the 2-process / 1-process ratio (same global batch per
step: both runs read 2 data streams). Forward and backward include the FSDP collectives they trigger.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "apps/quickstart/recipe.yaml"
COMM_OPS = ("all_gather", "reduce_scatter", "allreduce", "all_reduce", "allgather", "gloo")


def _rank(config: dict, steps: int, warmup: int) -> dict:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from omni_train.config import TrainConfig
    from omni_train.trainer import Trainer

    trainer = Trainer(TrainConfig.model_validate(config))
    phases = _Phases(trainer.model, trainer.optimizer)
    it = iter(trainer.loader)
    tokens = 0
    prof = profile(activities=[ProfilerActivity.CPU]) if dist.get_rank() == 0 else None
    for i in range(warmup + steps):
        if i == warmup:
            dist.barrier()
            start = time.perf_counter()
            phases.reset()
            tokens = 0
            if prof is not None:
                prof.start()
        t0 = time.perf_counter()
        step = next(it)
        t1 = time.perf_counter()
        trainer._step(step)  # the trainer's own step: forward, backward, clip, optimizer, one read
        phases.add("data_wait", t1 - t0)
        phases.add("step", time.perf_counter() - t1)
        tokens += sum(b.num_tokens for b in step.micro_batches)
    dist.barrier()
    elapsed = time.perf_counter() - start
    total = torch.tensor([tokens], dtype=torch.float64)
    dist.all_reduce(total)
    share = {k: v / elapsed for k, v in phases.seconds.items()}
    share["backward_and_rest"] = share.pop("step") - share["forward"] - share["optimizer"]
    out = {"tokens_per_s": float(total) / elapsed, "step_s": elapsed / steps, "share": share}
    if prof is not None:
        prof.stop()
        comm_us = sum(
            e.self_cpu_time_total for e in prof.key_averages() if any(op in e.key.lower() for op in COMM_OPS)
        )
        out["share"]["communication"] = comm_us / 1e6 / elapsed
    phases.remove()
    dist.destroy_process_group()
    return out


class _Phases:
    """Seconds inside the model's forward calls and the optimizer's steps, from hooks on the trainer's own
    model and optimizer (its step runs unchanged); the loop adds the rest."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.seconds: dict[str, float] = {}
        self._t0: dict[str, float] = {}
        self.reset()
        self._handles = [
            model.register_forward_pre_hook(lambda *_: self._start("forward")),
            model.register_forward_hook(lambda *_: self._stop("forward")),
            optimizer.register_step_pre_hook(lambda *_: self._start("optimizer")),
            optimizer.register_step_post_hook(lambda *_: self._stop("optimizer")),
        ]

    def reset(self) -> None:
        self.seconds = dict.fromkeys(("data_wait", "step", "forward", "optimizer"), 0.0)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def _start(self, phase: str) -> None:
        self._t0[phase] = time.perf_counter()

    def _stop(self, phase: str) -> None:
        self.add(phase, time.perf_counter() - self._t0.pop(phase))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from omni_dist.spawn import run_ranks
    from omni_train.config import load_config

    if not (ROOT / "data/quickstart/shards/index.parquet").exists():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "apps/quickstart/make_data.py"),
                "--out",
                str(ROOT / "data/quickstart"),
                "--model",
                str(RECIPE),
            ],
            check=True,
            cwd=ROOT,
        )
    results = {}
    for n in (1, 2):
        cfg = load_config(
            RECIPE,
            [
                "data.streams=2",
                "logging.console=none",
                "logging.tensorboard=false",
                f"train.steps={args.steps + args.warmup}",
                "checkpoint.resume=none",
                f"logging.run_dir=/tmp/omni-bench-trainer-{n}",
            ],
        )
        per_rank = run_ranks(
            _rank,
            n,
            args=(cfg.model_dump(mode="json"), args.steps, args.warmup),
            init_process_group=False,
            threads_per_rank=max(1, 2 // n),
            timeout_s=600,
        )
        results[f"nproc_{n}"] = per_rank[0]
    results["ratio_2proc_vs_1proc"] = results["nproc_2"]["tokens_per_s"] / results["nproc_1"]["tokens_per_s"]
    print(
        json.dumps(
            {"bench": "trainer_quickstart", "device": "cpu (2 cores)", "steps": args.steps, **results},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
