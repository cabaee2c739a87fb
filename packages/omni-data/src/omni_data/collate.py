"""The collator: processed samples -> one packed micro-batch in the layout the model expects."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omni_data.processor import ProcessedMedia, ProcessedSample
from omni_dist.sequence import IGNORE_INDEX, shift_labels


@dataclass
class MediaBatch:
    """All items of one modality in a micro-batch, in sequence order."""

    tensors: dict[str, torch.Tensor]  # each processor output concatenated along dim 0
    sizes: dict[str, list[int]]  # per key, each item's extent along dim 0
    llm_tokens: torch.Tensor  # (items,) placeholder count per item
    encoder_units: torch.Tensor  # (items,)
    positions: torch.Tensor  # (sum llm_tokens,) placeholder positions in the packed sequence

    @property
    def num_items(self) -> int:
        return int(self.llm_tokens.numel())


@dataclass
class PackedBatch:
    """One micro-batch: samples packed into a single sequence (batch dim 1)."""

    input_ids: torch.Tensor  # (1, T)
    position_ids: torch.Tensor  # (1, T), restarting at 0 per sample
    labels: torch.Tensor  # (1, T), shifted: IGNORE_INDEX on prompts, media, sample ends and padding
    cu_seqlens: torch.Tensor  # (n + 1,) int32; SP padding is its own last segment
    max_seqlen: int
    media: dict[str, MediaBatch] = field(default_factory=dict)  # encoder inputs by modality
    targets: dict[str, MediaBatch] = field(default_factory=dict)  # generation targets by modality
    sample_ids: list[str] = field(default_factory=list)
    num_tokens: int = 0  # real (unpadded) tokens
    is_padding: bool = False  # a filler micro-batch: runs the model, contributes nothing

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def cost(self) -> int:
        units = [b.encoder_units for b in (*self.media.values(), *self.targets.values())]
        return self.num_tokens + sum(int((u.long() ** 2).sum()) for u in units)


def _media_batch(items: list[tuple[ProcessedMedia, int]]) -> MediaBatch:
    keys = list(items[0][0].tensors)
    for m, _ in items:
        if list(m.tensors) != keys:
            raise ValueError(f"{m.modality} processor returned keys {list(m.tensors)}, expected {keys}")
    tensors = {k: torch.cat([m.tensors[k] for m, _ in items]) for k in keys}
    sizes = {k: [int(m.tensors[k].shape[0]) for m, _ in items] for k in keys}
    positions = torch.cat([torch.arange(m.llm_tokens) + offset + m.start for m, offset in items])
    return MediaBatch(
        tensors,
        sizes,
        torch.tensor([m.llm_tokens for m, _ in items]),
        torch.tensor([m.encoder_units for m, _ in items]),
        positions,
    )


def collate(samples: list[ProcessedSample], pad_to_multiple: int = 1, pad_id: int = 0) -> PackedBatch:
    """Pack samples into one sequence; pad to a multiple of `pad_to_multiple` (the SP degree)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    lengths = [int(s.input_ids.numel()) for s in samples]
    total = sum(lengths)
    pad = -total % pad_to_multiple
    seg = lengths + ([pad] if pad else [])
    cu = torch.zeros(len(seg) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seg).cumsum(0)
    ids = torch.cat([s.input_ids for s in samples] + [torch.full((pad,), pad_id, dtype=torch.long)])
    labels = torch.cat([s.labels for s in samples] + [torch.full((pad,), IGNORE_INDEX, dtype=torch.long)])
    positions = torch.cat([torch.arange(n) for n in seg])
    grouped: dict[tuple[bool, str], list[tuple[ProcessedMedia, int]]] = {}
    for s, offset in zip(samples, cu[:-1].tolist(), strict=False):
        for m in s.media:
            grouped.setdefault((m.generate, m.modality), []).append((m, offset))
    return PackedBatch(
        input_ids=ids.unsqueeze(0),
        position_ids=positions.unsqueeze(0),
        labels=shift_labels(labels, cu).unsqueeze(0),
        cu_seqlens=cu,
        max_seqlen=max(seg),
        media={k: _media_batch(v) for (gen, k), v in grouped.items() if not gen},
        targets={k: _media_batch(v) for (gen, k), v in grouped.items() if gen},
        sample_ids=[s.id for s in samples],
        num_tokens=total,
    )


def padding_batch(length: int, pad_id: int = 0) -> PackedBatch:
    """A filler micro-batch for a rank whose stream has ended: no labels, no media, no samples."""
    return PackedBatch(
        input_ids=torch.full((1, length), pad_id, dtype=torch.long),
        position_ids=torch.arange(length).unsqueeze(0),
        labels=torch.full((1, length), IGNORE_INDEX, dtype=torch.long),
        cu_seqlens=torch.tensor([0, length], dtype=torch.int32),
        max_seqlen=length,
        is_padding=True,
    )
