"""Plain data (JSON) from every rank of a group, as uint8 tensors: no pickle crosses ranks."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist


def all_gather_json(
    value: Any, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"
) -> list:
    """`value` (JSON-able) of every rank of `group`, in group-rank order; every rank must call it."""
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8).to(device)
    world = dist.get_world_size(group)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return [json.loads(bytes(p[: int(s.item())].cpu().tolist())) for p, s in zip(parts, sizes, strict=True)]
