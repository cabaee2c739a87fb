"""The memory model and the layout planner: predictions follow the layout, match measured peaks of real
steps, and `omni-train plan` keeps only what fits and ranks it by predicted time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omni_train.cli import app
from omni_train.config import load_config
from omni_train.memory import GIB, estimate_memory, loss_head
from omni_train.planner import DEVICES, plan
from tests.omni_models.hf_dirs import qwen2_vl_7b_config_dir
from tests.omni_models.scale_dirs import qwen3_vl_8b_config_dir, qwen3_vl_30b_a3b_config_dir

ROOT = Path(__file__).resolve().parents[2]
MOE = str(ROOT / "apps/qwen3_moe_30b_omni.yaml")
QUICKSTART = str(ROOT / "apps/quickstart/recipe.yaml")


def test_memory_parts_follow_the_layout():
    def est(*overrides, world=4):
        cfg = load_config(QUICKSTART, list(overrides))
        return estimate_memory(cfg, world, head=loss_head(cfg, liger=False))

    one, four = est(world=1), est()
    assert one.resident["parameters"] == 4 * four.resident["parameters"]
    assert one.backward_end["gradients"] == 4 * four.backward_end["gradients"]
    accumulating = est("data.micro_batches_per_step=2")
    assert accumulating.resident["gradients"] == four.backward_end["gradients"]  # held through the step
    full = est("parallel.recompute=full")
    assert full.forward_end["activations: foundation"] < four.forward_end["activations: foundation"] / 5
    assert "recomputed block (foundation)" in full.transients
    sp2 = est("parallel.sp=2")
    assert sp2.forward_end["activations: foundation"] == four.forward_end["activations: foundation"] / 2
    vision = "activations: encoders.vision"  # the SP ranks share the media, or each encodes it all
    assert sp2.forward_end[vision] == four.forward_end[vision] / 2
    assert (
        est("parallel.sp=2", "parallel.encoder_balance=none").forward_end[vision] == four.forward_end[vision]
    )
    assert est("train.loss_chunk=64").transients["loss head chunk"] < four.transients["loss head chunk"]
    offloaded = est("parallel.offload_params=true")
    assert "parameters" not in offloaded.resident and offloaded.host["parameters"] > 0
    assert offloaded.peak < four.peak
    kept = est("parallel.reshard_after_forward=false")
    assert kept.forward_end["gathered units"] > four.resident["gathered foundation unit"]
    # a frozen encoder saves nothing for backward; a trainable one does, per encoder unit
    assert "activations: encoders.vision" in four.forward_end
    frozen = est("model.encoders.vision.freeze=true")
    assert "activations: encoders.vision" not in frozen.forward_end


def test_predictions_match_measured_peaks_of_real_steps():
    """bench/memory_model.py on two of its runs (FSDP on 2 ranks, MoE with EP on 2 ranks): within 25%."""
    runs = ["h512-l4-fsdp2", "moe-h512-l2-ep2"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench/memory_model.py"), "--only", *runs],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["run"] for r in result["runs"]] == runs
    for r in result["runs"]:
        assert 0.75 <= r["predicted"] / r["measured"] <= 1.25, r


def test_plan_keeps_what_fits_ranked_by_predicted_time():
    cfg = load_config(MOE)
    feasible, infeasible = plan(cfg, 8, DEVICES["h100"])
    assert feasible and infeasible
    assert all(c.memory_gib <= 80 for c in feasible) and all(c.memory_gib > 80 for c in infeasible)
    rates = [c.tokens_per_s_per_device for c in feasible]  # real tokens per second, most first
    assert rates == sorted(rates, reverse=True)
    times = [c.step_s for c in feasible]  # unknown documents: every micro-batch full, so fastest first
    assert times == sorted(times)
    # what it calls infeasible is infeasible by the memory model the dry run prints
    worst = max(infeasible, key=lambda c: c.memory_gib)
    layout_cfg = load_config(MOE, worst.layout.overrides())
    predicted = estimate_memory(layout_cfg, 8, head=loss_head(layout_cfg, liger=False)).peak / GIB
    assert predicted == pytest.approx(worst.memory_gib) and worst.memory_gib > 80
    # every layout keeps the recipe's tokens per step
    step_tokens = {c.layout.max_tokens * c.layout.micro_batches * 8 // c.layout.sp for c in feasible}
    assert len(step_tokens) == 1


def test_plan_command_on_the_real_scale_recipes(tmp_path):
    def pretrained(make) -> list[str]:
        return ["--set", f"model.pretrained={make(tmp_path)}"]

    recipes = (  # (recipe, its overrides, GPU counts)
        (str(ROOT / "apps/qwen2vl_7b_fsdp_sp.yaml"), pretrained(qwen2_vl_7b_config_dir), (8, 128)),
        (MOE, [], (8, 128)),
        (str(ROOT / "apps/qwen3_vl_8b.yaml"), pretrained(qwen3_vl_8b_config_dir), (16,)),
        (str(ROOT / "apps/qwen3_vl_30b_a3b.yaml"), pretrained(qwen3_vl_30b_a3b_config_dir), (32,)),
    )
    for recipe, extra, counts in recipes:
        for gpus in counts:
            result = CliRunner().invoke(app, ["plan", recipe, "--gpus", str(gpus), "--gpu-mem", "80", *extra])
            assert result.exit_code == 0, result.output
            assert f"{gpus} x H100 SXM (80 GiB each)" in result.output
            assert "\n 1 " in result.output and "\n1: --set parallel." in result.output
    tiny = CliRunner().invoke(app, ["plan", MOE, "--gpus", "8", "--gpu-mem", "1"])
    assert tiny.exit_code == 0 and "no layout fits; the smallest predicted peak is" in tiny.output
