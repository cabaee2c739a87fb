"""Training config: errors name the key before any process starts; big recipes validate (--dry-run)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omni_train.cli import app
from omni_train.config import ConfigError, check_layout, load_config

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "apps/quickstart/recipe.yaml")


def test_overrides_and_types():
    cfg = load_config(QUICKSTART, ["train.lr=1e-4", "parallel.sp=2", "data.num_workers=0"])
    assert cfg.train.lr == 1e-4 and cfg.parallel.sp == 2 and cfg.data.num_workers == 0
    assert cfg.data_config().pad_to_multiple == 2 and cfg.checkpoint_dir == Path(
        "runs/quickstart/checkpoints"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "unknown key train.lrr (did you mean 'lr'?)"),
        (["paralel.sp=2"], "unknown key paralel (did you mean 'parallel'?)"),
        (["train.steps=many"], "train.steps: Input should be a valid integer"),
        (["parallel.recompute=sometimes"], "parallel.recompute"),
        (
            ["data.max_tokens=511", "parallel.sp=2"],
            "data.max_tokens (511) must be a multiple of parallel.sp (2)",
        ),
        (
            ["model.encoders.vision.nmae=x"],
            "model: unknown key model.encoders.vision.nmae (did you mean 'name'?)",
        ),
        (["set_without_value"], "--set expects key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, overrides)
    assert message in str(e.value)


def test_layout_errors_before_any_process_starts():
    with pytest.raises(ConfigError, match=r"sp \(3\) must divide the number of attention heads \(4\)"):
        check_layout(load_config(QUICKSTART, ["parallel.sp=3", "data.max_tokens=510"]), 3)
    with pytest.raises(ConfigError, match=r"parallel: .*dp_shard"):
        check_layout(load_config(QUICKSTART, ["parallel.dp_shard=3"]), 2)
    with pytest.raises(ConfigError, match=r"parallel\.ep=2 must divide the foundation.s experts"):
        check_layout(load_config(QUICKSTART, ["parallel.ep=2"]), 2)
    with pytest.raises(
        ConfigError, match=r"parallel\.ep_async=2 overlaps the EP dispatch, but parallel\.ep=1"
    ):
        check_layout(load_config(QUICKSTART, ["parallel.ep_async=2"]), 2)
    with pytest.raises(ConfigError, match=r"parallel\.expert_compute: .*'auto', 'loop' or 'grouped_mm'"):
        load_config(QUICKSTART, ["parallel.expert_compute=cutlass"])
    t0 = time.perf_counter()
    args = ["run", QUICKSTART, "--nproc", "3", "--set", "parallel.sp=3", "--set", "data.max_tokens=510"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "config error: parallel: sp (3)" in result.output
    assert time.perf_counter() - t0 < 10  # rejected up front, nothing was launched


@pytest.mark.parametrize(
    "recipe", ["qwen2vl_7b_fsdp_sp.yaml", "qwen3_moe_30b_omni.yaml", "quickstart/recipe.yaml"]
)
def test_recipes_validate_with_dry_run(recipe):
    result = CliRunner().invoke(app, ["run", str(ROOT / "apps" / recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "# layout" in result.output and "GiB per rank" in result.output and "foundation:" in result.output
    if "moe" in recipe:
        assert "foundation: 30.5" in result.output and "expert-parallel tensors: 96" in result.output
