"""Write a (sharded) model as HF safetensors: shard files, index json and config.

Every rank takes part (each full tensor is gathered from its shards), rank 0 writes. Rank 0 holds one
output shard file's worth of tensors plus the tensor being gathered, never the whole model. Tied
tensors are written once, under their first name (HF re-ties them from the config). `rename(name,
full tensor)` may write a tensor under other keys (e.g. fused experts as HF's per-expert keys). Needs the
`safetensors` package (installed with transformers, or `omni-dist[hf]`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from omni_dist.dtypes import resolve_dtype


def export_hf_safetensors(
    model: nn.Module,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 4 * 2**30,
    config_json: str | None = None,
    rename: Callable[[str, torch.Tensor], dict[str, torch.Tensor] | None] | None = None,
) -> list[Path]:
    """Write `model`'s persistent state to `out_dir`; returns the shard files (on rank 0; [] elsewhere)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    target = resolve_dtype(dtype, "cpu", "export dtype") if isinstance(dtype, str) else dtype
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total_bytes = 0
    weight_map: dict[str, int] = {}
    files: list[Path] = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue  # a tied alias
        seen.add(id(t))
        full = t.full_tensor() if isinstance(t, DTensor) else t  # collective: every rank, same order
        if not rank0:
            continue
        full = full.detach().to("cpu", dtype=target if full.is_floating_point() else full.dtype)
        pieces = rename(name, full) if rename is not None else None
        for key, tensor in (pieces or {name: full}).items():
            tensor = tensor.contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                files.append(_write(save_file, out_dir, len(files), shards[-1]))
                shards.append({})
                size = 0
            shards[-1][key] = tensor
            size += nbytes
            total_bytes += nbytes
            weight_map[key] = len(files)
    if not rank0:
        dist.barrier()  # return only once rank 0 has written everything
        return []
    if shards[-1]:
        files.append(_write(save_file, out_dir, len(files), shards[-1]))
    final = []
    for i, path in enumerate(files):
        dest = out_dir / f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        path.rename(dest)
        final.append(dest)
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": {n: final[i].name for n, i in weight_map.items()},
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    if config_json is not None:
        (out_dir / "config.json").write_text(config_json)
    if dist.is_initialized():
        dist.barrier()
    return final


def _write(save_file, out_dir: Path, index: int, tensors: dict[str, torch.Tensor]) -> Path:
    path = out_dir / f"part-{index:05d}.safetensors.tmp"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path
