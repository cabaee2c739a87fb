"""omni-dist: the distributed core of OmniScale (needs torch only)."""

from omni_dist.env import DistEnv, DistEnvError, destroy_distributed, distributed, free_port, init_distributed
from omni_dist.mesh import MESH_NAMES, ParallelMesh
from omni_dist.parallel_dims import ParallelConfigError, ParallelDims

__version__ = "0.1.0"

__all__ = [
    "MESH_NAMES",
    "DistEnv",
    "DistEnvError",
    "ParallelConfigError",
    "ParallelDims",
    "ParallelMesh",
    "destroy_distributed",
    "distributed",
    "free_port",
    "init_distributed",
]
