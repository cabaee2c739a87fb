"""Gradient norm over the whole job, and clipping by it.

Gradients may be DTensors on different meshes (dense parameters on the FSDP/HSDP mesh, expert
parameters on the EP-FSDP mesh) or plain replicated tensors. Each group's norm is reduced over its own
mesh, then the groups are combined, so the value equals the norm of the full, unsharded gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The global `norm_type` norm of all gradients (a plain scalar tensor, the same on every rank)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else p.grad.device
            groups.setdefault(key, []).append(p.grad)
    if not groups:
        return torch.tensor(0.0)
    norms = []
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    device = norms[0].device
    stacked = torch.stack([n.to(device=device, dtype=torch.float32) for n in norms])
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.pow(norm_type).sum().pow(1.0 / norm_type)


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Scale gradients so their global norm is at most `max_norm`; returns the norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params, norm_type)
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
