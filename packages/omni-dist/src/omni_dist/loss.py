"""Token-weighted losses that are the same for every parallel layout.

Each rank backpropagates sum(token losses on this rank) / (tokens in the global batch). Gradients are
summed over the data-parallel mesh (see parallelize), so the result equals one process computing the
mean over the whole global batch, whatever the split over micro-batches, SP ranks and DP ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from omni_dist.packed import to_device


def global_token_count(local_tokens: torch.Tensor | int, mesh: DeviceMesh) -> torch.Tensor:
    """Sum of `local_tokens` over `mesh` (pass the `loss` view: every rank that holds tokens)."""
    t = to_device(torch.as_tensor(local_tokens, dtype=torch.float64).clone(), _device(mesh))
    dist.all_reduce(t, group=mesh.get_group())
    return t


def _device(mesh: DeviceMesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)
