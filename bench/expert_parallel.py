"""Expert parallelism on CPU (2 ranks): tokens/s for ep=1 vs ep=2, all-to-all time, chunked vs not,
grouped_mm vs the per-expert loop.

    uv run python bench/expert_parallel.py [--tokens 1024] [--steps 6]

Prints one JSON object. Both layouts run FSDP2 over the 2 ranks on the same tokens; ep=1 keeps every
expert on every rank (HF's own experts implementation), ep=2 dispatches tokens to the rank owning their
expert and computes them with grouped_mm (auto on CPU) or the loop (ep2_loop); ep2_chunked4 splits the
dispatch into 4 chunks whose all-to-alls overlap expert compute in forward and backward.
Variants alternate step by step in one run so they see the same machine noise.
all_to_all_in_flight_fraction: profiled time from issuing the all-to-alls to their completion over the
step time; for the chunked variant much of it overlaps expert compute, so it is not time lost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from omni_dist import ParallelDims, ParallelMesh
from omni_dist.parallelize import ParallelizeConfig, parallelize
from omni_dist.spawn import run_ranks
from omni_dist.weights import init_weights_, materialize_
from omni_models.hf_plans import plan_for

WARMUP = 1


def build(ep: int, chunks: int, compute: str = "auto"):
    config = Qwen3MoeConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_experts=16, num_experts_per_tok=2,
        use_cache=False, dtype="float32", bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), ep=ep), device_type="cpu")
    parallelize(model, mesh, plan_for(model), ParallelizeConfig(ep_async=chunks, expert_compute=compute))
    materialize_(model, "cpu")
    init_weights_(model, model._init_weights, seed=0)
    return model


def measure(tokens: int, steps: int) -> dict:
    variants = {
        "ep1": build(1, 1),
        "ep2": build(2, 1),
        "ep2_loop": build(2, 1, "loop"),
        "ep2_chunked4": build(2, 4),
    }
    g = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(0, 4096, (1, tokens), generator=g)

    def step(model) -> None:
        model(input_ids=ids, use_cache=False).logits.float().mean().backward()
        model.zero_grad()

    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(steps + WARMUP):
        for name, model in variants.items():
            dist.barrier()
            start = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, model in variants.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step(model)
            total = time.perf_counter() - start
        a2a = sum(e.cpu_time_total for e in prof.key_averages() if e.key.endswith(":all_to_all")) / 1e6
        out[name] = {
            "step_s": statistics.median(times[name][WARMUP:]),
            "all_to_all_in_flight_fraction": a2a / total,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    r = run_ranks(measure, 2, args=(args.tokens, args.steps), timeout_s=1800)[0]
    tok_s = {k: 2 * args.tokens / v["step_s"] for k, v in r.items()}
    print(json.dumps({
        "benchmark": "expert_parallel",
        "device": f"cpu ({os.cpu_count()} cores), 2 ranks, gloo, 1 thread per rank",
        "model": "Qwen3-MoE 2 layers, hidden 256, 16 experts (moe_intermediate 256), top-2, FSDP2",
        "tokens_per_step": 2 * args.tokens,
        "tokens_per_s": {k: round(v, 1) for k, v in tok_s.items()},
        "ep2_vs_ep1": round(tok_s["ep2"] / tok_s["ep1"], 3),
        "chunked_vs_unchunked": round(tok_s["ep2_chunked4"] / tok_s["ep2"], 3),
        "grouped_mm_vs_loop": round(tok_s["ep2"] / tok_s["ep2_loop"], 3),
        "all_to_all_in_flight_fraction": {k: round(v["all_to_all_in_flight_fraction"], 3) for k, v in r.items()},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
