"""Loading a trained run for inference: its config, tokenizer and a checkpoint, in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omni_train.config import TrainConfig, load_config


def load_trained(run_dir: str | Path, step: int | None = None) -> tuple[Any, Any, TrainConfig]:
    """(model in eval mode on CPU, tokenizer, config) from RUN_DIR/config.yaml and a checkpoint
    (the newest complete one, or `step`). The checkpoint may come from any parallel layout."""
    from transformers import AutoTokenizer

    from omni_dist import distributed
    from omni_dist.checkpoint import CheckpointManager, ModelPart
    from omni_dist.weights import materialize_, non_persistent_buffers
    from omni_models.config import build_omni_model
    from omni_models.omni_weights import init_omni_weights_

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    with torch.device("meta"):
        model = build_omni_model(cfg.omni_model())
    materialize_(model, "cpu")
    init_omni_weights_(model, cfg.train.seed, names=non_persistent_buffers(model))  # rotary tables
    manager_dir = cfg.checkpoint_dir if cfg.checkpoint_dir.is_absolute() else run_dir / "checkpoints"
    with distributed():
        manager = CheckpointManager(manager_dir)
        path = manager.latest() if step is None else manager_dir / f"step-{step:08d}"
        manager.load({"model": ModelPart(model)}, path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(cfg.data.tokenizer), cfg
