"""Checkpoint key layouts of HF model families that differ from their in-memory parameters.

HF MoE models keep experts fused in memory (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj`
(E, H, I)) but `save_pretrained` writes one tensor per expert and projection. `per_expert_keys` maps
each fused tensor to the per-expert keys for the experts this rank holds, as views of its local shard,
so loading reads only those experts.
"""

from __future__ import annotations

import torch

from omni_dist.hf_load import local_rows


def per_expert_keys(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """For `omni_dist.hf_load.load_hf_weights_(..., split_keys=per_expert_keys)`."""
    if name.endswith("experts.gate_up_proj"):
        prefix = name[: -len("gate_up_proj")]
        local = _local(tensor)
        half = local.shape[1] // 2
        out = {}
        for row, expert in enumerate(local_rows(tensor).tolist()):
            out[f"{prefix}{expert}.gate_proj.weight"] = local[row, :half]
            out[f"{prefix}{expert}.up_proj.weight"] = local[row, half:]
        return out
    if name.endswith("experts.down_proj"):
        prefix = name[: -len("down_proj")]
        local = _local(tensor)
        return {
            f"{prefix}{e}.down_proj.weight": local[row] for row, e in enumerate(local_rows(tensor).tolist())
        }
    return None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
