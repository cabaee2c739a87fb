"""A planner layout is recipe settings: its overrides are the recipe keys of its fields, and load back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omni_train.config import load_config
from omni_train.planner import layout_of, recipe_keys

QUICKSTART = str(Path(__file__).resolve().parents[2] / "apps/quickstart/recipe.yaml")


def test_layout_overrides_are_recipe_keys_that_load_back():
    cfg = load_config(QUICKSTART, ["parallel.recompute=full", "data.micro_batches_per_step=2"])
    layout = layout_of(cfg, 4)
    assert layout.dp_shard == 4 and layout.offload == "none" and layout.micro_batches == 2  # -1 resolved
    assert layout.overrides(cfg) == []
    assert layout_of(load_config(QUICKSTART, layout.overrides()), 4) == layout
    moved = dataclasses.replace(layout, dp_shard=2, sp=2, offload_activations=True)
    assert moved.overrides(cfg) == [
        "parallel.dp_shard=2",
        "parallel.sp=2",
        "parallel.offload_activations=true",
    ]
    assert layout_of(load_config(QUICKSTART, moved.overrides()), 4) == moved
    assert set(recipe_keys().values()) == set(moved.settings())
