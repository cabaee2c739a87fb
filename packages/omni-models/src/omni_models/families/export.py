"""A model built from a pretrained family, written back as the family's own HF directory.

The weights go under the checkpoint keys the family's layout names (the inverse of loading), the
source directory's config.json is kept (with the export dtype), and its tokenizer, chat template and
processor files are copied, so the family's `...ForConditionalGeneration.from_pretrained(OUT)` and
`AutoTokenizer` / `AutoImageProcessor.from_pretrained(OUT)` load the result. Tensors the family ignores
(not trained, e.g. Qwen2.5-Omni's speech generator) are copied from the source as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from omni_dist.hf_export import export_hf_safetensors
from omni_models.families.base import PretrainedSource
from omni_models.hf_keys import per_expert_tensors

_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "config.json")


def export_pretrained(
    model: nn.Module, source: PretrainedSource, out_dir: str | Path, dtype: str = "bfloat16"
) -> list[Path]:
    """Collective (every rank calls it; rank 0 writes). Parts added beside the family's are an error:
    export those with `omni_models.omni_weights.export_parts`."""
    outside = [n for n in model.state_dict() if source.family.checkpoint_key(n) is None]
    if outside:
        raise ValueError(
            f"{len(outside)} tensors are not part of the {source.family.name} layout, e.g. {outside[:3]}: "
            "a model with added parts exports them with omni_models.omni_weights.export_parts"
        )

    def rename(name: str, full: torch.Tensor) -> dict[str, torch.Tensor]:
        key = source.family.checkpoint_key(name)
        experts = per_expert_tensors(key, full) if source.family.per_expert else None
        return experts or {key: full}

    config = json.loads((Path(source.path) / "config.json").read_text())
    config["dtype"] = dtype
    files = export_hf_safetensors(
        model, out_dir, dtype, config_json=json.dumps(config, indent=2), rename=rename
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        skip = {p for pattern in _WEIGHTS for p in Path(source.path).glob(pattern)}
        for f in Path(source.path).iterdir():
            if f.is_file() and f not in skip:
                shutil.copy2(f, Path(out_dir) / f.name)
        if source.family.ignore:
            files += _copy_through(Path(source.path), Path(out_dir), source.family.ignore)
    return files


def _copy_through(source: Path, out: Path, prefixes: tuple[str, ...]) -> list[Path]:
    """The source's tensors under `prefixes`, one output file per source file, added to the index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    written = []
    for i, f in enumerate(sorted(source.glob("*.safetensors"))):
        with safe_open(str(f), "pt") as reader:
            tensors = {k: reader.get_tensor(k) for k in reader.keys() if k.startswith(prefixes)}  # noqa: SIM118
        if not tensors:
            continue
        dest = out / f"unchanged-{i + 1:05d}.safetensors"
        save_file(tensors, str(dest), metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(tensors, dest.name))
        index["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in tensors.values())
        written.append(dest)
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True))
    return written
