"""Parallel plans for HF decoder-only language models, declared as data beside the model families.

Each transformer block is an FSDP unit and the unit of recompute/offload; RMSNorms keep fp32 weights
under bf16 compute. Nothing here touches the HF model code.
"""

from __future__ import annotations

from torch import nn

from omni_dist.plan import ParallelPlan, PlanError


def decoder_plan(block: str, norm: str) -> ParallelPlan:
    return ParallelPlan(fsdp_units=(block,), recompute=(block,), offload=(block,), fp32_modules=(norm,))


HF_DECODER_PLANS: dict[str, ParallelPlan] = {
    "LlamaForCausalLM": decoder_plan("LlamaDecoderLayer", "LlamaRMSNorm"),
    "Qwen2ForCausalLM": decoder_plan("Qwen2DecoderLayer", "Qwen2RMSNorm"),
    "Qwen3ForCausalLM": decoder_plan("Qwen3DecoderLayer", "Qwen3RMSNorm"),
}


def plan_for(model: nn.Module) -> ParallelPlan:
    """The plan of `model`'s family (by class name)."""
    name = type(model).__name__
    try:
        return HF_DECODER_PLANS[name]
    except KeyError:
        raise PlanError(
            f"no parallel plan for {name}; known: {', '.join(sorted(HF_DECODER_PLANS))}. "
            "Add one with omni_models.hf_plans.decoder_plan(block_class, norm_class)."
        ) from None
