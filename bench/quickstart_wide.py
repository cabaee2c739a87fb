"""The quickstart omni model with a vision tower wide enough for its encoder work to matter (embed 256,
4 blocks), on the quickstart dataset (built first if missing): shared by the benches that need real
multimodal micro-batches (memory_model.py, encoder_split.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "apps/quickstart/recipe.yaml"


def wide_vision_recipe(run_dir: str, *overrides: str) -> dict:
    """The recipe as a dict (in-process data loading, quiet, no resume), the dataset made if missing."""
    from omni_train.config import load_config

    if not (ROOT / "data/quickstart/shards/index.parquet").exists():
        make = ROOT / "apps/quickstart/make_data.py"
        cmd = [sys.executable, str(make), "--out", "data/quickstart", "--model", str(QUICKSTART)]
        subprocess.run(cmd, check=True, cwd=ROOT)
    settings = [
        "model.encoders.vision.config.embed_dim=256",
        "model.encoders.vision.config.num_heads=4",
        "model.encoders.vision.config.depth=4",
        "data.num_workers=0",
        "logging.console=none",
        "logging.tensorboard=false",
        "checkpoint.resume=none",
        f"logging.run_dir={run_dir}",
        *overrides,
    ]
    return load_config(QUICKSTART, settings).model_dump(mode="json")
