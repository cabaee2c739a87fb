"""Kernel sets: which functions compute RMSNorm, SwiGLU, RoPE and the LM head's cross-entropy.

`parallel.kernels` (omni_dist.parallelize.Kernels) picks one at parallelize time:
- `torch`: none; the model's own modules and the chunked loss head (omni_dist.loss_head) run;
- `liger`: liger-kernel's Triton kernels (CUDA, the `gpu` extra); the plan's `kernels` modules are swapped
  for omni_models.kernel_modules around them, and the LM head's loss is liger's fused linear cross-entropy;
- `auto`: liger where it can run (a CUDA device and liger-kernel importable), else torch; one log line says
  which and why.
Nothing is patched: the swaps are module replacements on the meta model (omni_dist.kernel_swap).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from omni_dist.kernel_swap import KernelSwap
from omni_models.kernel_modules import KernelRMSNorm, RMSNormFn, RopeFn, RotaryAttention, SiluMulFn, SwiGLUMLP

log = logging.getLogger(__name__)

# (hidden (rows, H), weight (V, H), bias (V,) or None, targets (rows,)) -> summed fp32 cross-entropy
LinearCrossEntropyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KernelSet:
    name: str
    rms_norm: RMSNormFn
    silu_mul: SiluMulFn
    rope: RopeFn
    linear_cross_entropy: LinearCrossEntropyFn

    def swaps(self) -> dict[str, KernelSwap]:
        """Kernel name (as plans write it) -> the replacement of a module."""
        return {
            "rms_norm": lambda m: KernelRMSNorm(m, self.rms_norm),
            "swiglu": lambda m: SwiGLUMLP(m, self.silu_mul),
            "rope": lambda m: RotaryAttention(m, self.rope),
        }


def liger_kernels() -> KernelSet:
    """liger-kernel's functions (raises ImportError without it)."""
    from liger_kernel.transformers.functional import (
        liger_fused_linear_cross_entropy,
        liger_rms_norm,
        liger_rope,
        liger_swiglu,
    )

    def rms_norm(x, weight, eps):
        # out of place: in place, liger overwrites the incoming gradient, which the residual branch shares
        return liger_rms_norm(x, weight, eps, 0.0, "llama", False)

    def rope(q, k, cos, sin):
        # liger rotates in the storage it is given: here the q/k projections' outputs, which selective
        # recompute keeps for backward; a copy keeps them as they were
        return liger_rope(q.clone(), k.clone(), cos, sin)

    def linear_cross_entropy(hidden, weight, bias, targets):
        loss = liger_fused_linear_cross_entropy(
            hidden, weight, targets, bias, reduction="sum", accum_dtype=torch.float32
        )
        return loss.float()

    return KernelSet("liger", rms_norm, liger_swiglu, rope, linear_cross_entropy)


def liger_status(device_type: str) -> str:
    """ "ok", or why liger's kernels cannot run here."""
    if device_type != "cuda":
        return f"liger-kernel's Triton kernels run on CUDA, this run's device is {device_type}"
    try:
        liger_kernels()
    except ImportError as e:
        return f"liger-kernel is not usable ({e}); install the `gpu` extra (uv sync --extra gpu)"
    return "ok"


def select_kernels(choice: str, device_type: str, announce: bool = True) -> KernelSet | None:
    """The kernel set `choice` (auto | liger | torch) names on `device_type`; None: torch's own modules."""
    if choice == "torch":
        reason = "requested"
    else:
        status = liger_status(device_type)
        if status == "ok":
            if announce:
                log.info(
                    "kernels: liger (%s)", "requested" if choice == "liger" else "auto: CUDA and liger-kernel"
                )
            return liger_kernels()
        if choice == "liger":
            raise ValueError(
                f"parallel.kernels=liger cannot run: {status}. Use parallel.kernels=auto or torch."
            )
        reason = f"auto: {status}"
    if announce:
        log.info("kernels: torch (%s)", reason)
    return None
