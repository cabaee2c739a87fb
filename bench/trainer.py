"""Quickstart training throughput with 1 and 2 processes, and where a step's time goes.

    uv run python bench/trainer.py [--steps 30] [--warmup 5]

Builds the quickstart dataset if missing, then for 1 and 2 local processes (FSDP) runs the trainer's
components step by step with timers: data wait, forward, backward, optimizer (clip + step); a torch
profiler over the timed steps on rank 0 gives the share of the step spent inside collectives (gloo
all-gather / reduce-scatter / all-reduce; on CPU they block, on GPU they overlap). Prints one JSON
object with tokens/s per run and the 2-process / 1-process ratio (same global batch per step: both
runs read 2 data streams). Forward and backward include the FSDP collectives they trigger.
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

    from omni_dist.grad_norm import clip_grad_norm_
    from omni_dist.loss import global_token_count
    from omni_train.config import TrainConfig
    from omni_train.trainer import Trainer, local_label_tokens

    trainer = Trainer(TrainConfig.model_validate(config))
    it = iter(trainer.loader)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    phases = {"data_wait": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    tokens = 0
    prof = profile(activities=[ProfilerActivity.CPU]) if dist.get_rank() == 0 else None
    for i in range(warmup + steps):
        if i == warmup:
            dist.barrier()
            start = time.perf_counter()
            phases = dict.fromkeys(phases, 0.0)
            tokens = 0
            if prof is not None:
                prof.start()
        t0 = time.perf_counter()
        step = next(it)
        t1 = time.perf_counter()
        count = global_token_count(local_label_tokens(step.micro_batches, trainer.sp), trainer.mesh["loss"])
        for batch in step.micro_batches:
            f0 = time.perf_counter()
            loss = (
                trainer.model(batch.to(trainer.device), sequence_parallel=trainer.sp).loss_sum / count.float()
            )
            f1 = time.perf_counter()
            loss.backward()
            phases["forward"] += f1 - f0
            phases["backward"] += time.perf_counter() - f1
        t2 = time.perf_counter()
        clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        phases["data_wait"] += t1 - t0
        phases["optimizer"] += t3 - t2
        tokens += sum(b.num_tokens for b in step.micro_batches)
    dist.barrier()
    elapsed = time.perf_counter() - start
    total = torch.tensor([tokens], dtype=torch.float64)
    dist.all_reduce(total)
    out = {
        "tokens_per_s": float(total) / elapsed,
        "step_s": elapsed / steps,
        "share": {k: v / elapsed for k, v in phases.items()},
    }
    if prof is not None:
        prof.stop()
        comm_us = sum(
            e.self_cpu_time_total for e in prof.key_averages() if any(op in e.key.lower() for op in COMM_OPS)
        )
        out["share"]["communication"] = comm_us / 1e6 / elapsed
    dist.destroy_process_group()
    return out


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
