"""Activation recompute and activation offload, applied to module instances from outside.

Both wrap the instance's `forward` (never the class, never library code), so parameter names and
state dicts are unchanged and FSDP units can be applied on the same modules afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from omni_dist.plan import PlanError

_MARK = "_omni_forward_wrappers"

# Selective recompute keeps the outputs of the expensive ops (matmuls, attention) and recomputes the
# cheap elementwise ones; this is the usual trade for transformer blocks.
_SAVE_OPS = tuple(
    op
    for op in (
        getattr(torch.ops.aten, name, None)
        for name in (
            "mm",
            "addmm",
            "bmm",
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
        )
    )
    if op is not None
)
_SAVE_OVERLOADS = {getattr(op, "default", op) for op in _SAVE_OPS}


def _is_attention_kernel(op: Any) -> bool:
    """GPU varlen/flash attention ops registered by torch or flash-attn (namespaces vary by version)."""
    name = str(op)
    return "varlen_attn" in name or "flash_attn_varlen_forward" in name


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if op in _SAVE_OVERLOADS or _is_attention_kernel(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _wrap_forward(module: nn.Module, fqn: str, kind: str, make: Callable[[Callable], Callable]) -> None:
    applied = getattr(module, _MARK, ())
    if kind in applied:
        raise PlanError(f"{kind} is already applied to module {fqn!r}; a plan may apply it once.")
    if applied:
        raise PlanError(
            f"module {fqn!r} would get both {applied[0]} and {kind}; recomputed activations are not "
            "saved, so offloading them does nothing. List it in one of plan.recompute / plan.offload."
        )
    module.forward = make(module.forward)
    setattr(module, _MARK, (*applied, kind))


def apply_recompute(module: nn.Module, fqn: str, mode: str) -> None:
    """Recompute this module's activations in backward: `full`, or `selective` (keep matmul/attention)."""
    if mode not in ("full", "selective"):
        raise ValueError(f"recompute mode {mode!r} is not one of: none, full, selective.")
    context_fn = (
        functools.partial(create_selective_checkpoint_contexts, _selective_policy)
        if mode == "selective"
        else None
    )

    def make(inner: Callable) -> Callable:
        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            extra = {"context_fn": context_fn} if context_fn is not None else {}
            return checkpoint(inner, *args, use_reentrant=False, **extra, **kwargs)

        return forward

    _wrap_forward(module, fqn, f"recompute:{mode}", make)


class ActivationOffloader:
    """Saved-tensor hooks that move a module's saved activations to CPU (pinned when on GPU).

    Tensors that share storage with the module's parameters (weights saved by matmuls, often as
    views) are never moved: FSDP owns that memory. On CPU the activations stay where they are.
    `saved` counts activations and `params_kept` parameter tensors that went through the hooks.
    """

    def __init__(self) -> None:
        self.saved = 0
        self.params_kept = 0
        self.offloaded_bytes = 0
        self.param_storages: set[int] = set()

    def pack(self, t: torch.Tensor) -> Any:
        if t.untyped_storage().data_ptr() in self.param_storages:
            self.params_kept += 1
            return t
        self.saved += 1
        if t.device.type == "cpu":
            return t
        self.offloaded_bytes += t.numel() * t.element_size()
        cpu = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
        cpu.copy_(t, non_blocking=True)
        return (t.device, cpu)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple):
            device, cpu = packed
            return cpu.to(device, non_blocking=True)
        return packed


def apply_activation_offload(module: nn.Module, fqn: str) -> ActivationOffloader:
    offloader = ActivationOffloader()

    def make(inner: Callable) -> Callable:
        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            # The parameters as they are now (FSDP has just gathered them for this forward).
            offloader.param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
            with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
                return inner(*args, **kwargs)

        return forward

    _wrap_forward(module, fqn, "offload", make)
    return offloader
