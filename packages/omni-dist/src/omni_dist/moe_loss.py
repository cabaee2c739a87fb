"""Load-balancing auxiliary loss over the routing statistics of the whole job.

The Switch-style loss is E * sum_i f_i * P_i, with f_i the number of routed (token, k) slots that went
to expert i per token and P_i the mean router probability of expert i, both over all tokens of the
global batch and all MoE layers (as HF's load_balancing_loss_func computes it for one process). f is not
differentiable, so each rank returns E * sum_i f_i(global) * (its own probability sum_i) / N(global):
these shares add up over the group to the global loss, and so do their gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """This rank's share of the global aux loss; `token_mask` (T,) excludes padding tokens."""
    if any(r.shape[-1] != num_experts for r in router_logits):
        raise ValueError(
            f"router logits have {router_logits[0].shape[-1]} columns, expected {num_experts} experts."
        )
    if token_mask is not None:
        token_mask = token_mask.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    rows = torch.zeros((), dtype=torch.float32, device=router_logits[0].device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        weight = torch.ones(probs.shape[0], device=probs.device) if token_mask is None else token_mask.float()
        counts = counts + torch.zeros_like(counts).scatter_add_(
            0, chosen.reshape(-1), weight.repeat_interleave(top_k)
        )
        prob_sum = prob_sum + (probs * weight[:, None]).sum(0)
        rows = rows + weight.sum()
    stats = torch.cat([counts, rows[None]]).detach()
    if group is not None:
        dist.all_reduce(stats, group=group)
    counts, rows = stats[:-1], stats[-1].clamp(min=1.0)  # an all-padding batch contributes 0, not NaN
    return num_experts * torch.sum(counts / rows * prob_sum / rows)
