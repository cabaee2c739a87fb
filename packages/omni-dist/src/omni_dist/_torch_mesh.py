"""The one place that uses private DeviceMesh APIs (`_unflatten`, `_flatten`).

torch has no public way yet to view one mesh under several factorisations; torchtitan and others use
these two methods for the same purpose. Checked on torch 2.13.0 (CPU, gloo) and 2.11.0 (CUDA, nccl).
If a torch release renames them, only this file changes.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh


def _method(mesh: DeviceMesh, name: str):
    if not hasattr(mesh, name):
        raise RuntimeError(
            f"this torch has no DeviceMesh.{name}; omni-dist needs torch>=2.11 (checked on 2.13)."
        )
    return getattr(mesh, name)


def unflatten(mesh: DeviceMesh, dim: int | str, sizes: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    """Split dimension `dim` of `mesh` into named dimensions of `sizes` (same root mesh, new groups)."""
    if isinstance(dim, str):  # torch 2.11 rejects every dimension given by name (an inverted check)
        dim = (mesh.mesh_dim_names or ()).index(dim)
    return _method(mesh, "_unflatten")(dim, sizes, names)


def flatten(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """A 1-D mesh over all ranks of `mesh` (in row-major order), named `name`."""
    return _method(mesh, "_flatten")(name)
