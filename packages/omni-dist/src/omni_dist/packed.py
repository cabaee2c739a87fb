"""The packed micro-batch: samples concatenated into one sequence (batch dim 1), media alongside.

This is the one batch type of the project: the collator (omni-data) makes it, the model (omni-models)
reads it, generation builds one for its prompt, and it moves itself to a device. Layout:

    input_ids, labels                 (1, T); labels already shifted
                                      (IGNORE_INDEX on prompts, media, sample ends and padding)
    position_ids                      (1, T), or (3, 1, T) for M-RoPE (HF's layout, rows t/h/w);
                                      they restart per sample; the sequence is always the last dim
    cu_seqlens (n + 1,) int32         sample boundaries; SP padding is its own last segment
    media / targets                   encoder inputs / generation targets by modality (MediaBatch)

`pack` and `pad_for_sp` build one from token sequences (tests, benchmarks, plain-text training).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from omni_dist.sequence import IGNORE_INDEX, shift_labels


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device` without the host waiting: on CUDA through page-locked memory (torch's
    caching host allocator keeps it until the copy is done), as CUDA may stage a pageable copy synchronously."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass
class MediaBatch:
    """All items of one modality in a micro-batch, in sequence order."""

    tensors: dict[str, torch.Tensor]  # each item's processor output concatenated along dim 0
    sizes: dict[str, list[int]]  # per key, each item's extent along dim 0
    llm_tokens: torch.Tensor  # (items,) placeholder count per item
    encoder_units: torch.Tensor | None = None  # (items,) encoder work per item (for balancing)
    positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @classmethod
    def of(cls, items: list[dict[str, torch.Tensor]], llm_tokens: list[int]) -> MediaBatch:
        """Items of processor output (same keys each) with their placeholder counts; no positions."""
        keys = list(items[0])
        for item in items:
            if list(item) != keys:
                raise ValueError(
                    f"media items have keys {list(item)} and {keys}: a processor must be consistent"
                )
        return cls(
            {k: torch.cat([i[k] for i in items]) for k in keys},
            {k: [int(i[k].shape[0]) for i in items] for k in keys},
            torch.tensor(llm_tokens),
        )

    @property
    def num_items(self) -> int:
        return int(self.llm_tokens.numel())

    def item_positions(self) -> list[torch.Tensor]:
        """Each item's placeholder positions (its llm_tokens of `positions`, in item order)."""
        return list(self.positions.split(self.llm_tokens.tolist()))

    def select(self, items: list[int]) -> MediaBatch:
        """The batch of only these items (in this order): tensors, counts and positions."""
        tensors = {}
        for k, t in self.tensors.items():
            parts = t.split(self.sizes[k])
            tensors[k] = torch.cat([parts[i] for i in items]) if items else t[:0]
        positions = self.item_positions()
        index = torch.tensor(items, dtype=torch.long)
        return MediaBatch(
            tensors,
            {k: [v[i] for i in items] for k, v in self.sizes.items()},
            self.llm_tokens[index],
            self.encoder_units[index] if self.encoder_units is not None else None,
            torch.cat([positions[i] for i in items]) if items else self.positions[:0],
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MediaBatch:
        """Floating-point tensors (pixels, features) to `device`; integer ones (grids, frame counts), the
        placeholder positions and counts stay on the host, where the model reads them without waiting on
        the device (see PackedBatch.to)."""
        return dataclasses.replace(
            self,
            tensors={
                k: v.to(device, non_blocking=non_blocking) if v.is_floating_point() else v
                for k, v in self.tensors.items()
            },
        )

    def host_tensors(self) -> list[torch.Tensor]:
        """The tensors `to` leaves on the host."""
        kept = [v for v in self.tensors.values() if not v.is_floating_point()]
        return [*kept, self.llm_tokens, self.positions] + (
            [self.encoder_units] if self.encoder_units is not None else []
        )

    def pin_memory(self) -> MediaBatch:
        return dataclasses.replace(self, tensors={k: v.pin_memory() for k, v in self.tensors.items()})


@dataclass
class PackedBatch:
    """One micro-batch: samples packed into a single sequence (batch dim 1)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    media: dict[str, MediaBatch] = field(default_factory=dict)  # encoder inputs by modality
    targets: dict[str, MediaBatch] = field(default_factory=dict)  # generation targets by modality
    sample_ids: list[str] = field(default_factory=list)
    num_tokens: int = 0  # real tokens: the first num_tokens positions; the rest is SP padding
    is_padding: bool = False  # a filler micro-batch: runs the model, contributes nothing

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def cost(self) -> int:
        """LLM tokens + squared encoder units per media item (what balancing evens out)."""
        units = [b.encoder_units for b in (*self.media.values(), *self.targets.values())]
        return self.num_tokens + sum(int((u.long() ** 2).sum()) for u in units if u is not None)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedBatch:
        """The batch on `device` (itself when already there). What the device computes with moves
        (ids, positions, cu_seqlens, media pixels/features); what only decides which rows go where stays
        on the host (labels, media positions and grids): the model builds its index tensors there and sends
        them over without a data-dependent op on the device, so a step never waits on it. Copies are
        asynchronous: from pinned memory (`pin_memory`, the loader's) they overlap compute."""
        if torch.device(device) == self.input_ids.device:
            return self
        move = {"non_blocking": non_blocking}
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device, **move),
            position_ids=self.position_ids.to(device, **move),
            cu_seqlens=self.cu_seqlens.to(device, **move),
            media={k: v.to(device, **move) for k, v in self.media.items()},
            targets={k: v.to(device, **move) for k, v in self.targets.items()},
        )

    def host_tensors(self) -> list[torch.Tensor]:
        """The tensors `to` leaves on the host."""
        media = [t for m in (*self.media.values(), *self.targets.values()) for t in m.host_tensors()]
        return [self.labels, *media]

    def device_tensors(self) -> list[torch.Tensor]:
        """The tensors `to` moves."""
        media = [
            t
            for m in (*self.media.values(), *self.targets.values())
            for t in m.tensors.values()
            if t.is_floating_point()
        ]
        return [self.input_ids, self.position_ids, self.cu_seqlens, *media]

    def pin_memory(self) -> PackedBatch:
        """Page-locked copies (torch's DataLoader calls this with pin_memory=True)."""
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            position_ids=self.position_ids.pin_memory(),
            cu_seqlens=self.cu_seqlens.pin_memory(),
            media={k: v.pin_memory() for k, v in self.media.items()},
            targets={k: v.pin_memory() for k, v in self.targets.items()},
        )


