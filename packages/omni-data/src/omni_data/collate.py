"""The collator: processed samples -> one packed micro-batch (omni_dist.packed.PackedBatch)."""

from __future__ import annotations

import torch

from omni_data.processor import ProcessedMedia, ProcessedSample
from omni_dist.packed import MediaBatch, PackedBatch, pad_for_sp
from omni_dist.sequence import IGNORE_INDEX, shift_labels


def _media_batch(items: list[tuple[ProcessedMedia, int]]) -> MediaBatch:
    keys = list(items[0][0].tensors)
    for m, _ in items:
        if list(m.tensors) != keys:
            raise ValueError(f"{m.modality} processor returned keys {list(m.tensors)}, expected {keys}")
    tensors = {k: torch.cat([m.tensors[k] for m, _ in items]) for k in keys}
    sizes = {k: [int(m.tensors[k].shape[0]) for m, _ in items] for k in keys}
    positions = torch.cat([m.positions + offset for m, offset in items])
    return MediaBatch(
        tensors,
        sizes,
        torch.tensor([m.llm_tokens for m, _ in items]),
        torch.tensor([m.encoder_units for m, _ in items]),
        positions,
    )


def _positions(samples: list[ProcessedSample]) -> torch.Tensor:
    """(1, T), or (rows, 1, T) when the model makes multi-row positions (M-RoPE: HF's (3, B, T)
    layout); every sample's positions start at 0, a sample without its own gets 0..L-1 on every row."""
    rows = {s.position_ids.shape[0] for s in samples if s.position_ids is not None}
    if len(rows) > 1:
        raise ValueError(f"samples have position ids with different row counts {sorted(rows)}")
    n = rows.pop() if rows else 1
    parts = []
    for s in samples:
        own = s.position_ids
        parts.append(own if own is not None else torch.arange(s.input_ids.numel()).expand(n, -1))
    out = torch.cat(parts, dim=-1)
    return out.unsqueeze(1) if n > 1 else out


def collate(samples: list[ProcessedSample], pad_to_multiple: int = 1, pad_id: int = 0) -> PackedBatch:
    """Pack samples into one sequence; pad to a multiple of `pad_to_multiple` (the SP degree)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    lengths = [int(s.input_ids.numel()) for s in samples]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    labels = torch.cat([s.labels for s in samples])
    grouped: dict[tuple[bool, str], list[tuple[ProcessedMedia, int]]] = {}
    for s, offset in zip(samples, cu[:-1].tolist(), strict=False):
        for m in s.media:
            grouped.setdefault((m.generate, m.modality), []).append((m, offset))
    batch = PackedBatch(
        input_ids=torch.cat([s.input_ids for s in samples]).unsqueeze(0),
        position_ids=_positions(samples),
        labels=shift_labels(labels, cu).unsqueeze(0),
        cu_seqlens=cu,
        max_seqlen=max(lengths),
        media={k: _media_batch(v) for (gen, k), v in grouped.items() if not gen},
        targets={k: _media_batch(v) for (gen, k), v in grouped.items() if gen},
        sample_ids=[s.id for s in samples],
        num_tokens=sum(lengths),
    )
    return pad_for_sp(batch, pad_to_multiple, pad_id)


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
