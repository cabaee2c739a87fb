"""Every shipped HF decoder plan matches its model family (on tiny meta-device models)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from omni_dist.plan import PlanError
from omni_models.hf_plans import HF_DECODER_PLANS, plan_for

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)  # fmt: skip


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config, Qwen3Config])
def test_plan_matches_family(config_cls):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config_cls(**SMALL))
    plan = plan_for(model)
    for attr in ("fsdp_units", "recompute", "offload"):
        assert [fqn for fqn, _ in plan.match_modules(model, attr)] == ["model.layers.0", "model.layers.1"]
    assert plan.fp32_modules == ()


def test_text_lm_of_a_vlm_family_has_its_plan():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig

    from omni_models.foundations.text_lm import Qwen2VLTextForCausalLM

    with torch.device("meta"):
        model = Qwen2VLTextForCausalLM(Qwen2VLTextConfig(**SMALL))
    plan = plan_for(model)
    assert [fqn for fqn, _ in plan.match_modules(model, "fsdp_units")] == ["model.layers.0", "model.layers.1"]


def test_moe_plan_names_experts_and_their_tensors():
    from transformers import Qwen3MoeConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            Qwen3MoeConfig(**SMALL, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
        )
    plan = plan_for(model)
    assert [f for f, _ in plan.match_modules(model, "experts")] == [
        "model.layers.0.mlp.experts",
        "model.layers.1.mlp.experts",
    ]
    assert sorted(plan.match_expert_params(model)) == [
        f"model.layers.{i}.mlp.experts.{n}" for i in (0, 1) for n in ("down_proj", "gate_up_proj")
    ]
    assert plan.expert_forward == "fused_gate_up"


def test_unknown_family_is_named():
    with pytest.raises(PlanError, match="no parallel plan for Linear; known: LlamaForCausalLM"):
        plan_for(torch.nn.Linear(2, 2))
    assert set(HF_DECODER_PLANS) == {
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "Qwen2VLTextForCausalLM",
        "Qwen2_5_VLTextForCausalLM",
        "Qwen2_5OmniThinkerTextForCausalLM",
        "Qwen3VLTextForCausalLM",
        "Qwen3VLMoeTextForCausalLM",
        "Qwen3OmniMoeThinkerTextForCausalLM",
    }
