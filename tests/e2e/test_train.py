"""End to end on CPU: the quickstart recipe trains through `omni-train run`'s machinery.

- metrics.jsonl holds the required keys;
- FSDP on 2 processes and sp=2 on 2 processes match 1 process (loss and grad norm, rel 1e-5) over
  the same steps: all runs read the same two data streams, so every step has the same global batch;
- a real `omni-train run` process group is SIGKILLed after a checkpoint and re-run with
  checkpoint.resume=auto: the remaining steps reproduce the uninterrupted run's losses;
- 2 micro-batches in one step equal 1 micro-batch holding both samples.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from omni_train.config import load_config
from omni_train.local import run_local
from omni_train.metrics import REQUIRED
from tests.e2e.conftest import RECIPE, STEPS, _single, close, overrides, read_metrics
from tests.harness import PRELOAD, run_ranks
from tests.omni_dist.tiny import RTOL


def test_metrics_and_parity_across_layouts(runs):
    _, _, out = runs
    metrics = {name: read_metrics(run_dir) for name, (run_dir, _) in out.items()}
    single = metrics["single"]
    assert sorted(single) == list(range(1, STEPS + 1))
    for record in single.values():
        assert set(REQUIRED) <= set(record) and record["tokens"] > 0 and record["mfu"] is None
    assert single[STEPS]["loss_text"] < 0.7 * single[1]["loss_text"]
    for name in ("fsdp", "sp"):
        for step in range(1, STEPS + 1):
            a, b = metrics[name][step], single[step]
            assert close(a["loss"], b["loss"]) and close(a["grad_norm"], b["grad_norm"]), (name, step, a, b)
            assert a["tokens"] == b["tokens"]
    run_dir = out["fsdp"][0]
    assert (run_dir / "config.yaml").exists() and any((run_dir / "tensorboard").iterdir())
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/loss" in x]
    assert [e["step"] for e in evals] == [6, 12] and evals[1]["eval/loss"] < evals[0]["eval/loss"] * 1.5
    assert {"eval/loss_text", "eval/loss_image_gen"} <= set(evals[1])  # by part, over the whole eval shard


def test_kill_and_resume_continues_with_identical_losses(runs):
    data, root, out = runs
    run_dir = root / "killed"
    cmd = [sys.executable, "-m", "omni_train.cli", "run", str(RECIPE), "--nproc", "2"]
    for o in overrides(data, run_dir, ["parallel.dp_shard=2"]):
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        latest = run_dir / "checkpoints" / "latest"
        if latest.exists() and latest.read_text().strip() >= "step-00000004":
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
            killed_at = latest.read_text().strip()
            break
        time.sleep(0.05)
    proc.wait()
    assert killed_at is not None, proc.stderr.read().decode()[-3000:]
    done_before = max(read_metrics(run_dir))
    assert done_before < STEPS  # it really was interrupted
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step" in result.stderr
    resumed, reference = read_metrics(run_dir), read_metrics(out["fsdp"][0])
    first = int(killed_at.split("-")[1]) + 1
    for step in range(first, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=RTOL), step
        assert resumed[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=RTOL), step


def test_convert_exports_hf_parts_that_load(runs, tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from omni_train.cli import app

    run_dir = runs[2]["fsdp"][0]
    ckpt = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    result = CliRunner().invoke(app, ["convert", str(ckpt), str(tmp_path / "hf"), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {
        "foundation",
        "encoders",
        "projectors",
        "decoders",
    }
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / "foundation")
    out = model(input_ids=torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out.logits).all()


def test_generate_command_draws_from_a_trained_run(runs, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from omni_train.cli import app

    run_dir = runs[2]["fsdp"][0]
    argv = ["generate", str(run_dir), "--prompt", "Draw the digit two.", "--image-answer"]
    result = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "gen.jsonl")])
    assert result.exit_code == 0, result.output
    assert "<|image_end|>" in result.output  # exactly one image's tokens, then the end marker
    with Image.open(tmp_path / "prompt-0.png") as im:
        assert im.size == (16, 16)  # the recipe's VQ decoder: 4 x 4 codes of 4 x 4 px


def _accumulation_rank(data: str) -> tuple[list[float], list[float]]:
    from omni_data.collate import collate
    from omni_data.schema import parse_sample
    from omni_dist import ParallelDims, ParallelMesh
    from omni_dist.grad_norm import clip_grad_norm_
    from omni_dist.weights import materialize_
    from omni_models.config import build_omni_model
    from omni_models.omni_weights import init_omni_weights_
    from omni_train.assembly import preprocessing_processor
    from omni_train.config import load_config as load
    from omni_train.trainer import forward_backward

    cfg = load(str(RECIPE), [f"data.tokenizer={data}/tokenizer"]).model_spec
    mesh = ParallelMesh.build(ParallelDims(world_size=1), device_type="cpu")
    proc = preprocessing_processor(str(RECIPE), f"{data}/tokenizer")
    docs = [json.loads(x) for x in Path(data, "raw/quickstart.jsonl").read_text().splitlines()[:4]]
    samples = [
        proc.process(
            proc.measure(
                parse_sample(
                    d,
                    key=d["id"],
                    source="t",
                    media_bytes=lambda n: None,
                    read_path=lambda p: Path(data, "raw", p).read_bytes(),
                )
            )
        )
        for d in docs
    ]
    results = []
    for micro in ([collate(samples[:2]), collate(samples[2:])], [collate(samples)]):
        with torch.device("meta"):
            model = build_omni_model(cfg)
        materialize_(model, "cpu")
        init_omni_weights_(model, 0)
        loss = forward_backward(model, micro, mesh, None, torch.device("cpu")).loss
        norm = clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1e9).item()
        results.append([float(loss), norm])
    return results[0], results[1]


def test_two_micro_batches_equal_one_with_both_samples(quickstart_data):
    data, _ = quickstart_data
    ((two, one),) = run_ranks(_accumulation_rank, 1, str(data))
    assert close(two[0], one[0]) and close(two[1], one[1]), (two, one)


MOE_FOUNDATION = (
    "model.foundation={name: qwen3_moe, config: {vocab_size: 512, hidden_size: 96, intermediate_size: 128,"
    " moe_intermediate_size: 32, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,"
    " head_dim: 24, num_experts: 8, num_experts_per_tok: 2, router_aux_loss_coef: 0.05,"
    " max_position_embeddings: 1024, tie_word_embeddings: false, dtype: float32}}"
)


def test_moe_foundation_with_expert_parallel_matches_one_process(quickstart_data, tmp_path):
    """The quickstart omni model on a Qwen3-MoE foundation: ep=2 (FSDP 2, chunked async dispatch, both
    local expert computations; and sp=2 x ep=2) trains like one process, load-balancing loss included.
    The EP runs compute the text and image-code losses 8 positions at a time; the one process all logits."""
    data, _ = quickstart_data
    steps = ["train.steps=6", "train.eval_every=0"]
    layouts = {
        "single": (1, ["train.loss_chunk=0"]),
        "ep2_async": (
            2,
            ["parallel.dp_shard=2", "parallel.ep=2", "parallel.ep_async=2", "train.loss_chunk=8"],
        ),
        "ep2_loop": (2, ["parallel.dp_shard=2", "parallel.ep=2", "parallel.expert_compute=loop"]),
        "sp2_ep2": (
            2,
            ["parallel.sp=2", "parallel.ep=2", "train.loss_chunk=8"],
        ),  # aux loss of a sequence split over SP
    }
    metrics = {}
    for name, (n, extra) in layouts.items():
        cfg = load_config(RECIPE, overrides(data, tmp_path / name, [MOE_FOUNDATION, *steps, *extra]))
        if n > 1:
            run_local(cfg, n, preload=PRELOAD)
        else:
            run_ranks(_single, 1, cfg.model_dump(mode="json"), init_process_group=False)
        metrics[name] = read_metrics(tmp_path / name)
    single = metrics["single"]
    assert sorted(single) == list(range(1, 7)) and all(r["loss_moe_aux"] > 0 for r in single.values())
    for name in ("ep2_async", "ep2_loop", "sp2_ep2"):
        for step, ref in single.items():
            got = metrics[name][step]
            for key in ("loss", "grad_norm", "loss_moe_aux"):
                assert close(got[key], ref[key]), (name, step, key, got[key], ref[key])


def test_gradients_reduced_once_per_step_through_the_trainer(quickstart_data, tmp_path):
    """`parallel.grad_sync: step` with 2 micro-batches per step trains as reducing after each one."""
    data, _ = quickstart_data
    common = ["train.steps=3", "train.eval_every=0", "data.micro_batches_per_step=2", "parallel.dp_shard=2"]
    metrics = {}
    for mode in ("micro_batch", "step"):
        cfg = load_config(RECIPE, overrides(data, tmp_path / mode, [*common, f"parallel.grad_sync={mode}"]))
        run_local(cfg, 2, preload=PRELOAD)
        metrics[mode] = read_metrics(tmp_path / mode)
    assert sorted(metrics["step"]) == [1, 2, 3]
    for step, ref in metrics["micro_batch"].items():
        got = metrics["step"][step]
        assert close(got["loss"], ref["loss"]) and close(got["grad_norm"], ref["grad_norm"]), (step, got, ref)
