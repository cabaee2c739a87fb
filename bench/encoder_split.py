"""Encoder time per rank with the SP group sharing the encoders' work, against each rank encoding it all.

    uv run python bench/encoder_split.py [--reps 5]

Two processes form one SP group (sp=2, one thread each) and train the quickstart omni model with a wider
vision tower (embed 256, depth 4) on image-heavy micro-batches of its dataset (built first if missing):
the 4 micro-batches of 8 with the most vision units. For each `parallel.encoder_balance` (`none`: every
rank encodes every item, what one rank of sp=1 pays; `sp`: each encodes a cost-balanced share and the
features travel by all-to-all) the trainer is built with that setting (one pair of processes each), and
rank 0 times the embedding step (OmniModel.embed), forward and backward, on each micro-batch: the
encoders, projectors and feature exchange, alone (the foundation does not run). Prints one JSON object
with the mean seconds per mode and the ratio sp / none (the issue asks <= 0.6).
"""

from __future__ import annotations

import argparse
import json
import time

from quickstart_wide import wide_vision_recipe


def _rank(config: dict, reps: int) -> dict:
    """Mean seconds of the embedding step over the heavy micro-batches, for the recipe's
    parallel.encoder_balance (the trainer builds the model with it)."""
    import torch.distributed as dist

    from omni_train.config import TrainConfig
    from omni_train.trainer import Trainer

    trainer = Trainer(TrainConfig.model_validate(config))
    model, sp = trainer.model, trainer.sp
    steps = iter(trainer.loader)
    batches = [next(steps).micro_batches[0] for _ in range(8)]
    units = [int(b.media["image"].encoder_units.sum()) if "image" in b.media else 0 for b in batches]
    heavy = [b for _, b in sorted(zip(units, range(8), strict=True), reverse=True)[:4]]
    heavy = [batches[i] for i in heavy]
    for _pass in ("warm-up", "timed"):
        times = []
        for batch in heavy:
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                model.embed(batch, sp).float().square().mean().backward()
                times.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
    return {"vision_units": sorted(units, reverse=True)[:4], "seconds": sum(times) / len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from omni_dist.spawn import run_ranks

    r = {}
    for mode in ("none", "sp"):  # one trainer per setting: the model gets it when it is built
        sets = ("parallel.sp=2", f"parallel.encoder_balance={mode}")
        config = wide_vision_recipe("/tmp/omni-bench-encoder-split", *sets)
        r[mode] = run_ranks(_rank, 2, args=(config, args.reps), init_process_group=False, timeout_s=900)[0]
    print(
        json.dumps(
            {
                "bench": "encoder_split",
                "device": "cpu, 2 ranks x 1 thread",
                "vision_units_per_micro_batch": r["sp"]["vision_units"],
                "encoder_step_s": {
                    "none (each rank encodes all)": r["none"]["seconds"],
                    "sp (shared)": r["sp"]["seconds"],
                },
                "ratio_sp_vs_none": r["sp"]["seconds"] / r["none"]["seconds"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