def pack(samples: list[torch.Tensor], label_masks: list[torch.Tensor] | None = None) -> PackedBatch:
    """Token sequences -> one PackedBatch (labels = the tokens where the mask is True)."""
    lengths = torch.tensor([len(s) for s in samples])
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    ids = torch.cat(samples)
    labels = ids.clone()
    if label_masks is not None:
        labels[~torch.cat(label_masks)] = IGNORE_INDEX
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()])
    return PackedBatch(
        ids[None],
        positions[None],
        shift_labels(labels, cu)[None],
        cu,
        int(lengths.max()),
        num_tokens=int(ids.numel()),
    )


def pad_for_sp(batch: PackedBatch, sp_size: int, pad_id: int = 0) -> PackedBatch:
    """Pad to a multiple of sp_size; the padding is its own segment with ignored labels."""
    pad = -batch.length % sp_size
    if pad == 0:
        return batch

    def extend(x: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, tail.to(x.device, x.dtype).expand(*x.shape[:-1], pad)], dim=-1)

    return dataclasses.replace(
        batch,
        input_ids=extend(batch.input_ids, torch.full((pad,), pad_id)),
        position_ids=extend(batch.position_ids, torch.arange(pad)),
        labels=extend(batch.labels, torch.full((pad,), IGNORE_INDEX)),
        cu_seqlens=torch.cat([batch.cu_seqlens, batch.cu_seqlens.new_tensor([batch.length + pad])]),
        max_seqlen=max(batch.max_seqlen, pad),
    )
