"""HF models through the registered packed attention: packed equals padded, per-sample, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config, Qwen3MoeConfig

from omni_dist.sequence import pack
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


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "qwen3_moe"])
def test_packed_equals_padded_batch_loss_and_gradients(family):
    register_packed_attention()
    if family == "qwen2":
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
    samples = _samples()
    total_a, tokens_a = _padded_loss(padded, samples)
    total_b, tokens_b = packed_loss_sum(packed, pack(samples))
    assert tokens_a == tokens_b == sum(n - 1 for n in LENGTHS)
    torch.testing.assert_close(total_b / tokens_b, total_a / tokens_a, rtol=1e-5, atol=0)
    (total_a / tokens_a).backward()
    (total_b / tokens_b).backward()
    for (name, a), b in zip(padded.named_parameters(), packed.parameters(), strict=True):
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
