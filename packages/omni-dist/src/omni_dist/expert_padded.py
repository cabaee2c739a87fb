"""Padded EP dispatch: the expert-parallel exchange with every shape fixed by host numbers, so the host
never waits on the device in a MoE layer.

The exact dispatch (omni_dist.expert_parallel) sends each routed (token, expert) slot to the rank owning
the expert with a variable-split all-to-all: the split sizes and the experts' row counts are read on the
host (a device sync per MoE layer, plus bincount / repeat_interleave whose output size depends on the
routing).

Padded: every rank pads its tokens to one bound B, the same on all ranks (the tokens per rank of the
largest micro-batch: ParallelizeConfig.ep_token_bound), and the EP group
all-gathers the tokens and their routing (weights and expert ids, one tensor). Each rank runs its local
experts on the slots routed to them (omni_dist.expert_compute.fused_gate_up_padded) and returns a weighted
partial output for every gathered token; a reduce-scatter sums the partials and hands each rank its own
tokens' outputs. Backward runs the transposes: a reduce-scatter of the token gradients and an all-gather
of the output gradients. Every shape is B or ep x B rows.

Cost per MoE layer and rank, against the exact dispatch (T tokens on the rank, K experts per token,
H hidden, ep ranks, L = E/ep local experts):
- bytes on the wire: the all-gather and the reduce-scatter each move (ep-1) x B x H elements per rank;
  the exact all-to-alls move about T x K x (ep-1)/ep x H each. Ratio ep x B / (T x K): at T = B no more
  than exact while ep <= K (Qwen3-MoE and DeepSeek-V3 route K=8), ep/K times more beyond that.
- memory: the expert buffers hold ep x B x min(K, L) slot rows, the worst case (every token of the group
  routed here), where the exact dispatch holds the routed slots, about T x K per rank: about
  ep x (B/T) x min(K, L)/K times more gathered rows, saved expert activations and elementwise work on
  them. With grouped_mm the matmul FLOPs stay the routed ones (rows past the last group are skipped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from omni_dist.expert_compute import PaddedExpertFn

if TYPE_CHECKING:
    from omni_dist.expert_parallel import ExpertParallel


def _gather(x: torch.Tensor, group: ProcessGroup, size: int) -> torch.Tensor:
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group: ProcessGroup, size: int) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _AllGather(torch.autograd.Function):
    """Rows of every rank, in rank order; backward sums each rank's rows' gradients back to it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup, size: int) -> torch.Tensor:
        ctx.group, ctx.size = group, size
        return _gather(x, group, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter(grad, ctx.group, ctx.size), None, None


class _ReduceScatter(torch.autograd.Function):
    """Sum over ranks of (size x n) rows; each rank keeps its n; backward gathers the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup, size: int) -> torch.Tensor:
        ctx.group, ctx.size = group, size
        return _reduce_scatter(x, group, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather(grad, ctx.group, ctx.size), None, None


def moe_padded_dispatch(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, expert_fn: PaddedExpertFn,
    ep: ExpertParallel, bound: int,
) -> torch.Tensor:  # fmt: skip
    """Route `hidden` (T, H) to experts `top_k_index` (T, K) across the EP group, every rank's tokens padded
    to `bound`; the weighted sum (T, H). Same result as the exact dispatch."""
    tokens, k = top_k_index.shape
    if tokens > bound:
        raise RuntimeError(
            f"a MoE layer got {tokens} tokens on this rank, more than the padded EP dispatch's bound of "
            f"{bound}: parallelize with ep_token_bound >= the largest micro-batch's tokens per rank "
            "(training: data.max_tokens // sp)."
        )
    pad = (0, 0, 0, bound - tokens)
    # Weights and expert ids travel as one tensor; ids are exact in float32 (below 2**24 experts).
    dtype = torch.promote_types(top_k_weights.dtype, torch.float32)
    routing = torch.cat(
        [F.pad(top_k_weights.to(dtype), pad), F.pad(top_k_index.to(dtype), pad, value=-1)], dim=1
    )
    rows = _AllGather.apply(F.pad(hidden, pad), ep.group, ep.size)  # (ep x bound, H)
    routing = _AllGather.apply(routing, ep.group, ep.size)
    local = routing[:, k:].detach().long() - ep.rank * ep.local_experts
    local = torch.where((local >= 0) & (local < ep.local_experts), local, ep.local_experts)
    partial = expert_fn(rows, local, routing[:, :k].to(top_k_weights.dtype))
    return _ReduceScatter.apply(partial.to(hidden.dtype), ep.group, ep.size)[:tokens]
