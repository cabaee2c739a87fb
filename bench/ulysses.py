"""Ulysses sequence parallelism on CPU: step time per token for sp=1 and sp=2, sync vs async.

    uv run python bench/ulysses.py [--tokens 2048] [--steps 4]

Prints one JSON object. The baseline is one process (sp=1) on the same packed sequence in the same
run. `all_to_all_fraction` is the time all-to-alls are in flight over the step time (torch profiler,
rank 0): blocking time for sync; for async it overlaps with attention compute. On CPU the ranks share the machine's cores; on a GPU node each rank has its own GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, Qwen2Config

from omni_dist import ParallelDims, ParallelMesh
from omni_dist.attention import SequenceParallel
from omni_dist.packed import pack, pad_for_sp
from omni_dist.parallelize import ParallelizeConfig, parallelize
from omni_dist.sequence import slice_for_sp
from omni_dist.spawn import run_ranks
from omni_dist.weights import init_weights_, materialize_
from omni_models.attention import implementation_name, register_packed_attention
from omni_models.hf_plans import plan_for

WARMUP = 1


def build(tokens: int):
    register_packed_attention()
    config = Qwen2Config(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=tokens, tie_word_embeddings=False, dtype="float32",
        attn_implementation=implementation_name("sdpa"), use_cache=False,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    lengths, left = [], tokens
    while left > 0:
        n = min(left, int(torch.randint(64, 512, (1,), generator=g)))
        lengths.append(n)
        left -= n
    return config, pack([torch.randint(0, 4096, (n,), generator=g) for n in lengths])


def step_times(tokens: int, steps: int, sp_size: int, chunk_options: tuple[int, ...]) -> dict:
    """Median step time per overlap setting; settings alternate step by step so they share the noise."""
    config, seq = build(tokens)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    mesh = ParallelMesh.build(ParallelDims(world_size=dist.get_world_size(), sp=sp_size), device_type="cpu")
    parallelize(model, mesh, plan_for(model), ParallelizeConfig())
    materialize_(model, "cpu")
    init_weights_(model, model._init_weights, seed=0)
    variants = {c: SequenceParallel.from_mesh(mesh["sp"], c) for c in chunk_options}
    sp = variants[chunk_options[0]]
    seq = pad_for_sp(seq, sp.size)
    ids, pos, labels = (slice_for_sp(x[0], sp) for x in (seq.input_ids, seq.position_ids, seq.labels))

    def step(sp: SequenceParallel) -> None:
        logits = model(
            input_ids=ids[None], position_ids=pos[None], cu_seq_lens_q=seq.cu_seqlens, cu_seq_lens_k=seq.cu_seqlens,
            max_length_q=seq.max_seqlen, max_length_k=seq.max_seqlen, use_cache=False, sequence_parallel=sp,
        ).logits[0]  # fmt: skip
        F.cross_entropy(logits, labels, ignore_index=-100).backward()
        model.zero_grad()

    times: dict[int, list[float]] = {c: [] for c in chunk_options}
    for _ in range(steps + WARMUP):
        for c, variant in variants.items():
            dist.barrier()
            start = time.perf_counter()
            step(variant)
            times[c].append(time.perf_counter() - start)
    out = {}
    for c, variant in variants.items():
        out[c] = {"step_s": statistics.median(times[c][WARMUP:])}
        if sp_size > 1:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                step(variant)
                total = time.perf_counter() - start
            # "<backend>:all_to_all" spans each collective from issue to completion.
            a2a_us = sum(e.cpu_time_total for e in prof.key_averages() if e.key.endswith(":all_to_all"))
            out[c]["all_to_all_fraction"] = a2a_us / 1e6 / total
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    base = run_ranks(step_times, 1, args=(args.tokens, args.steps, 1, (1,)), timeout_s=1800)[0][1]
    both = run_ranks(step_times, 2, args=(args.tokens, args.steps, 2, (1, 2)), timeout_s=1800)[0]
    sync, asyn = both[1], both[2]
    per_token = {
        k: v["step_s"] / args.tokens for k, v in (("sp1", base), ("sp2_sync", sync), ("sp2_async", asyn))
    }
    print(json.dumps({
        "benchmark": "ulysses",
        "device": f"cpu ({os.cpu_count()} cores), gloo, 1 thread per rank",
        "model": "Qwen2 4 layers, hidden 256, 8 heads / 4 kv heads, omni_sdpa packed attention, FSDP over sp ranks",
        "tokens_per_step": args.tokens,
        "step_s_per_token": {k: f"{v:.3e}" for k, v in per_token.items()},
        "sp2_sync_vs_sp1": round(per_token["sp2_sync"] / per_token["sp1"], 3),
        "sp2_async_vs_sync": round(per_token["sp2_async"] / per_token["sp2_sync"], 3),
        "all_to_all_fraction": {"sp2_sync": round(sync["all_to_all_fraction"], 3),
                                "sp2_async": round(asyn["all_to_all_fraction"], 3)},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
