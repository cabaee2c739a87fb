"""`omni-train layout`: start N local ranks, build the job's mesh, and show which ranks form each view.

A real multi-process run (gloo on CPU): every view's group is checked with an all-reduce, so what it
prints is what the process groups are, not what they should be.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from omni_dist import MESH_NAMES, ParallelDims, ParallelMesh


def rank_views(dims_kwargs: dict[str, int]) -> dict[str, list[int]]:
    """On one rank: the members of each 1-D view containing this rank, checked by an all-reduce."""
    dims = ParallelDims(world_size=dist.get_world_size(), **dims_kwargs)
    mesh = ParallelMesh.build(dims, device_type="cpu")
    rank = dist.get_rank()
    out = {}
    for name in MESH_NAMES:
        view = mesh[name]
        if view.ndim != 1:
            continue
        members = view.mesh.flatten().tolist()
        total = torch.tensor([float(rank)])
        dist.all_reduce(total, group=view.get_group())
        if int(total.item()) != sum(members):
            raise RuntimeError(f"view {name}: all-reduce over {members} gave {total.item()} on rank {rank}")
        out[name] = members
    return out


def format_layout(dims: ParallelDims, per_rank: list[dict[str, list[int]]]) -> str:
    lines = [f"{dims}", ""]
    for name in per_rank[0]:
        groups = sorted({tuple(r[name]) for r in per_rank})
        lines.append(
            f"  {name:<13} {len(groups[0])} ranks x {len(groups)} groups: "
            + " ".join("[" + ",".join(map(str, g)) + "]" for g in groups)
        )
    return "\n".join(lines)
