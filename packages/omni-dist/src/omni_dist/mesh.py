"""One global DeviceMesh for the job, seen under the factorisations each parallel recipe needs.

All views share the world mesh as their root, so DTensors and FSDP units built on any of them agree on
rank order. Named views (1-D unless noted):

    dp_replicate  replicas of the model (HSDP's replicate dim; pure DDP when dp_shard x sp = 1)
    dp_shard      data-parallel ranks inside a replica
    sp            Ulysses sequence-parallel group (consecutive ranks)
    fsdp          dp_shard x sp: where dense parameters are sharded (SP ranks hold the same weights)
    hsdp          2-D (dp_replicate, fsdp): the mesh FSDP2 takes for HSDP
    dp            dp_replicate x dp_shard: ranks that read different data
    loss          every rank: where token counts and losses are reduced
    ep            expert-parallel group (consecutive ranks inside one replica)
    ep_fsdp       ranks holding the same experts inside one replica: where expert weights are sharded
    ep_hsdp       2-D (dp_replicate, ep_fsdp): the mesh FSDP2 takes for expert parameters
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from omni_dist._torch_mesh import flatten, unflatten
from omni_dist.env import default_device_type
from omni_dist.parallel_dims import ParallelConfigError, ParallelDims

MESH_NAMES = ("dp_replicate", "dp_shard", "sp", "fsdp", "hsdp", "dp", "loss", "ep", "ep_fsdp", "ep_hsdp")


@dataclass(frozen=True)
class ParallelMesh:
    """The explicit parallel state of a job: its degrees and every named view of its mesh."""

    dims: ParallelDims
    world: DeviceMesh
    views: Mapping[str, DeviceMesh]

    @classmethod
    def build(cls, dims: ParallelDims, device_type: str | None = None) -> ParallelMesh:
        """Create all views; a collective over the default process group (call on every rank)."""
        if not dist.is_initialized():
            raise RuntimeError(
                "ParallelMesh.build needs an initialised process group: call init_distributed() first."
            )
        if dist.get_world_size() != dims.world_size:
            raise ParallelConfigError(
                f"the parallel degrees describe {dims.world_size} ranks ({dims}) but the job has "
                f"{dist.get_world_size()}: build ParallelDims with world_size={dist.get_world_size()}."
            )
        device_type = device_type or default_device_type()
        world = init_device_mesh(device_type, (dims.world_size,), mesh_dim_names=("world",))
        hsdp = unflatten(world, 0, (dims.dp_replicate, dims.shard_group_size), ("dp_replicate", "fsdp"))
        dense = unflatten(hsdp, "fsdp", (dims.dp_shard, dims.sp), ("dp_shard", "sp"))
        moe = unflatten(hsdp, "fsdp", (dims.ep_fsdp, dims.ep), ("ep_fsdp", "ep"))
        views = {
            "dp_replicate": hsdp["dp_replicate"],
            "dp_shard": dense["dp_shard"],
            "sp": dense["sp"],
            "fsdp": hsdp["fsdp"],
            "hsdp": hsdp,
            "dp": flatten(dense["dp_replicate", "dp_shard"], "dp"),
            "loss": world,
            "ep": moe["ep"],
            "ep_fsdp": moe["ep_fsdp"],
            "ep_hsdp": moe["dp_replicate", "ep_fsdp"],
        }
        return cls(dims=dims, world=world, views=views)

    def __getitem__(self, name: str) -> DeviceMesh:
        try:
            return self.views[name]
        except KeyError:
            raise KeyError(f"no mesh view named {name!r}; the views are {', '.join(MESH_NAMES)}.") from None

    def data_parallel_mesh(self, replicate: bool) -> DeviceMesh:
        """The mesh FSDP2 shards dense parameters over: 2-D for HSDP, 1-D otherwise."""
        return self["hsdp"] if replicate else self["fsdp"]

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data stream (SP ranks of one group share it)."""
        return self["dp"].get_local_rank()

    @property
    def sp_rank(self) -> int:
        return self["sp"].get_local_rank()

    @property
    def ep_rank(self) -> int:
        return self["ep"].get_local_rank()
