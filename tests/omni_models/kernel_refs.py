"""A kernel set of plain torch functions, each the formula of the HF code it stands in for: the swapped
modules (omni_models.kernel_modules) around them must then compute exactly what HF's modules do, which
is what the CPU tests check; liger's functions in their place are compared on a GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from omni_models.kernels import KernelSet


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _chunk_cross_entropy(logits, targets, grad):
    """F.cross_entropy and its autograd gradient with respect to the chunk's logits."""
    x = logits.detach().float().requires_grad_(grad)
    with torch.enable_grad():
        loss = F.cross_entropy(x, targets, reduction="sum")
        g = torch.autograd.grad(loss, x)[0].to(logits.dtype) if grad else None
    return loss.detach(), g


TORCH_FORMULAS = KernelSet(
    "torch-formulas",
    rms_norm=_rms_norm,
    silu_mul=lambda a, b: F.silu(a) * b,
    rope=apply_rotary_pos_emb,
    chunk_cross_entropy=_chunk_cross_entropy,
)
