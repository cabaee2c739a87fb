"""Per-rank memory and step time of the FSDP2 modes, relative to one process in the same run.

    uv run python bench/fsdp_modes.py [--steps 6] [--layers 4] [--hidden 256]

Prints one JSON object. Memory is what each rank holds of parameters plus optimizer state (local
shards, counted exactly); it should fall ~1/N with N shards. Step times are medians over the timed
steps (the first two are warm-up). On a CPU machine with fewer cores than ranks, the ranks share
cores, so multi-rank times there measure overhead and contention, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config

from omni_dist import ParallelDims, ParallelMesh
from omni_dist.grad_norm import clip_grad_norm_
from omni_dist.loss import global_token_count
from omni_dist.parallelize import ParallelizeConfig, parallelize
from omni_dist.spawn import run_ranks
from omni_dist.weights import init_weights_, materialize_
from omni_models.hf_plans import plan_for

GLOBAL_BATCH, SEQ, WARMUP = 8, 128, 2


def model_config(layers: int, hidden: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=SEQ,
        tie_word_embeddings=False, attn_implementation="sdpa", dtype="float32", use_cache=False,
    )  # fmt: skip


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def run(config: Qwen2Config, dims: dict | None, mode: dict, steps: int) -> dict:
    """One configuration; dims=None is the single-process baseline without any wrapping."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    cfg = ParallelizeConfig(**mode)
    if dims is not None:
        mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), **dims), device_type="cpu")
        parallelize(model, mesh, plan_for(model), cfg)
        dp, dp_rank = mesh.dims.dp, mesh.dp_rank
    else:
        mesh, dp, dp_rank = None, 1, 0
    materialize_(model, "cpu", offload_params=cfg.offload_params)
    init_weights_(model, model._init_weights, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (GLOBAL_BATCH, SEQ), generator=g)
    per = GLOBAL_BATCH // dp
    ids = ids[dp_rank * per : (dp_rank + 1) * per]
    times = []
    for _ in range(steps + WARMUP):
        start = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum")
        tokens = ids[:, 1:].numel() if mesh is None else global_token_count(ids[:, 1:].numel(), mesh["loss"])
        (total / tokens).backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    return {
        "param_bytes": _local_bytes(model.parameters()),
        "optimizer_bytes": _local_bytes(state),
        "step_s": statistics.median(times[WARMUP:]),
    }


def run_modes(config: Qwen2Config, cases: dict[str, tuple[dict, dict]], steps: int) -> dict:
    return {name: run(config, dims, mode, steps) for name, (dims, mode) in cases.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = model_config(args.layers, args.hidden)
    baseline = run(config, None, {}, args.steps)

    modes = {
        "fsdp": {},
        "fsdp+full_recompute": {"recompute": "full"},
        "fsdp+selective_recompute": {"recompute": "selective"},
        "fsdp+activation_offload": {"offload_activations": True},
        "fsdp+param_offload": {"offload_params": True},
    }
    results = {}
    for world, layouts in (
        (1, {"fsdp1": {}}),
        (2, {"fsdp2": {}}),
        (4, {"fsdp4": {}, "hsdp2x2": {"dp_replicate": 2}}),
    ):
        cases = {
            f"{lname}/{mname}": (dims, mode)
            for lname, dims in layouts.items()
            for mname, mode in (modes.items() if lname == "fsdp2" else [("fsdp", {})])
        }
        per_rank = run_ranks(run_modes, world, args=(config, cases, args.steps), timeout_s=1800)
        for name in cases:
            rank0 = per_rank[0][name]
            results[name] = {
                "ranks": world,
                "param_plus_optimizer_mib_per_rank": round(
                    (rank0["param_bytes"] + rank0["optimizer_bytes"]) / 2**20, 3
                ),
                "memory_vs_one_process": round(
                    (rank0["param_bytes"] + rank0["optimizer_bytes"])
                    / (baseline["param_bytes"] + baseline["optimizer_bytes"]),
                    4,
                ),
                "step_s": round(max(r[name]["step_s"] for r in per_rank), 4),
                "step_time_vs_one_process": round(
                    max(r[name]["step_s"] for r in per_rank) / baseline["step_s"], 3
                ),
            }
    print(json.dumps({
        "benchmark": "fsdp_modes",
        "device": f"cpu ({os.cpu_count()} cores, {platform.machine()}), gloo, 1 thread per rank",
        "model": f"Qwen2 {args.layers} layers, hidden {args.hidden}, "
                 f"{sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) / 1e6:.1f}M params",
        "global_batch": f"{GLOBAL_BATCH} x {SEQ} tokens",
        "baseline": {"what": "one process, no FSDP", "step_s": round(baseline["step_s"], 4),
                     "param_plus_optimizer_mib": round((baseline["param_bytes"] + baseline["optimizer_bytes"]) / 2**20, 3)},
        "results": results,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
