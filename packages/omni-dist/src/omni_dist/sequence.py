"""Packed sequences under sequence parallelism: padding, label shifting, slicing and gathering.

The collator packs samples into one sequence; for SP the trainer then pads it to a multiple of sp
(the padding forms one extra segment in cu_seqlens, so real tokens never attend to it and every
backend handles it), shifts labels within each sample (before slicing, so the last token of a
slice still gets its target from the next slice), and gives each SP rank a contiguous slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from omni_dist.attention.ulysses import SequenceParallel

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PackedSequence:
    """One packed sequence: flat (T,) token ids, position ids restarting per sample, next-token labels."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor  # already shifted: labels[t] is the target of token t (IGNORE_INDEX if none)
    cu_seqlens: torch.Tensor  # int32 [0, ..., T]
    max_seqlen: int

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def shift_labels(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Next-token targets within each sample: out[t] = labels[t+1], IGNORE_INDEX at each sample's end."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:-1] = labels[1:]
    out[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return out


def pack(samples: list[torch.Tensor], label_masks: list[torch.Tensor] | None = None) -> PackedSequence:
    """Concatenate token sequences into one PackedSequence (labels = tokens where the mask is True)."""
    lengths = torch.tensor([len(s) for s in samples])
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    ids = torch.cat(samples)
    labels = ids.clone()
    if label_masks is not None:
        labels[~torch.cat(label_masks)] = IGNORE_INDEX
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()])
    return PackedSequence(ids, positions, shift_labels(labels, cu), cu, int(lengths.max()))


def pad_for_sp(seq: PackedSequence, sp_size: int, pad_id: int = 0) -> PackedSequence:
    """Pad to a multiple of sp_size; the padding is its own segment with ignored labels."""
    pad = -seq.length % sp_size
    if pad == 0:
        return seq
    cu = torch.cat([seq.cu_seqlens, seq.cu_seqlens.new_tensor([seq.length + pad])])
    return PackedSequence(
        input_ids=torch.cat([seq.input_ids, seq.input_ids.new_full((pad,), pad_id)]),
        position_ids=torch.cat(
            [
                seq.position_ids,
                torch.arange(pad, dtype=seq.position_ids.dtype, device=seq.position_ids.device),
            ]
        ),
        labels=torch.cat([seq.labels, seq.labels.new_full((pad,), IGNORE_INDEX)]),
        cu_seqlens=cu,
        max_seqlen=max(seq.max_seqlen, pad),
    )


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
