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


def _by_mesh(parameters: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Parameters with gradients, grouped by the mesh (or device) their gradient lives on."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            key = p.grad.device_mesh if isinstance(p.grad, DTensor) else p.grad.device
            groups.setdefault(key, []).append(p)
    return list(groups.values())


def grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The global `norm_type` norm of all gradients (a plain scalar tensor, the same on every rank)."""
    return _total(_by_mesh(parameters), norm_type)


def _total(groups: list[list[torch.Tensor]], norm_type: float) -> torch.Tensor:
    if not groups:
        return torch.tensor(0.0)
    norms = []
    for params in groups:
        n = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=norm_type)
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
    groups = _by_mesh(parameters)
    total = _total(groups, norm_type)
    if math.isfinite(max_norm):
        for params in groups:  # foreach kernels cannot mix DTensors of different meshes
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
