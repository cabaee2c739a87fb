"""`omni-train convert`: a training checkpoint -> one HF safetensors directory per model part."""

from __future__ import annotations

from pathlib import Path

import torch

from omni_train.config import load_config


def convert_checkpoint(
    checkpoint: str, out: str, config: str | None = None, dtype: str = "bfloat16"
) -> list[str]:
    from omni_dist import distributed
    from omni_dist.checkpoint import CheckpointManager, ModelPart
    from omni_dist.weights import materialize_
    from omni_models.config import build_omni_model
    from omni_models.omni_weights import export_parts

    ckpt = Path(checkpoint)
    config = config or str(ckpt.parent.parent / "config.yaml")  # RUN_DIR/checkpoints/step-N
    cfg = load_config(config)
    with distributed():  # one process; DCP reshards whatever layout wrote the checkpoint
        with torch.device("meta"):
            model = build_omni_model(cfg.omni_model())
        materialize_(model, "cpu")
        CheckpointManager(ckpt.parent).load({"model": ModelPart(model)}, ckpt)
        written = export_parts(model, out, dtype=dtype)
    return sorted(part for part, files in written.items() if files)
