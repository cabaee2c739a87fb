"""Encoder time per rank with the SP group sharing the encoders' work, against each rank encoding it all.

    uv run python bench/encoder_split.py [--reps 5]

Two processes form one SP group (sp=2, one thread each) and train the quickstart omni model with a wider
vision tower (embed 256, depth 4) on image-heavy micro-batches of its dataset (built first if missing):
the 4 micro-batches of 8 with the most vision units. For each micro-batch and `parallel.encoder_balance`
(`none`: every rank encodes every item, what one rank of sp=1 pays; `sp`: each encodes a cost-balanced
share and the features travel by all-to-all), rank 0 times the embedding step, forward and backward:
the encoders, projectors and feature exchange, alone (the foundation does not run). Prints one JSON object
with the mean seconds per mode and the ratio sp / none (the issue asks <= 0.6).
"""

from __future__ import annotations

import argparse
import json
import time

from quickstart_wide import wide_vision_recipe


def _rank(config: dict, reps: int) -> dict:
    import torch.distributed as dist

    from omni_train.config import TrainConfig
    from omni_train.trainer import Trainer

    def trainer(balance: str) -> Trainer:  # the same weights (train.seed) for every mode
        parallel = {**config.get("parallel", {}), "encoder_balance": balance}
        return Trainer(TrainConfig.model_validate({**config, "parallel": parallel}))

    models = {mode: trainer(mode) for mode in ("none", "sp")}
    sp = models["sp"].sp
    steps = iter(models["sp"].loader)
    batches = [next(steps).micro_batches[0] for _ in range(8)]
    units = [int(b.media["image"].encoder_units.sum()) if "image" in b.media else 0 for b in batches]
    heavy = [b for _, b in sorted(zip(units, range(8), strict=True), reverse=True)[:4]]
    heavy = [batches[i] for i in heavy]
    out = {"vision_units": sorted(units, reverse=True)[:4]}
    for mode in ("none", "sp", "none", "sp"):  # twice, the first pass as warm-up
        model, times = models[mode].model, []
        for batch in heavy:
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                embeds, _ = model._embed(batch, sp)
                embeds.float().square().mean().backward()
                times.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
        out[mode] = sum(times) / len(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from omni_dist.spawn import run_ranks

    config = wide_vision_recipe("/tmp/omni-bench-encoder-split", "parallel.sp=2")
    r = run_ranks(_rank, 2, args=(config, args.reps), init_process_group=False, timeout_s=900)[0]
    print(
        json.dumps(
            {
                "bench": "encoder_split",
                "device": "cpu, 2 ranks x 1 thread",
                "vision_units_per_micro_batch": r["vision_units"],
                "encoder_step_s": {"none (each rank encodes all)": r["none"], "sp (shared)": r["sp"]},
                "ratio_sp_vs_none": r["sp"] / r["none"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
