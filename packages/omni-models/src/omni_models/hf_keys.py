"""Checkpoint key layouts of HF model families that differ from their in-memory parameters.

HF MoE models keep experts fused in memory (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj`
(E, H, I)) but `save_pretrained` writes one tensor per expert and projection. `per_expert_keys` maps
each fused tensor to the per-expert keys for the experts this rank holds, as views of its local shard,
so loading reads only those experts; `per_expert_tensors` does the reverse when exporting.

Some released checkpoints store fused experts transposed ((E, H, 2I) / (E, I, H), Qwen3-VL-MoE's);
transformers transposes them when it loads, by their shapes, and writes them as in memory.
`transposed_view` is the view of a tensor that such a stored tensor fills.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

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


def stored_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the safetensors files of `path` (from their headers)."""
    meta = dcp.HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
    return {k: tuple(m.size) for k, m in meta.items()}


def transposed_view(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (..., a, b) as a (..., b, a) view of its storage: loading a checkpoint tensor stored
    transposed into it fills `tensor`. A DTensor stays one, sharded as it is (along leading dims only)."""
    if not isinstance(tensor, DTensor):
        return tensor.detach().transpose(-2, -1)
    last = tensor.ndim - 2
    if any(p.is_shard() and p.dim >= last for p in tensor.placements):
        raise ValueError(
            f"a tensor sharded along one of its last two dims ({tensor.placements}) cannot be transposed"
        )
    shape = (*tensor.shape[:-2], tensor.shape[-1], tensor.shape[-2])
    stride = (*tensor.stride()[:-2], tensor.stride()[-1], tensor.stride()[-2])
    local = tensor.to_local().detach().transpose(-2, -1)
    return DTensor.from_local(
        local, tensor.device_mesh, tensor.placements, run_check=False, shape=shape, stride=stride
    )
