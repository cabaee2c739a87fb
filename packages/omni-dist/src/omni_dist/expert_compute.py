"""Local expert computation for fused gate/up experts: rows grouped by expert -> expert outputs.

Two implementations with identical results (fp32: bit-identical on CPU):
- `loop`: one pair of matmuls per local expert (every expert runs, even on 0 rows).
- `grouped_mm`: torch's grouped GEMM (`F.grouped_mm`), one kernel per projection for all experts. Its
  kernels exist for CPU and for CUDA with SM >= 80 in bfloat16, and want 16-byte aligned strides.
`auto` picks grouped_mm where it runs and the loop elsewhere.

The padded EP dispatch (omni_dist.expert_padded) knows no row counts on the host. Its expert function
(`fused_gate_up_padded`) takes every gathered token with each routed slot's local expert (L, the number of
local experts, where the slot's expert is on another rank or the token is padding) and weight, and returns
each token's weighted sum over its local slots:
- `grouped_mm`: the slots sorted by local expert into a fixed-size buffer (tokens x min(K, L) rows, the
  most a token can bring: its K experts differ), the group ends `offs` computed on the device, and rows
  past the last group masked to exactly zero both ways. FLOPs as the exact dispatch; the buffer is
  sized for the worst case.
- `loop`: every local expert over every token, weighted by the token's routing weight for that expert (0
  where not routed): L x tokens rows of FLOPs, E/K times the routed work. Only a fallback.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from omni_dist.parallel_dims import ParallelConfigError

ExpertCompute = Literal["auto", "loop", "grouped_mm"]
EXPERT_COMPUTE: tuple[str, ...] = get_args(ExpertCompute)

# (rows grouped by local expert, rows per local expert) -> expert outputs, same order
ExpertFn = Callable[[torch.Tensor, list[int]], torch.Tensor]
# (tokens (N, H), local expert of each slot (N, K) with L for "not here", weights (N, K)) -> (N, H)
PaddedExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def grouped_mm_status(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...]) -> str:
    """ "ok", or why F.grouped_mm cannot run for these operands (`sizes`: the matrices' inner dims)."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 0):
            return f"grouped_mm needs a GPU with SM >= 80, this one is SM {major}{minor}"
        if dtype != torch.bfloat16:
            return f"grouped_mm on CUDA takes bfloat16, the experts compute in {dtype}"
    elif device.type != "cpu":
        return f"grouped_mm has no kernel for {device.type}"
    align = 16 // dtype.itemsize
    if any(s % align for s in sizes):
        return f"grouped_mm needs expert dims divisible by {align} for {dtype}, got {sizes}"
    return "ok"


def check_expert_compute(choice: str) -> None:
    if choice not in EXPERT_COMPUTE:
        raise ParallelConfigError(f"expert_compute={choice!r} is not one of {', '.join(EXPERT_COMPUTE)}.")


def resolve_expert_compute(
    choice: str, device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...]
) -> str:
    """The implementation to run: `choice` itself, or for `auto` the fastest one that runs here."""
    check_expert_compute(choice)
    if choice == "loop":
        return "loop"
    status = grouped_mm_status(device, dtype, sizes)
    if choice == "grouped_mm" and status != "ok":
        raise ParallelConfigError(f"expert_compute=grouped_mm cannot run: {status}; use auto or loop.")
    return "grouped_mm" if status == "ok" else "loop"


def fused_gate_up_compute(
    gate_up: torch.Tensor, down: torch.Tensor, act_fn: Callable, choice: str
) -> ExpertFn:  # fmt: skip
    """Expert function over local `gate_up` (E, 2I, H) and `down` (E, H, I), HF's fused layout."""
    impl = resolve_expert_compute(choice, gate_up.device, gate_up.dtype, tuple(down.shape[1:]))

    def loop(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outs, start = [], 0
        for e, n in enumerate(counts):  # every local expert runs, even on 0 rows: equal grads on all ranks
            gate, up = F.linear(rows[start : start + n], gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(act_fn(gate) * up, down[e]))
            start += n
        return torch.cat(outs)

    def grouped(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        offs = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=rows.device)
        gate, up = F.grouped_mm(rows, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        return F.grouped_mm(act_fn(gate) * up, down.transpose(-2, -1), offs=offs)

    return grouped if impl == "grouped_mm" else loop


def fused_gate_up_padded(
    gate_up: torch.Tensor, down: torch.Tensor, act_fn: Callable, choice: str
) -> PaddedExpertFn:  # fmt: skip
    """Padded-dispatch expert function over local `gate_up` (E, 2I, H) and `down` (E, H, I): no host
    counts, every shape fixed by the input's shape (see the module docstring)."""
    impl = resolve_expert_compute(choice, gate_up.device, gate_up.dtype, tuple(down.shape[1:]))
    experts = gate_up.shape[0]

    def loop(x: torch.Tensor, local: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = None
        for e in range(experts):
            w = (weights * (local == e)).sum(-1, keepdim=True)  # 0 for tokens not routed to e
            gate, up = F.linear(x, gate_up[e]).chunk(2, dim=-1)
            y = (F.linear(act_fn(gate) * up, down[e]) * w).to(x.dtype)
            out = y if out is None else out + y
        return out

    def grouped(x: torch.Tensor, local: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        tokens, k = local.shape
        keys, order = torch.sort(local.reshape(-1), stable=True)  # local slots first, by expert
        rows = tokens * min(k, experts)
        keys, order = keys[:rows], order[:rows]
        bounds = torch.arange(1, experts + 1, device=x.device, dtype=keys.dtype)
        offs = torch.searchsorted(keys, bounds, out_int32=True)  # end of each expert's rows
        valid = (keys < experts)[:, None]
        token = order // k
        # Rows past offs[-1] are left uninitialised by grouped_mm, forward and backward: `where` keeps
        # them out of the outputs and out of every gradient.
        rows_in = torch.where(valid, x[token], 0)
        gate, up = F.grouped_mm(rows_in, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        y = F.grouped_mm(act_fn(gate) * up, down.transpose(-2, -1), offs=offs)
        y = torch.where(valid, y, 0) * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add(0, token, y.to(x.dtype))

    return grouped if impl == "grouped_mm" else loop
