"""`omni-train convert`: a training checkpoint -> one HF safetensors directory per model part."""

from __future__ import annotations

from pathlib import Path

from omni_models.omni_weights import export_parts
from omni_train.assembly import checkpoint_model
from omni_train.config import load_config


def convert_checkpoint(
    checkpoint: str, out: str, config: str | None = None, dtype: str = "bfloat16"
) -> list[str]:
    """`config` defaults to the run's config.yaml, two levels above the checkpoint directory."""
    ckpt = Path(checkpoint)
    cfg = load_config(config or ckpt.parent.parent / "config.yaml")
    written = export_parts(checkpoint_model(cfg, ckpt), out, dtype=dtype)
    return sorted(part for part, files in written.items() if files)
