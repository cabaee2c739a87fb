"""Activation memory of transformer blocks: what autograd saves per token, from a block's config.

Counted from the tensors a block saves for backward (torch.autograd.graph.saved_tensors_hooks over the
HF classes, distinct storages), in elements per token:

    pre-norm (RMSNorm / LayerNorm)     input, normalized input, the next matmul's input   3 h
    attention                          q, k, v (after RoPE), output (SDPA also its LSE)     2 q + 2 kv
    q/k norm (Qwen3)                   their inputs and normalized outputs                  2 q + 2 kv
    gated MLP (SwiGLU)                 gate, up, act(gate), act(gate) * up                  4 i
    plain MLP (fc1 -> act -> fc2)      fc1 output, activation output                        2 i
    MoE (top-k of E experts)           router logits and probabilities                     2 E
                                       per routed copy: its input, gate/up/act/product, output  k (2 h + 4 i)

A Qwen2 decoder layer is 8 h + 2 kv + 4 i (measured: exactly that, plus 2 + heads fp32 scalars).
`selective` recompute keeps the block input and the matmul and attention outputs; `full` keeps the
block input only and recomputes one block at a time in backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BlockShape:
    hidden: int
    q_dim: int  # attention width of the queries (heads x head_dim)
    kv_dim: int  # of the keys and of the values each
    intermediate: int  # MLP width (per expert for MoE)
    gated: bool = True
    qk_norm: bool = False
    experts: int = 0  # 0: a dense MLP
    top_k: int = 0
    shared_intermediate: int = 0  # an MoE block's shared expert (Qwen2-MoE), 0: none
    counted: tuple[int, int] | None = None  # (a, b): measured a h + b i saved per token, else the formula

    def saved(self, recompute: str = "none") -> int:
        """Elements saved per token for backward under `recompute` (none | selective | full)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        if recompute == "full":
            return h
        mlp_matmuls = (2 if self.gated else 1) * i  # gate and up (or fc1) outputs
        if recompute == "selective":  # input, q/k/v, attention output, o_proj and MLP matmul outputs
            routed = self.top_k * (mlp_matmuls + h) if self.experts else mlp_matmuls + h
            return h + q + 2 * kv + q + h + routed
        if self.counted is not None:
            return self.counted[0] * h + self.counted[1] * i
        attention = 3 * h + 2 * q + 2 * kv + (2 * q + 2 * kv if self.qk_norm else 0)
        mlp = 3 * h + (4 if self.gated else 2) * i
        if self.experts:
            mlp = 3 * h + 2 * self.experts + self.top_k * (2 * h + 4 * i)
            mlp += 4 * self.shared_intermediate
        return attention + mlp


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def decoder_block(config: Any) -> BlockShape:
    """The decoder layer of an HF causal LM config (Llama / Qwen2 / Qwen3 / their MoE variants)."""
    config = getattr(config, "text_config", None) or config
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = _get(config, "head_dim", default=h // heads)
    kv = _get(config, "num_key_value_heads", default=heads) * head_dim
    experts = _get(config, "num_experts", "num_local_experts", "n_routed_experts", default=0)
    model_type = getattr(config, "model_type", "")
    return BlockShape(
        hidden=h,
        q_dim=heads * head_dim,
        kv_dim=kv,
        intermediate=_get(config, "moe_intermediate_size", default=config.intermediate_size)
        if experts
        else config.intermediate_size,
        qk_norm=model_type.startswith("qwen3"),
        experts=experts,
        top_k=_get(config, "num_experts_per_tok", default=0) if experts else 0,
        shared_intermediate=_get(config, "shared_expert_intermediate_size", default=0) if experts else 0,
    )


# Encoder blocks whose saved tensors were counted (saved_tensors_hooks, the HF class at two depths and
# two MLP widths): Qwen2-VL's vision block also keeps its fused qkv output and quick_gelu's sigmoid.
COUNTED_ENCODER_BLOCKS = {"qwen2_vl_vision": (11, 3), "whisper": (9, 2)}


def encoder_block(config: Any) -> tuple[int, BlockShape] | None:
    """(blocks, block shape) of a vision or audio tower config (ViT, Qwen2-VL vision, Whisper, SigLIP):
    pre-norm blocks with full attention and a plain MLP (10 h + 2 i unless counted); None for a config
    without a width or a depth."""
    h = _get(config, "embed_dim", "d_model", "hidden_size")
    depth = _get(config, "depth", "encoder_layers", "num_hidden_layers")
    if h is None or depth is None:
        return None
    ratio = _get(config, "mlp_ratio")
    i = int(h * ratio) if ratio else _get(config, "encoder_ffn_dim", "intermediate_size", default=4 * h)
    counted = COUNTED_ENCODER_BLOCKS.get(getattr(config, "model_type", ""))
    return depth, BlockShape(hidden=h, q_dim=h, kv_dim=h, intermediate=i, gated=False, counted=counted)
