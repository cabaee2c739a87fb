"""Checkpoint key layouts of HF model families that differ from their in-memory parameters.

HF MoE models keep experts fused in memory (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj`
(E, H, I)) but `save_pretrained` writes one tensor per expert and projection. `per_expert_keys` maps
each fused tensor to the per-expert keys for the experts this rank holds, as views of its local shard,
so loading reads only those experts; `per_expert_tensors` does the reverse when exporting.
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


def per_expert_tensors(name: str, full: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """For `omni_dist.hf_export.export_hf_safetensors(..., rename=per_expert_tensors)`: fused expert
    tensors written under the per-expert keys that HF's save_pretrained uses."""
    if name.endswith("experts.gate_up_proj"):
        prefix, half = name[: -len("gate_up_proj")], full.shape[1] // 2
        out = {}
        for e in range(full.shape[0]):
            out[f"{prefix}{e}.gate_proj.weight"] = full[e, :half]
            out[f"{prefix}{e}.up_proj.weight"] = full[e, half:]
        return out
    if name.endswith("experts.down_proj"):
        prefix = name[: -len("down_proj")]
        return {f"{prefix}{e}.down_proj.weight": full[e] for e in range(full.shape[0])}
    return None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
