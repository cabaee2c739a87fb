"""A recipe naming a pretrained Qwen2-VL directory trains through the trainer: JSONL samples with images
and videos -> the family's markers and M-RoPE positions -> packed micro-batches; the loss falls, and
FSDP on 2 ranks and sp=2 on 2 ranks give the single process's losses and gradient norms. The trained
checkpoint exports (`omni-train convert`) as a Qwen2-VL directory that HF's own class, tokenizer and
image processor load, computing our loss; loaded back as `model.pretrained` it gives that loss again.
Qwen3-VL and Qwen3-VL-MoE (DeepStack, timestamped video; the MoE's load-balancing loss) train 30 steps
from a saved tiny model, lowering the loss, and export the same way."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
from typer.testing import CliRunner

from omni_models.config import OmniModelConfig
from omni_train.assembly import chat_processor, checkpoint_model
from omni_train.cli import app
from omni_train.config import TrainConfig, load_config
from omni_train.local import run_local
from tests.e2e.conftest import _single, close, read_metrics
from tests.harness import PRELOAD, run_ranks
from tests.omni_models.hf_dirs import hf_class, qwen_vl_dir
from tests.omni_models.hf_families import build, hf_loss, pack, processed, vl_sample

STEPS = 8
PROCESSORS = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "qwen3_vl_moe": "Qwen3VLProcessor",
}
MEDIA = [("image",), ("video",), (), ("image", "video"), ("image",)]


def _recipe(model_dir, data, run_dir, steps: int = STEPS, **parallel) -> dict:
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
        "train": {"steps": steps, "lr": 3e-3, "warmup_steps": 1},
        "checkpoint": {"async_save": False},
        "logging": {"run_dir": str(run_dir), "console": "none", "tensorboard": False},
    }


def _data(tmp_path):
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(48):
            doc, files = vl_sample(i, MEDIA[i % len(MEDIA)], size=(8 * (1 + i % 3), 16))
            f.write(
                json.dumps({**doc, "files": {k: base64.b64encode(v).decode() for k, v in files.items()}})
                + "\n"
            )
    return data


def _train_single(tmp_path, model_dir, data, steps: int) -> dict[int, dict]:
    single = _recipe(model_dir, data, tmp_path / "single", steps)
    run_ranks(
        _single, 1, TrainConfig.model_validate(single).model_dump(mode="json"), init_process_group=False
    )
    ref = read_metrics(tmp_path / "single")
    assert sorted(ref) == list(range(1, steps + 1))
    assert ref[steps]["loss"] < 0.85 * ref[1]["loss"], (ref[1]["loss"], ref[steps]["loss"])
    assert (tmp_path / "single" / "checkpoints" / "latest").exists()
    return ref


def test_pretrained_recipe_trains_and_layouts_agree(tmp_path):
    model_dir = qwen_vl_dir(tmp_path, init=0.1)
    data = _data(tmp_path)
    ref = _train_single(tmp_path, model_dir, data, STEPS)
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


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_qwen3_families_learn_from_a_saved_model_and_export(tmp_path, family):
    model_dir = qwen_vl_dir(tmp_path, family, init=0.1)
    _train_single(tmp_path, model_dir, _data(tmp_path), 30)
    _export_round_trip(tmp_path, model_dir, family)


def _export_round_trip(tmp_path, model_dir, family: str = "qwen2_vl"):
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
    assert type(AutoProcessor.from_pretrained(out)).__name__ == PROCESSORS[family]

    def loss(model) -> torch.Tensor:  # the token loss, plus a MoE's load-balancing loss as HF adds it
        out = model(batch)
        aux = 0.0 if out.aux_loss is None else out.aux_loss_coef * out.aux_loss
        return out.loss_sum / n + aux

    with torch.no_grad():
        ours = loss(trained)
        hf = hf_class(family).from_pretrained(out, attn_implementation="sdpa", dtype=torch.float32)
        theirs = hf_loss(hf, family, samples, n)[0]
        reloaded, _ = build(OmniModelConfig.from_dict({"pretrained": str(out)}))
        again = loss(reloaded)
        original, _ = build(OmniModelConfig.from_dict({"pretrained": str(model_dir)}))
        before = loss(original)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=0)
    torch.testing.assert_close(again, ours, rtol=1e-5, atol=0)
    assert abs(before.item() - ours.item()) > 1e-3  # the export holds the trained weights, not the originals
