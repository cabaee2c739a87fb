"""A recipe naming a pretrained Qwen2-VL directory trains through the trainer: JSONL samples with images
and videos -> the family's markers and M-RoPE positions -> packed micro-batches; the loss falls, and
FSDP on 2 ranks and sp=2 on 2 ranks give the single process's losses and gradient norms. The trained
checkpoint exports (`omni-train convert`) as a Qwen2-VL directory that HF's own class, tokenizer and
image processor load, computing our loss; loaded back as `model.pretrained` it gives that loss again."""

from __future__ import annotations

import base64
import json

import torch
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration
from typer.testing import CliRunner

from omni_models.config import OmniModelConfig
from omni_train.assembly import chat_processor, checkpoint_model
from omni_train.cli import app
from omni_train.config import TrainConfig, load_config
from omni_train.local import run_local
from tests.e2e.conftest import _single, close, read_metrics
from tests.harness import PRELOAD, run_ranks
from tests.omni_models.hf_dirs import qwen_vl_dir
from tests.omni_models.hf_families import build, hf_inputs, pack, processed, vl_sample

STEPS = 8
MEDIA = [("image",), ("video",), (), ("image", "video"), ("image",)]


def _recipe(model_dir, data, run_dir, **parallel) -> dict:
    return {
        "model": {"pretrained": str(model_dir)},  # the tokenizer defaults to it
        "data": {
            "sources": [{"kind": "jsonl", "paths": str(data)}],
            "max_tokens": 192,
            "num_workers": 0,
            "streams": 2,
            "shuffle_buffer": 8,
        },
        "parallel": parallel,
        "train": {"steps": STEPS, "lr": 3e-3, "warmup_steps": 1},
        "checkpoint": {"async_save": False},
        "logging": {"run_dir": str(run_dir), "console": "none", "tensorboard": False},
    }


def test_pretrained_recipe_trains_and_layouts_agree(tmp_path):
    model_dir = qwen_vl_dir(tmp_path, init=0.1)
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(48):
            doc, files = vl_sample(i, MEDIA[i % len(MEDIA)], size=(8 * (1 + i % 3), 16))
            f.write(
                json.dumps({**doc, "files": {k: base64.b64encode(v).decode() for k, v in files.items()}})
                + "\n"
            )
    single = _recipe(model_dir, data, tmp_path / "single")
    run_ranks(
        _single, 1, TrainConfig.model_validate(single).model_dump(mode="json"), init_process_group=False
    )
    ref = read_metrics(tmp_path / "single")
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS]["loss"] < 0.85 * ref[1]["loss"], (ref[1]["loss"], ref[STEPS]["loss"])
    assert (tmp_path / "single" / "checkpoints" / "latest").exists()
    _export_round_trip(tmp_path, model_dir)
    for name, parallel in {"fsdp": {"dp_shard": 2}, "sp": {"sp": 2}}.items():
        run_local(
            TrainConfig.model_validate(_recipe(model_dir, data, tmp_path / name, **parallel)),
            2,
            preload=PRELOAD,
        )
        got = read_metrics(tmp_path / name)
        for step in range(1, STEPS + 1):
            a, b = got[step], ref[step]
            assert close(a["loss"], b["loss"]) and close(a["grad_norm"], b["grad_norm"]), (name, step, a, b)


def _export_round_trip(tmp_path, model_dir):
    ckpt = (
        tmp_path
        / "single"
        / "checkpoints"
        / (tmp_path / "single" / "checkpoints" / "latest").read_text().strip()
    )
    out = tmp_path / "exported"
    result = CliRunner().invoke(app, ["convert", str(ckpt), str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    cfg = load_config(tmp_path / "single" / "config.yaml")
    trained = checkpoint_model(cfg, ckpt)
    tok = AutoTokenizer.from_pretrained(out)  # tokenizer, chat template and image processor came along
    assert AutoImageProcessor.from_pretrained(out).merge_size == 2
    proc = chat_processor(trained, cfg.model_spec, tok)
    samples = processed(proc, [vl_sample(100 + i, m) for i, m in enumerate(MEDIA)])
    batch = pack(samples)
    n = batch.num_label_tokens
    with torch.no_grad():
        ours = trained(batch).loss_sum / n
        hf = Qwen2VLForConditionalGeneration.from_pretrained(
            out, attn_implementation="sdpa", dtype=torch.float32
        )
        theirs = sum(hf(**hf_inputs(s), num_items_in_batch=n).loss for s in samples)
        reloaded, _ = build(OmniModelConfig.from_dict({"pretrained": str(out)}))
        again = reloaded(batch).loss_sum / n
        original, _ = build(OmniModelConfig.from_dict({"pretrained": str(model_dir)}))
        before = original(batch).loss_sum / n
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=0)
    torch.testing.assert_close(again, ours, rtol=1e-5, atol=0)
    assert abs(before.item() - ours.item()) > 1e-3  # the export holds the trained weights, not the originals
