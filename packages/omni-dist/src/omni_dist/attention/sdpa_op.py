"""The per-document SDPA backend as one torch custom op, for compiled blocks.

`sdpa_varlen` reads the document boundaries on the host and loops over document lengths: dynamo cannot
trace that, and a graph break there splits a compiled block into several graphs whose resumed parts
recompile for each layout. Inside a compiled block `sdpa_varlen` calls this op instead: the compiler
sees one opaque op whose output is shaped like q, so the block stays one graph for every packed
length. Its backward runs the same documents again under `torch.func.vjp` (the op keeps q, k, v, not
the attention's intermediates): the gradients are those of `sdpa_varlen` itself, at the cost of one
more attention forward. The GPU backends (varlen, flash_attn) are custom ops of their own already.
"""

from __future__ import annotations

import torch

_NAMESPACE = "omni_dist"


@torch.library.custom_op(f"{_NAMESPACE}::sdpa_varlen", mutates_args=())
def sdpa_varlen_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None,
    causal: bool,
) -> torch.Tensor:
    """(T, Hq, D), (T, Hkv, D) x2, cu_seqlens -> (T, Hq, D), as `backends.sdpa_varlen`."""
    return _sdpa_varlen(q, k, v, cu_seqlens, scale, causal)


@torch.library.custom_op(f"{_NAMESPACE}::sdpa_varlen_backward", mutates_args=())
def _sdpa_varlen_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float | None,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # A custom op's body runs below autograd: torch.func.vjp differentiates it all the same.
    _, vjp = torch.func.vjp(lambda q, k, v: _sdpa_varlen(q, k, v, cu_seqlens, scale, causal), q, k, v)
    return vjp(grad)


@sdpa_varlen_op.register_fake
def _(q, k, v, cu_seqlens, scale, causal):
    return torch.empty_like(q)


@_sdpa_varlen_backward.register_fake
def _(grad, q, k, v, cu_seqlens, scale, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, ctx.scale, ctx.causal = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)


def _backward(ctx, grad):
    q, k, v, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _sdpa_varlen_backward(grad, q, k, v, cu_seqlens, ctx.scale, ctx.causal)
    return dq, dk, dv, None, None, None


sdpa_varlen_op.register_autograd(_backward, setup_context=_setup_context)


def _sdpa_varlen(q, k, v, cu_seqlens, scale, causal) -> torch.Tensor:
    # Imported here: backends imports this module (its sdpa_varlen calls the op when compiling).
    from omni_dist.attention.backends import sdpa_varlen

    return sdpa_varlen(q, k, v, cu_seqlens, 0, scale, causal)
