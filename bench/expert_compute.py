"""Local expert computation alone: grouped_mm vs the per-expert loop, forward + backward.

    uv run python bench/expert_compute.py [--device cuda] [--tokens 8192] [--experts 16] [--hidden 2048]
        [--inter 768] [--steps 20]

Defaults are one Qwen3-30B-A3B MoE layer's share on one of 8 EP ranks (128 experts / 8, hidden 2048,
moe_intermediate 768, 8192 routed rows). CUDA runs bfloat16 (grouped_mm's CUDA dtype), CPU float32.
Rows are spread over experts with a skew (a few hot experts, some idle), as routing does early in
training. Both implementations alternate step by step; prints one JSON object with the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from omni_dist.expert_compute import fused_gate_up_compute


def counts_for(tokens: int, experts: int, g: torch.Generator) -> list[int]:
    weights = torch.rand(experts, generator=g) ** 3  # skewed: hot experts and near-idle ones
    weights[: max(1, experts // 8)] = 0  # a few experts get nothing at all
    return torch.bincount(
        torch.multinomial(weights, tokens, replacement=True, generator=g), minlength=experts
    ).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    counts = counts_for(args.tokens, args.experts, g)
    E, H, inter = args.experts, args.hidden, args.inter
    gate_up = (torch.randn(E, 2 * inter, H, generator=g) * H**-0.5).to(device, dtype).requires_grad_()
    down = (torch.randn(E, H, inter, generator=g) * inter**-0.5).to(device, dtype).requires_grad_()
    rows = torch.randn(args.tokens, H, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(args.tokens, H, generator=g).to(device, dtype)
    fns = {c: fused_gate_up_compute(gate_up, down, F.silu, c) for c in ("grouped_mm", "loop")}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {c: [] for c in fns}
    for step in range(args.steps + 2):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            out = fn(rows, counts)
            out.backward(grad)
            sync()
            if step >= 2:  # warm-up: kernel selection, allocator
                times[name].append(time.perf_counter() - start)
            gate_up.grad = down.grad = rows.grad = None
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    flops = 6 * args.tokens * H * 3 * inter  # fwd + bwd of the three projections
    print(json.dumps({
        "benchmark": "expert_compute",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "dtype": str(dtype).removeprefix("torch."),
        "shape": {"rows": args.tokens, "experts": E, "hidden": H, "moe_intermediate": inter,
                  "idle_experts": sum(c == 0 for c in counts), "max_rows": max(counts)},
        "ms_per_fwd_bwd": {k: round(v, 3) for k, v in ms.items()},
        "tflops": {k: round(flops / (v / 1e3) / 1e12, 2) for k, v in ms.items()},
        "grouped_mm_vs_loop": round(ms["loop"] / ms["grouped_mm"], 3),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
