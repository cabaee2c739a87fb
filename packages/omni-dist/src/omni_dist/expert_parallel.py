"""Expert parallelism: token dispatch/combine over the EP group around a local expert computation.

Each EP rank owns E/ep consecutive experts. A MoE layer's routed (token, expert) pairs are sorted by
expert, sent to the owning ranks with a variable-split all-to-all, computed there grouped by local
expert, sent back with the inverse all-to-all, weighted by the router's top-k probabilities (exactly
as HF does: expert output times weight, then summed per token). Both all-to-alls are autograd ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from omni_dist.parallel_dims import ParallelConfigError
from omni_dist.plan import PlanError

# (rows grouped by local expert, rows per local expert) -> expert outputs, same order
ExpertFn = Callable[[torch.Tensor, list[int]], torch.Tensor]


@dataclass(frozen=True)
class ExpertParallel:
    group: ProcessGroup
    size: int
    rank: int
    num_experts: int

    def __post_init__(self) -> None:
        if self.num_experts % self.size:
            raise ParallelConfigError(
                f"ep ({self.size}) must divide the number of experts ({self.num_experts})."
            )

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.size


class _AllToAllV(torch.autograd.Function):
    """all_to_all_single with variable splits; backward sends gradients back along the same routes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def _exchange_counts(counts: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
    """Per-expert counts (E,) this rank sends -> (ep, E/ep): rows each source sends to my experts."""
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts, group=ep.group)
    return recv.view(ep.size, ep.local_experts)


def moe_dispatch_combine(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, expert_fn: ExpertFn,
    ep: ExpertParallel,
) -> torch.Tensor:  # fmt: skip
    """Route `hidden` (T, H) to experts `top_k_index` (T, K) across the EP group; weighted sum (T, H)."""
    k = top_k_index.shape[1]
    flat_expert = top_k_index.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    token_of = order // k
    counts = torch.bincount(flat_expert, minlength=ep.num_experts)
    recv_counts = _exchange_counts(counts, ep)  # (source rank, local expert)
    send_splits = counts.view(ep.size, ep.local_experts).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    received = _AllToAllV.apply(hidden[token_of], recv_splits, send_splits, ep.group)
    # Received rows are grouped by source rank, then expert; the experts want them by expert.
    by_expert = _source_major_to_expert_major(recv_counts)
    grouped = expert_fn(received[by_expert], recv_counts.sum(0).tolist())
    restored = torch.empty_like(grouped)
    restored[by_expert] = grouped
    returned = _AllToAllV.apply(restored, send_splits, recv_splits, ep.group)
    weighted = returned * top_k_weights.reshape(-1)[order, None]
    out = torch.zeros_like(hidden)
    return out.index_add(0, token_of, weighted.to(hidden.dtype))


def _source_major_to_expert_major(counts: torch.Tensor) -> torch.Tensor:
    """Row permutation from (source, expert) block order to (expert, source) block order."""
    sources, experts = counts.shape
    starts = torch.zeros(sources * experts, dtype=torch.long)
    starts[1:] = counts.reshape(-1).cumsum(0)[:-1]
    starts = starts.view(sources, experts)
    pieces = [
        torch.arange(int(starts[s, e]), int(starts[s, e] + counts[s, e]))
        for e in range(experts)
        for s in range(sources)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def fused_gate_up_experts(module: nn.Module, ep: ExpertParallel):
    """EP forward for experts stored as fused tensors (HF Qwen3-MoE, Qwen2-MoE, ...):
    `gate_up_proj` (E, 2I, H), `down_proj` (E, H, I), `act_fn`; local experts are the EP shard."""

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        gate_up, down = _local(module.gate_up_proj), _local(module.down_proj)

        def experts(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
            outs, start = [], 0
            for e, n in enumerate(
                counts
            ):  # every local expert runs, even on 0 rows: equal grads on all ranks
                gate, up = F.linear(rows[start : start + n], gate_up[e]).chunk(2, dim=-1)
                outs.append(F.linear(module.act_fn(gate) * up, down[e]))
                start += n
            return torch.cat(outs)

        return moe_dispatch_combine(hidden_states, top_k_index, top_k_weights, experts, ep)

    return forward


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


EXPERT_FORWARDS: dict[str, Callable[[nn.Module, ExpertParallel], Callable]] = {
    "fused_gate_up": fused_gate_up_experts,
}


def apply_expert_parallel(model: nn.Module, mesh, plan, experts: list, expert_params: dict[str, str]) -> None:
    """Split each expert tensor over the `ep` mesh view (as DTensors: checkpoints see full (E, ...)
    tensors) and replace each experts module's forward by the plan's EP forward."""
    from torch.distributed.tensor import DTensor, Shard

    if not experts:
        raise PlanError(f"ep={mesh.dims.ep} but the plan of {type(model).__name__} names no expert modules.")
    if plan.expert_forward not in EXPERT_FORWARDS:
        raise PlanError(
            f"plan.expert_forward={plan.expert_forward!r} is not one of {', '.join(EXPERT_FORWARDS)}."
        )
    ep_mesh = mesh["ep"]
    size, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    for fqn, module in experts:
        if getattr(module, "_omni_expert_parallel", False):
            raise PlanError(f"expert parallelism is already applied to {fqn!r}.")
        owned = [n for n in module._parameters if f"{fqn}.{n}" in expert_params]
        if not owned:
            raise PlanError(f"plan.expert_params names no parameter of the experts module {fqn!r}.")
        num_experts = None
        for name in owned:
            p = module._parameters[name]
            num_experts = num_experts or p.shape[0]
            if p.shape[0] != num_experts or p.shape[0] % size:
                raise ParallelConfigError(
                    f"{fqn}.{name}: {p.shape[0]} experts cannot be split over ep={size} (or differ from the "
                    f"other expert tensors, {num_experts}); choose ep dividing the number of experts."
                )
            local = p.detach().chunk(size, dim=0)[rank]
            local = torch.empty_like(local) if p.is_meta else local.clone()
            dt = DTensor.from_local(
                local, ep_mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride()
            )
            module._parameters[name] = nn.Parameter(dt, requires_grad=p.requires_grad)
        module.forward = EXPERT_FORWARDS[plan.expert_forward](module, ExpertParallel(
            ep_mesh.get_group(), size, rank, num_experts))  # fmt: skip
        module._omni_expert_parallel = True
