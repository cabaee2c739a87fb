"""Parallel plans for HF decoder-only language models, declared as data beside the model families.

Each transformer block is an FSDP unit and the unit of recompute/offload and of compile. RMSNorms are
not fp32 units: HF norms already compute in fp32 internally, a tiny unit per norm would cost an
all-gather each, and units nested in a block cannot be selectively recomputed. RMSNorms, SwiGLU MLPs
and RoPE attention are where a kernel set (liger) may stand in. Nothing here touches HF code.
"""

from __future__ import annotations

from torch import nn

from omni_dist.plan import ParallelPlan, PlanError


def kernels(norm: str, mlp: str | None = None, attention: str | None = None) -> dict[str, str]:
    """The modules a kernel set replaces (omni_models.kernels): the RMSNorms, the dense SwiGLU MLPs and the
    self-attention around RoPE (M-RoPE families too: transformers folds the sections into cos/sin)."""
    out = {norm: "rms_norm"}
    if mlp:
        out[mlp] = "swiglu"
    if attention:
        out[attention] = "rope"
    return out


def decoder_plan(block: str, kernels: dict[str, str] | None = None) -> ParallelPlan:
    return ParallelPlan(
        fsdp_units=(block,), recompute=(block,), offload=(block,), kernels=kernels or {}, compile=(block,)
    )


def moe_decoder_plan(block: str, experts: str, kernels: dict[str, str] | None = None) -> ParallelPlan:
    """Blocks as units; fused expert tensors (E, ...) split over ep by the fused-experts EP forward."""
    return ParallelPlan(
        fsdp_units=(block,),
        recompute=(block,),
        offload=(block,),
        experts=(experts,),
        expert_params={"*.mlp.experts.gate_up_proj": "shard0", "*.mlp.experts.down_proj": "shard0"},
        expert_forward="fused_gate_up",
        kernels=kernels or {},
        compile=(block,),
    )


# Class names are per family (each HF file defines its own copies).
HF_DECODER_PLANS: dict[str, ParallelPlan] = {
    "LlamaForCausalLM": decoder_plan(
        "LlamaDecoderLayer", kernels("LlamaRMSNorm", "LlamaMLP", "LlamaAttention")
    ),
    "Qwen3MoeForCausalLM": moe_decoder_plan(
        "Qwen3MoeDecoderLayer", "Qwen3MoeExperts", kernels("Qwen3MoeRMSNorm", None, "Qwen3MoeAttention")
    ),
    "Qwen2ForCausalLM": decoder_plan(
        "Qwen2DecoderLayer", kernels("Qwen2RMSNorm", "Qwen2MLP", "Qwen2Attention")
    ),
    "Qwen3ForCausalLM": decoder_plan(
        "Qwen3DecoderLayer", kernels("Qwen3RMSNorm", "Qwen3MLP", "Qwen3Attention")
    ),
    "Qwen2VLTextForCausalLM": decoder_plan(
        "Qwen2VLDecoderLayer", kernels("Qwen2VLRMSNorm", "Qwen2MLP", "Qwen2VLAttention")
    ),
    "Qwen2_5_VLTextForCausalLM": decoder_plan(
        "Qwen2_5_VLDecoderLayer", kernels("Qwen2_5_VLRMSNorm", "Qwen2MLP", "Qwen2_5_VLAttention")
    ),
    "Qwen2_5OmniThinkerTextForCausalLM": decoder_plan(
        "Qwen2_5OmniDecoderLayer", kernels("Qwen2_5OmniRMSNorm", "Qwen2MLP", "Qwen2_5OmniAttention")
    ),
    "Qwen3VLTextForCausalLM": decoder_plan(
        "Qwen3VLTextDecoderLayer", kernels("Qwen3VLTextRMSNorm", "Qwen3VLTextMLP", "Qwen3VLTextAttention")
    ),
    # Qwen3VLMoeTextExperts: fused (E, 2I, H) / (E, H, I) in memory, as Qwen3MoeExperts
    "Qwen3VLMoeTextForCausalLM": moe_decoder_plan(
        "Qwen3VLMoeTextDecoderLayer",
        "Qwen3VLMoeTextExperts",
        kernels("Qwen3VLMoeTextRMSNorm", None, "Qwen3VLMoeTextAttention"),
    ),
    # Qwen3OmniMoeThinkerTextExperts: fused (E, 2I, H) / (E, H, I) in memory (saved per expert); its final
    # norm is another class than its blocks' norms
    "Qwen3OmniMoeThinkerTextForCausalLM": moe_decoder_plan(
        "Qwen3OmniMoeThinkerTextDecoderLayer",
        "Qwen3OmniMoeThinkerTextExperts",
        kernels("Qwen3OmniMoeThinkerTextRMSNorm", None, "Qwen3OmniMoeThinkerTextAttention")
        | kernels("Qwen3OmniMoeTextRMSNorm"),
    ),
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
