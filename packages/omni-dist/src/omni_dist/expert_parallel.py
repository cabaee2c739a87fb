"""Expert parallelism: token dispatch/combine over the EP group around a local expert computation.

Each EP rank owns E/ep consecutive experts. A MoE layer's routed (token, expert) pairs are sorted by
expert, sent to the owning ranks with a variable-split all-to-all, computed there grouped by local
expert, sent back with the inverse all-to-all, weighted by the router's top-k probabilities (exactly
as HF does: expert output times weight, then summed per token). Both all-to-alls are autograd ops.

`overlap_chunks = C > 1` splits the tokens into C chunks and issues every chunk's dispatch at once as
async work: while chunk k's experts compute, the dispatch of chunk k+1 (and the combine of chunk k-1)
are in flight. Backward mirrors it: the gradient all-to-alls of every chunk are issued as soon as
their gradient exists and waited for only where the chunk's backward needs them. Each token is computed
exactly as without chunks.

`dispatch`: `exact` (above; reads the split sizes and the experts' row counts on the host) or `padded`
(omni_dist.expert_padded: fixed-size all-gather / reduce-scatter sized by `ep_token_bound`, no host
sync, larger buffers). `exact` is the default: it moves and holds only the routed slots, while `padded`
holds about ep times more expert rows; choose `padded` where a stalled launch queue costs more than that
(small ep), or where the step must not sync (CUDA graphs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from omni_dist.expert_compute import (
    ExpertFn,
    check_expert_compute,
    fused_gate_up_compute,
    fused_gate_up_padded,
)
from omni_dist.expert_padded import moe_padded_dispatch
from omni_dist.parallel_dims import ParallelConfigError
from omni_dist.plan import PlanError

EPDispatch = Literal["exact", "padded"]
EP_DISPATCH: tuple[str, ...] = get_args(EPDispatch)


@dataclass(frozen=True)
class ExpertParallel:
    group: ProcessGroup
    size: int
    rank: int
    num_experts: int
    overlap_chunks: int = 1
    compute: str = "auto"  # local expert computation, see omni_dist.expert_compute
    dispatch: str = "exact"  # see EPDispatch and the module docstring
    token_bound: int = 0  # the padded dispatch's tokens per rank per call (ParallelizeConfig.ep_token_bound)

    def __post_init__(self) -> None:
        if self.num_experts % self.size:
            raise ParallelConfigError(
                f"ep ({self.size}) must divide the number of experts ({self.num_experts})."
            )
        if self.overlap_chunks < 1:
            raise ParallelConfigError(f"expert overlap_chunks must be >= 1, got {self.overlap_chunks}.")
        check_expert_compute(self.compute)
        if self.dispatch not in EP_DISPATCH:
            raise ParallelConfigError(
                f"ep_dispatch={self.dispatch!r} is not one of {', '.join(EP_DISPATCH)}."
            )
        if self.dispatch == "padded" and self.overlap_chunks > 1:
            raise ParallelConfigError(
                f"ep_async={self.overlap_chunks} overlaps the exact dispatch's all-to-alls; the padded "
                "dispatch does not chunk: set ep_async=1 or ep_dispatch=exact."
            )

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.size


class _Handle:
    """One async all-to-all pair: _AllToAllV issues it, _WaitAllToAll waits for it.

    Backward runs the pair in reverse: _WaitAllToAll.backward issues the gradients' all-to-all and
    _AllToAllV.backward waits for it, so autograd runs other chunks' backward in between.
    """

    def __init__(self) -> None:
        self.work = None
        self.buffers: tuple[torch.Tensor, ...] = ()  # (send, receive): alive until the wait
        self.route: tuple | None = None  # (out_splits, in_splits, group) of the forward exchange


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, async_op: bool):
    src = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, src, out_splits, in_splits, group=group, async_op=async_op)
    return out, src, work


class _AllToAllV(torch.autograd.Function):
    """all_to_all_single with variable splits; backward sends gradients back along the same routes.

    With a `handle` the exchange is only issued: the output is filled once _WaitAllToAll has run.
    """

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group: ProcessGroup, handle=None):
        ctx.splits, ctx.group, ctx.handle = (out_splits, in_splits), group, handle
        out, src, work = _exchange(x, out_splits, in_splits, group, async_op=handle is not None)
        if handle is not None:
            handle.work, handle.buffers, handle.route = work, (src,), (out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        handle = ctx.handle
        if handle is not None:  # issued by _WaitAllToAll.backward; `grad` is the same tensor
            handle.work.wait()
            back = handle.buffers[1]
            handle.work, handle.buffers = None, ()
            return back, None, None, None, None
        out_splits, in_splits = ctx.splits
        back, _, _ = _exchange(grad, in_splits, out_splits, ctx.group, async_op=False)
        return back, None, None, None, None


def all_to_all_v(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup):
    """Rows of `x` (in_splits[r] of them to rank r) exchanged for out_splits[r] rows from each rank r;
    differentiable: backward sends the gradients back the same way."""
    return _AllToAllV.apply(x, out_splits, in_splits, group, None)


class _WaitAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: torch.Tensor, handle: _Handle) -> torch.Tensor:
        handle.work.wait()
        handle.work, handle.buffers = None, ()
        ctx.handle = handle
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        handle = ctx.handle
        out_splits, in_splits, group = handle.route
        back, src, handle.work = _exchange(grad, in_splits, out_splits, group, async_op=True)
        handle.buffers = (src, back)
        return grad, None


def _routes(chunks: tuple[torch.Tensor, ...], ep: ExpertParallel) -> list[_Route]:
    """Routing of every chunk, with one exchange of per-expert counts for all of them."""
    counts = torch.stack([torch.bincount(c.reshape(-1), minlength=ep.num_experts) for c in chunks])
    # (chunk, expert) -> (destination rank, chunk, local expert): one block per destination.
    send = counts.view(len(chunks), ep.size, ep.local_experts).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=ep.group)  # now (source rank, chunk, my local expert)
    return [_Route(c, counts[i], recv[:, i], ep) for i, c in enumerate(chunks)]


def moe_dispatch_combine(
    hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, expert_fn: ExpertFn,
    ep: ExpertParallel,
) -> torch.Tensor:  # fmt: skip
    """Route `hidden` (T, H) to experts `top_k_index` (T, K) across the EP group; weighted sum (T, H)."""
    if ep.overlap_chunks == 1:
        (route,) = _routes((top_k_index,), ep)
        received = _AllToAllV.apply(hidden[route.token_of], route.recv_splits, route.send_splits, ep.group)
        returned = _AllToAllV.apply(
            route.compute(received, expert_fn), route.send_splits, route.recv_splits, ep.group
        )
        return route.combine(returned, top_k_weights, hidden)
    # Exactly overlap_chunks pieces on every rank (some may be empty): ranks with different token
    # counts must still issue the same number of collectives.
    hiddens, weights = hidden.tensor_split(ep.overlap_chunks), top_k_weights.tensor_split(ep.overlap_chunks)
    plans = _routes(top_k_index.tensor_split(ep.overlap_chunks), ep)
    # Every rank issues the same collectives in the same order: all dispatches, then the combines.
    dispatches = []
    for route, h in zip(plans, hiddens, strict=True):
        handle = _Handle()
        dispatches.append((_AllToAllV.apply(h[route.token_of], route.recv_splits, route.send_splits,
                                                 ep.group, handle), handle))  # fmt: skip
    combines = []
    for route, (received, handle) in zip(plans, dispatches, strict=True):
        grouped = route.compute(_WaitAllToAll.apply(received, handle), expert_fn)
        back = _Handle()
        combines.append(
            (_AllToAllV.apply(grouped, route.send_splits, route.recv_splits, ep.group, back), back)
        )
    outs = [
        route.combine(_WaitAllToAll.apply(returned, handle), w, h)
        for route, (returned, handle), w, h in zip(plans, combines, weights, hiddens, strict=True)
    ]
    return torch.cat(outs)


class _Route:
    """Where each routed (token, expert) slot of one chunk goes, and how it comes back."""

    def __init__(self, top_k_index: torch.Tensor, counts: torch.Tensor, recv_counts: torch.Tensor, ep):
        self.k = top_k_index.shape[1]
        self.order = torch.argsort(top_k_index.reshape(-1), stable=True)
        self.token_of = self.order // self.k
        self.recv_counts = recv_counts  # (source rank, local expert)
        self.send_splits = counts.view(ep.size, ep.local_experts).sum(1).tolist()
        self.recv_splits = self.recv_counts.sum(1).tolist()
        # Received rows are grouped by source rank, then expert; the experts want them by expert.
        self.by_expert = _source_major_to_expert_major(self.recv_counts)

    def compute(self, received: torch.Tensor, expert_fn: ExpertFn) -> torch.Tensor:
        grouped = expert_fn(received[self.by_expert], self.recv_counts.sum(0).tolist())
        restored = torch.empty_like(grouped)
        restored[self.by_expert] = grouped
        return restored

    def combine(
        self, returned: torch.Tensor, top_k_weights: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        weighted = returned * top_k_weights.reshape(-1)[self.order, None]
        return torch.zeros_like(hidden).index_add(0, self.token_of, weighted.to(hidden.dtype))


def _source_major_to_expert_major(counts: torch.Tensor) -> torch.Tensor:
    """Row permutation from (source, expert) block order to (expert, source) block order."""
    sources, experts = counts.shape
    block = torch.repeat_interleave(torch.arange(sources * experts), counts.reshape(-1))
    source, expert = block // experts, block % experts
    return torch.argsort(expert * sources + source, stable=True)  # stable: rows keep their order


def fused_gate_up_experts(module: nn.Module, ep: ExpertParallel):
    """EP forward for experts stored as fused tensors (HF Qwen3-MoE, Qwen2-MoE, ...):
    `gate_up_proj` (E, 2I, H), `down_proj` (E, H, I), `act_fn`; local experts are the EP shard."""

    layout = {"is_transposed": False, "is_concatenated": True, "has_bias": False}
    differs = {k: getattr(module, k) for k, v in layout.items() if getattr(module, k, v) != v}
    if differs:
        raise PlanError(
            f"fused_gate_up expects concatenated, untransposed, bias-free experts; {type(module).__name__} "
            f"has {differs}: register an EP forward for that layout."
        )

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        gate_up, down = _local(module.gate_up_proj), _local(module.down_proj)
        if gate_up.shape[0] != ep.local_experts:
            raise RuntimeError(f"{type(module).__name__}: expert tensors are not split over ep={ep.size}.")
        if ep.dispatch == "padded":
            padded = fused_gate_up_padded(gate_up, down, module.act_fn, ep.compute)
            return moe_padded_dispatch(hidden_states, top_k_index, top_k_weights, padded, ep, ep.token_bound)
        experts = fused_gate_up_compute(gate_up, down, module.act_fn, ep.compute)
        return moe_dispatch_combine(hidden_states, top_k_index, top_k_weights, experts, ep)

    return forward


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


EXPERT_FORWARDS: dict[str, Callable[[nn.Module, ExpertParallel], Callable]] = {
    "fused_gate_up": fused_gate_up_experts,
}


def apply_expert_parallel(
    model: nn.Module,
    mesh,
    plan,
    experts: list,
    expert_params: dict[str, str],
    overlap_chunks: int = 1,
    compute: str = "auto",
    dispatch: str = "exact",
    token_bound: int = 0,
) -> None:
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
        owned = [n for n, p in module._parameters.items() if p is not None]
        unsharded = [n for n in owned if f"{fqn}.{n}" not in expert_params]
        if unsharded:
            # The EP forward indexes every expert tensor by local expert id: one left whole would be
            # read with the wrong experts on all ranks but the first.
            raise PlanError(
                f"plan.expert_params does not cover {[f'{fqn}.{n}' for n in unsharded]}; every parameter "
                "of an experts module must be split over ep."
            )
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
        ep = ExpertParallel(
            ep_mesh.get_group(), size, rank, num_experts, overlap_chunks, compute, dispatch, token_bound
        )
        module.forward = EXPERT_FORWARDS[plan.expert_forward](module, ep)
        module._omni_expert_parallel = True
