"""A pretrained model gains parts by config: Qwen2-VL + a Whisper audio encoder (new projector) + a
janus_vq image decoder. On samples without the new modalities the pretrained parts compute exactly HF's
loss and gradients (the new parts run on dummies that add exactly zero); with them, the new parts train."""

from __future__ import annotations

import shutil

import torch
from transformers import AutoTokenizer

from omni_data.processor import modality_tokens
from omni_dist.rank_slice import RankSlice
from omni_models.config import OmniModelConfig
from omni_train.assembly import chat_processor
from tests.omni_models.hf_dirs import qwen_vl_dir
from tests.omni_models.hf_families import (
    assert_grads_equal,
    build,
    draw_sample,
    hf_inputs,
    pack,
    processed,
    referee,
    vl_sample,
)
from tests.omni_models.omni_fixtures import VQ, WHISPER

ADDED = {
    "encoders": {"audio": {"name": "whisper", "modalities": ["audio"], "config": WHISPER, "freeze": False}},
    "decoders": {"image_gen": {"name": "janus_vq", "modalities": ["image"], "config": VQ}},
}


def _dir_with_new_tokens(tmp_path):
    """The pretrained directory, its tokenizer extended with the new modalities' marker tokens (the
    vocabulary has room: the foundation's vocab_size is larger than the tokenizer)."""
    path = tmp_path / "mixed"
    shutil.copytree(qwen_vl_dir(tmp_path), path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": list(modality_tokens("audio"))})
    tok.save_pretrained(path)
    return path


def test_added_parts_leave_the_pretrained_model_exact_and_train(tmp_path):
    path = _dir_with_new_tokens(tmp_path)
    spec = OmniModelConfig.from_dict({"pretrained": str(path), **ADDED})
    model, loaded = build(spec)
    pretrained = {n for n, _ in model.named_parameters() if n.startswith(("foundation.", "encoders.vision."))}
    assert pretrained <= loaded and not any(n.startswith(("encoders.audio", "decoders.")) for n in loaded)
    proc = chat_processor(model, spec, AutoTokenizer.from_pretrained(path))

    # Without audio or image targets: HF's loss and every gradient of the pretrained parts, zero elsewhere
    # (in float64, so that the comparison measures the computation, not fp32 rounding).
    samples = processed(proc, [vl_sample(0, ("image",)), vl_sample(1, ("video",)), vl_sample(2, ())])
    batch = pack(samples)
    n = batch.num_label_tokens
    model.double()
    loss = model(batch).loss_sum / n
    loss.backward()
    hf = referee("qwen2_vl", path).double()
    ref = sum(hf(**hf_inputs(s), num_items_in_batch=n).loss for s in samples)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    added = {
        k: p
        for k, p in model.named_parameters()
        if k.startswith(("encoders.audio", "projectors.audio", "decoders."))
    }
    for name, p in added.items():
        assert p.grad is None or not p.grad.any(), name
    assert_grads_equal("qwen2_vl", _Pretrained(model), hf, 1e-5)

    # With them: the new parts get gradients and the loss counts the generated image's tokens.
    model.zero_grad()
    batch = pack(processed(proc, [vl_sample(3, ("audio", "image")), draw_sample(4)]))
    n = RankSlice.of(batch).loss_tokens
    (model(batch).loss_sum / n).backward()
    assert n > batch.num_label_tokens
    assert (
        model.projectors["audio"][1].weight.grad.any()
        and model.decoders["image_gen"].head.proj_out.weight.grad.any()
    )


class _Pretrained(torch.nn.Module):
    """The model's pretrained parts only (what HF's class holds), for comparing parameters by name."""

    def __init__(self, model):
        super().__init__()
        self.foundation, self.encoders = (
            model.foundation,
            torch.nn.ModuleDict({"vision": model.encoders["vision"]}),
        )
