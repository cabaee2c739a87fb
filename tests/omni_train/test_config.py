"""Training config: errors name the key before any process starts; big recipes validate (--dry-run)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omni_train.cli import app
from omni_train.config import ConfigError, check_layout, load_config
from tests.omni_models.hf_dirs import qwen2_5_omni_7b_config_dir, qwen2_vl_7b_config_dir
from tests.omni_models.scale_dirs import (
    qwen3_omni_30b_a3b_config_dir,
    qwen3_vl_8b_config_dir,
    qwen3_vl_30b_a3b_config_dir,
)

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
        (["parallel.sp_async=0"], "parallel: sp_async must be >= 1"),  # omni_dist's ParallelizeConfig
        (
            ["data.max_tokens=511", "parallel.sp=2"],
            "data.max_tokens (511) must be a multiple of parallel.sp (2)",
        ),
        (
            ["model.encoders.vision.nmae=x"],
            "model: unknown key model.encoders.vision.nmae (did you mean 'name'?)",
        ),
        (["set_without_value"], "--set expects key=value"),
        (
            ["data.sources=[{kind: webdataset, paths: x-{0..3}.tar}]"],
            "--set data.sources: the value is not valid YAML",
        ),
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
    with pytest.raises(ConfigError, match=r"parallel\.ep=2 must divide the model.s experts"):
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
    "recipe",
    [
        "qwen2vl_7b_fsdp_sp.yaml",
        "qwen2_5_omni_7b.yaml",
        "qwen3_moe_30b_omni.yaml",
        "qwen3_vl_8b.yaml",
        "qwen3_vl_30b_a3b.yaml",
        "qwen3_omni_30b_a3b.yaml",
        "quickstart/recipe.yaml",
    ],
)
def test_recipes_validate_with_dry_run(recipe, tmp_path):
    args = ["run", str(ROOT / "apps" / recipe), "--dry-run"]
    config_only = {
        "qwen2vl": qwen2_vl_7b_config_dir,
        "qwen2_5_omni": qwen2_5_omni_7b_config_dir,
        "qwen3_vl_8b": qwen3_vl_8b_config_dir,
        "qwen3_vl_30b": qwen3_vl_30b_a3b_config_dir,
        "qwen3_omni": qwen3_omni_30b_a3b_config_dir,
    }
    for prefix, make in config_only.items():  # the pretrained directory, config.json only
        if recipe.startswith(prefix):
            args += ["--set", f"model.pretrained={make(tmp_path)}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "# layout" in result.output and "GiB per rank" in result.output and "foundation:" in result.output
    if recipe.startswith("qwen2vl"):  # Qwen2-VL-7B's 8.29B: language model + vision tower (frozen)
        assert "foundation: 7.616B params (trainable)" in result.output
        assert "encoders.vision: 0.676B params (frozen)" in result.output
    if recipe.startswith("qwen2_5_omni"):  # the thinker of Qwen2.5-Omni-7B; the speech parts are not built
        assert "foundation: 7.616B params (trainable)" in result.output
        assert "encoders.vision: 0.6" in result.output and "encoders.audio: 0.6" in result.output
    if "moe" in recipe:
        assert "foundation: 30.5" in result.output and "expert-parallel tensors: 96" in result.output
    if recipe.startswith("qwen3_vl_8b"):  # Qwen3-VL-8B's 8.77B; 3 DeepStack mergers beside the 27 blocks
        assert "foundation: 8.191B params (trainable)" in result.output
        assert "encoders.vision: 0.576B params (trainable)" in result.output
    if recipe.startswith("qwen3_vl_30b"):  # Qwen3-VL-30B-A3B's 31.1B
        assert "foundation: 30.532B params (trainable)" in result.output
        assert "encoders.vision: 0.539B params (frozen)" in result.output
        assert "expert-parallel tensors: 96 (fused_gate_up)" in result.output
    if recipe.startswith("qwen3_omni"):  # the thinker of Qwen3-Omni-30B-A3B; the speech parts are not built
        assert "foundation: 30.533B params (trainable)" in result.output
        assert "encoders.vision: 0.539B params (frozen)" in result.output
        assert "encoders.audio: 0.648B params (frozen)" in result.output
        assert "expert-parallel tensors: 96 (fused_gate_up)" in result.output


def test_each_setting_is_declared_once_by_its_package():
    """The data and parallel sections are the packages' own config fields, with the packages' defaults;
    only the fields the trainer derives from other sections are left out."""
    import dataclasses

    from omni_data.config import DataConfig
    from omni_dist import ParallelDims
    from omni_dist.parallelize import ParallelizeConfig
    from omni_train.config import DERIVED, DataSection, ParallelSection

    for section, packages, own in (
        (DataSection, (DataConfig,), {"tokenizer", "eval_sources", "prepare"}),
        (ParallelSection, (ParallelDims, ParallelizeConfig), set()),
    ):
        name = section.__name__.removesuffix("Section").lower()
        package_fields = {f.name: f for cls in packages for f in dataclasses.fields(cls)}
        assert set(section.model_fields) == set(package_fields) - set(DERIVED[name]) | own
        for key, f in package_fields.items():
            if key in section.model_fields and f.default is not dataclasses.MISSING:
                assert section.model_fields[key].default == f.default, key

    # Fields the recipe could not set before reach the loader; derived ones come from their sections.
    cfg = load_config(
        QUICKSTART, ["data.shuffle_shards=false", "data.error_min_samples=7", "train.seed=5", "parallel.sp=2"]
    )
    dc = cfg.data_config()
    assert (dc.shuffle_shards, dc.error_min_samples, dc.seed, dc.pad_to_multiple) == (False, 7, 5, 2)
    assert cfg.data_config(cfg.data.eval_sources, epochs=1).epochs == 1
    assert cfg.parallelize_config().forward_prefetch == 0
    assert load_config(QUICKSTART, ["parallel.forward_prefetch=2"]).parallelize_config().forward_prefetch == 2
    with pytest.raises(ConfigError, match=r"unknown key launcher.backend"):
        load_config(QUICKSTART, ["launcher.backend=ray"])
    with pytest.raises(ConfigError, match=r"unknown key train.micro_batches_per_step.*"):
        load_config(QUICKSTART, ["train.micro_batches_per_step=2"])


def test_relative_checkpoint_dir_is_under_the_run_dir_everywhere(tmp_path):
    from omni_train.config import checkpoint_dir

    cfg = load_config(QUICKSTART, [f"logging.run_dir={tmp_path / 'run'}", "checkpoint.dir=ckpt"])
    assert cfg.checkpoint_dir == tmp_path / "run" / "ckpt"
    moved = tmp_path / "moved"  # inference and convert read a run dir wherever it is now
    assert checkpoint_dir(cfg, moved) == moved / "ckpt"
    absolute = load_config(QUICKSTART, [f"checkpoint.dir={tmp_path / 'elsewhere'}"])
    assert absolute.checkpoint_dir == checkpoint_dir(absolute, moved) == tmp_path / "elsewhere"
