"""Loading a trained run for inference: its config, tokenizer and a checkpoint, in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omni_dist.checkpoint import CheckpointLayout
from omni_train.assembly import checkpoint_model, tokenizer
from omni_train.config import TrainConfig, checkpoint_dir, load_config


def load_trained(run_dir: str | Path, step: int | None = None) -> tuple[Any, Any, TrainConfig]:
    """(model in eval mode on CPU, tokenizer, config) from RUN_DIR/config.yaml and a checkpoint
    (the newest complete one, or `step`). The checkpoint may come from any parallel layout."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    path = CheckpointLayout(checkpoint_dir(cfg, run_dir)).checkpoint(step)
    model = checkpoint_model(cfg, path)
    model.eval()
    return model, tokenizer(cfg, model), cfg
