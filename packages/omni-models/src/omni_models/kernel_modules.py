"""Modules that stand in for HF's RMSNorm, SwiGLU MLP and self-attention with a kernel doing the math.

Each one takes over the module it replaces: the same parameter objects under the same names (weights load,
save and initialise unchanged) and the same forward, except that the kernel function computes the norm,
the gated activation or the rotary embedding. Which modules are replaced is the plan's business
(plan.kernels); which functions run is the kernel set's (omni_models.kernels).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

RMSNormFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]  # (x, weight, eps)
SiluMulFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate, up) -> silu(gate) * up
# (q, k, cos, sin), q/k as (batch, heads, tokens, head_dim), cos/sin as (batch, tokens, head_dim)
RopeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _children(module: nn.Module, kernel: str, required: set[str], optional: frozenset = frozenset()) -> dict:
    children = dict(module.named_children())
    if not required <= set(children) <= required | optional:
        also = f" (and optionally {sorted(optional)})" if optional else ""
        raise ValueError(
            f"the {kernel} kernel replaces modules made of {sorted(required)}{also}; {type(module).__name__} "
            f"has {sorted(children)}. Remove it from the plan's kernels."
        )
    return children


class KernelRMSNorm(nn.Module):
    """HF's Llama/Qwen RMSNorm: weight * (x / rms(x)), computed in fp32 and cast back before the weight."""

    def __init__(self, norm: nn.Module, fn: RMSNormFn):
        super().__init__()
        params = dict(norm.named_parameters())
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if set(params) != {"weight"} or eps is None:
            raise ValueError(
                f"the rms_norm kernel replaces a norm with one `weight` and `variance_epsilon`; "
                f"{type(norm).__name__} has parameters {sorted(params)}. Remove it from the plan's kernels."
            )
        self.weight = params["weight"]
        self.variance_epsilon = float(eps)
        self.fn = fn

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fn(hidden_states, self.weight, self.variance_epsilon)


class SwiGLUMLP(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)), the gated product in one kernel."""

    def __init__(self, mlp: nn.Module, silu_mul: SiluMulFn):
        super().__init__()
        children = _children(mlp, "swiglu", {"gate_proj", "up_proj", "down_proj", "act_fn"})
        act = children.pop("act_fn")
        if not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
            raise ValueError(
                f"the swiglu kernel computes silu; {type(mlp).__name__} uses {type(act).__name__}."
            )
        self.gate_proj, self.up_proj, self.down_proj = (
            children[n] for n in ("gate_proj", "up_proj", "down_proj")
        )
        self.silu_mul = silu_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.silu_mul(self.gate_proj(x), self.up_proj(x)))


class RotaryAttention(nn.Module):
    """The self-attention of HF's Llama, Qwen2, Qwen3(-MoE) decoders and the Qwen2-VL, Qwen2.5-VL and
    Qwen2.5-Omni text models (q/k/v/o projections, Qwen3's per-head q/k norms, then RoPE and the configured
    attention function), its RoPE done by `rope`. M-RoPE arrives as cos/sin with its sections folded in."""

    _COPIED = (
        "config",
        "layer_idx",
        "head_dim",
        "scaling",
        "is_causal",
        "attention_dropout",
        "num_key_value_groups",
    )

    def __init__(self, attention: nn.Module, rope: RopeFn):
        super().__init__()
        projections = {"q_proj", "k_proj", "v_proj", "o_proj"}
        for name, child in _children(attention, "rope", projections, frozenset({"q_norm", "k_norm"})).items():
            self.add_module(name, child)
        for attr in self._COPIED:
            setattr(self, attr, getattr(attention, attr))
        # Llama passes no sliding window to the attention function; Qwen's pass theirs (None when off).
        self.extra = (
            {"sliding_window": attention.sliding_window} if hasattr(attention, "sliding_window") else {}
        )
        # "eager" attention is the replaced module's own file's function, as in its forward
        self.eager = sys.modules[type(attention).__module__].eager_attention_forward
        self.rope = rope

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        query, key = self.q_proj(hidden_states).view(shape), self.k_proj(hidden_states).view(shape)
        if hasattr(self, "q_norm"):
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        query, key = self.rope(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager)
        out, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **self.extra,
            **kwargs,
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights
