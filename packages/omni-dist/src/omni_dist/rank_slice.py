"""One rank's view of a packed micro-batch: its part of the sequence and what the loss reads there.

Under Ulysses SP each rank of a group holds a contiguous slice [start, start + length) of the packed
sequence (omni_dist.sequence.slice_for_sp); without SP the slice is the whole sequence. The view is
worked out once per micro-batch, on the host (labels and generation-target positions stay there:
PackedBatch.to), and read by everything that needs this rank's part: the model's embedding, forward and
loss heads, and the trainer's count of the tokens each rank's loss covers.

A plain class, not a dataclass, because it is what the trainer hands the model: FSDP2's root pre-forward
rebuilds every dataclass, dict and list argument and, on CUDA, copies each tensor in it to the device
(blocking, torch 2.11 `_to_kwargs`), which would move the host-side indices there and make every
data-dependent index op wait on the device. An object it does not know reaches the model untouched.
"""

from __future__ import annotations

import torch

from omni_dist.attention.ulysses import SequenceParallel
from omni_dist.packed import PackedBatch
from omni_dist.sequence import IGNORE_INDEX, slice_for_sp


class RankSlice:
    __slots__ = ("batch", "labelled", "labels", "length", "predicted", "sp", "start")

    def __init__(
        self,
        batch: PackedBatch,
        sp: SequenceParallel | None,
        start: int,
        length: int,
        labels: torch.Tensor,
        labelled: torch.Tensor,
        predicted: dict[str, torch.Tensor],
    ):
        self.batch = batch
        self.sp = sp
        self.start = start  # first position of this rank's slice in the packed sequence
        self.length = length
        self.labels = labels  # (length,) this slice's (shifted) text labels, on the host
        self.labelled = labelled  # host indices, within the slice, of the positions with a text label
        # generated modality -> host indices (into its target's positions) of the generated tokens this
        # slice predicts: those whose predicting position, the one before them, lies in the slice
        self.predicted = predicted

    @classmethod
    def of(cls, batch: PackedBatch, sp: SequenceParallel | None = None) -> RankSlice:
        labels = batch.labels[0]
        start, length = 0, labels.shape[0]
        if sp is not None:
            labels = slice_for_sp(labels, sp)
            start, length = sp.rank * labels.shape[0], labels.shape[0]
        predicted = {}
        for modality, target in batch.targets.items():
            before = target.positions - 1 - start
            predicted[modality] = host_indices((before >= 0) & (before < length))
        return cls(batch, sp, start, length, labels, host_indices(labels != IGNORE_INDEX), predicted)

    def on(self, batch: PackedBatch) -> RankSlice:
        """The same view of a copy of its batch (e.g. the one on the device: its host-side tensors, which
        the view's facts come from, are the same)."""
        return RankSlice(batch, self.sp, self.start, self.length, self.labels, self.labelled, self.predicted)

    def __call__(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's part of a whole-sequence tensor (the sequence along `dim`)."""
        return x if self.sp is None else slice_for_sp(x, self.sp, dim)

    @property
    def loss_tokens(self) -> int:
        """Tokens whose loss this rank computes: its text labels and the generated tokens it predicts. The
        step's global sum of these is what every rank divides its loss sum by."""
        return int(self.labelled.numel()) + sum(int(p.numel()) for p in self.predicted.values())


def host_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices of a host mask (a data-dependent size: only ever on the host, where it does not wait)."""
    return torch.nonzero(mask).flatten()
