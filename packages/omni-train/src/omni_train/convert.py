"""`omni-train convert`: a training checkpoint -> HF safetensors: the family's own directory for a model
built from `model.pretrained`, else one directory per model part."""

from __future__ import annotations

from pathlib import Path

from omni_models.families.export import export_pretrained
from omni_models.omni_weights import export_parts
from omni_train.assembly import checkpoint_model
from omni_train.config import load_config


def convert_checkpoint(
    checkpoint: str, out: str, config: str | None = None, dtype: str = "bfloat16"
) -> list[str]:
    """`config` defaults to the run's config.yaml, two levels above the checkpoint directory."""
    ckpt = Path(checkpoint)
    cfg = load_config(config or ckpt.parent.parent / "config.yaml")
    model, source = checkpoint_model(cfg, ckpt), cfg.model_spec.pretrained
    if source is not None:
        export_pretrained(model, source, out, dtype=dtype)
        return [f"{source.family.name} (as {source.path})"]
    written = export_parts(model, out, dtype=dtype)
    return sorted(part for part, files in written.items() if files)
