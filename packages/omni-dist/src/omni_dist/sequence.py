"""Packed sequences under sequence parallelism: label shifting, slicing and gathering.

A packed batch (omni_dist.packed) is padded to a multiple of sp (the padding forms one extra segment
in cu_seqlens, so real tokens never attend to it and every backend handles it); labels are shifted
within each sample before slicing (so the last token of a slice still gets its target from the next
slice), and each SP rank takes a contiguous slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from omni_dist.attention.ulysses import SequenceParallel

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Next-token targets within each sample: out[t] = labels[t+1], IGNORE_INDEX at each sample's end."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:-1] = labels[1:]
    out[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return out


def slice_for_sp(x: torch.Tensor, sp: SequenceParallel, dim: int = 0) -> torch.Tensor:
    """This rank's contiguous slice of a sequence whose length along `dim` is a multiple of sp."""
    if x.shape[dim] % sp.size:
        raise ValueError(
            f"sequence length {x.shape[dim]} is not a multiple of sp={sp.size}: pad_for_sp first."
        )
    return x.chunk(sp.size, dim=dim)[sp.rank]


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sp: SequenceParallel, dim: int) -> torch.Tensor:
        ctx.sp, ctx.dim = sp, dim
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(parts, x.contiguous(), group=sp.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.sp.group)
        return grad.chunk(ctx.sp.size, dim=ctx.dim)[ctx.sp.rank], None, None


def gather_sequence(x: torch.Tensor, sp: SequenceParallel, dim: int = 0) -> torch.Tensor:
    """The full sequence from every rank's slice (differentiable).

    Backward sums the gradient over the SP group and keeps this rank's slice: correct when each rank's
    use of the full sequence is its own contribution to the loss (as with token-weighted losses).
    """
    return _GatherSequence.apply(x, sp, dim)
