"""Local expert computation for fused gate/up experts: rows grouped by expert -> expert outputs.

Two implementations with identical results (fp32: bit-identical on CPU):
- `loop`: one pair of matmuls per local expert (every expert runs, even on 0 rows).
- `grouped_mm`: torch's grouped GEMM (`F.grouped_mm`), one kernel per projection for all experts. Its
  kernels exist for CPU and for CUDA with SM >= 80 in bfloat16, and want 16-byte aligned strides.
`auto` picks grouped_mm where it runs and the loop elsewhere.
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
