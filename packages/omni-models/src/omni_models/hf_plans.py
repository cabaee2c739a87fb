"""Parallel plans for HF decoder-only language models, declared as data beside the model families.

Each transformer block is an FSDP unit and the unit of recompute/offload. RMSNorms are not fp32
units: HF norms already compute in fp32 internally, a tiny unit per norm would cost an all-gather
each, and units nested in a block cannot be selectively recomputed. Nothing here touches HF code.
"""

from __future__ import annotations

from torch import nn

from omni_dist.plan import ParallelPlan, PlanError


def decoder_plan(block: str) -> ParallelPlan:
    return ParallelPlan(fsdp_units=(block,), recompute=(block,), offload=(block,))


def moe_decoder_plan(block: str, experts: str) -> ParallelPlan:
    """Blocks as units; fused expert tensors (E, ...) split over ep by the fused-experts EP forward."""
    return ParallelPlan(
        fsdp_units=(block,),
        recompute=(block,),
        offload=(block,),
        experts=(experts,),
        expert_params={"*.mlp.experts.gate_up_proj": "shard0", "*.mlp.experts.down_proj": "shard0"},
        expert_forward="fused_gate_up",
    )


HF_DECODER_PLANS: dict[str, ParallelPlan] = {
    "LlamaForCausalLM": decoder_plan("LlamaDecoderLayer"),
    "Qwen3MoeForCausalLM": moe_decoder_plan("Qwen3MoeDecoderLayer", "Qwen3MoeExperts"),
    "Qwen2ForCausalLM": decoder_plan("Qwen2DecoderLayer"),
    "Qwen3ForCausalLM": decoder_plan("Qwen3DecoderLayer"),
    "Qwen2VLTextForCausalLM": decoder_plan("Qwen2VLDecoderLayer"),
    "Qwen2_5_VLTextForCausalLM": decoder_plan("Qwen2_5_VLDecoderLayer"),
    "Qwen2_5OmniThinkerTextForCausalLM": decoder_plan("Qwen2_5OmniDecoderLayer"),
}


def plan_for(model: nn.Module) -> ParallelPlan:
    """The plan of `model`'s family (by class name)."""
    name = type(model).__name__
    try:
        return HF_DECODER_PLANS[name]
    except KeyError:
        raise PlanError(
            f"no parallel plan for {name}; known: {', '.join(sorted(HF_DECODER_PLANS))}. "
            "Add one with omni_models.hf_plans.decoder_plan(block_class)."
        ) from None
