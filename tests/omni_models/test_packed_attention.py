"""HF models through the registered packed attention: packed equals padded, per-sample, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3Config,
    Qwen3MoeConfig,
)

from omni_dist.packed import pack
from omni_dist.weights import init_weights_, materialize_
from omni_models.attention import implementation_name, register_packed_attention
from tests.omni_dist.tiny import packed_loss_sum, plain_model, tiny_qwen2_config

LENGTHS = [9, 4, 12, 6]


def _samples(vocab: int = 128):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=g) for n in LENGTHS]


def _padded_loss(model, samples):
    """The usual way: right-padded batch with an attention mask, labels -100 on padding."""
    width = max(LENGTHS)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    labels = ids.masked_fill(mask == 0, -100)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    target = labels[:, 1:]
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total, int((target != -100).sum())


def _qwen2_vl(impl: str):
    """Qwen2-VL (its language model is what packed attention serves; the vision tower idles here)."""
    text = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=1,
        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
    )
    vision = dict(
        depth=1,
        embed_dim=16,
        hidden_size=32,
        num_heads=2,
        in_chans=3,
        patch_size=2,
        spatial_merge_size=1,
        temporal_patch_size=1,
    )
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=120, video_token_id=121,
                           vision_start_token_id=122, bos_token_id=0, eos_token_id=1)  # fmt: skip
    config._attn_implementation = config.text_config._attn_implementation = impl
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    materialize_(model, "cpu")
    init_weights_(model, model._init_weights, seed=0)
    return model


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "qwen3_moe", "qwen2_vl"])
def test_packed_equals_padded_batch_loss_and_gradients(family):
    register_packed_attention()
    if family == "qwen2_vl":
        padded, packed = _qwen2_vl("sdpa"), _qwen2_vl(implementation_name("sdpa"))
    elif family == "qwen2":
        padded = plain_model(tiny_qwen2_config())
        packed = plain_model(tiny_qwen2_config(attn_implementation=implementation_name("sdpa")))
    else:
        cls = {"llama": LlamaConfig, "qwen3": Qwen3Config, "qwen3_moe": Qwen3MoeConfig}[family]
        kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
        if family == "qwen3_moe":
            kw.update(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
        padded = plain_model(cls(**kw, attn_implementation="sdpa"))
        packed = plain_model(cls(**kw, attn_implementation=implementation_name("sdpa")))
    samples = [s % 100 for s in _samples()]  # plain text tokens (Qwen2-VL reserves ids >= 120)
    total_a, tokens_a = _padded_loss(padded, samples)
    total_b, tokens_b = packed_loss_sum(packed, pack(samples))
    assert tokens_a == tokens_b == sum(n - 1 for n in LENGTHS)
    torch.testing.assert_close(total_b / tokens_b, total_a / tokens_a, rtol=1e-5, atol=0)
    (total_a / tokens_a).backward()
    (total_b / tokens_b).backward()
    for (name, a), b in zip(padded.named_parameters(), packed.parameters(), strict=True):
        if a.grad is None and b.grad is None:  # unused here (Qwen2-VL's vision tower)
            continue
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_missing_packing_keywords_are_named():
    register_packed_attention()
    model = AutoModelForCausalLM.from_config(
        tiny_qwen2_config(attn_implementation=implementation_name("sdpa"))
    )
    with pytest.raises(ValueError, match="needs cu_seq_lens_q and max_length_q"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), use_cache=False)
    with pytest.raises(ValueError, match="unknown attention backend 'flash2'"):
        implementation_name("flash2")
    sliding = AutoModelForCausalLM.from_config(
        tiny_qwen2_config(attn_implementation=implementation_name("sdpa"), use_sliding_window=True,
                          sliding_window=4, max_window_layers=0, layer_types=["sliding_attention"] * 3)
    )  # fmt: skip
    with pytest.raises(
        ValueError, match="asks for sliding_window=4, which packed attention does not implement"
    ):
        packed_loss_sum(sliding, pack(_samples()))
