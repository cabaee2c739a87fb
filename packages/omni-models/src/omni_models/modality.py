"""The modality protocol: what an encoder, a decoder and their media batches look like.

Small Protocols instead of base classes. An encoder is an nn.Module that turns the media of a
micro-batch into LLM-token embeddings; its processor (one per modality) turns a raw item into
tensors plus the number of LLM tokens / encoder units it becomes, and is handed to the data side
through omni-train (omni-data only knows the structural MediaProcessor Protocol).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from omni_dist.plan import ParallelPlan


class MediaInputs(Protocol):
    """All items of one modality in a micro-batch, in sequence order (omni_data.collate.MediaBatch)."""

    tensors: dict[str, torch.Tensor]  # each item's processor output concatenated along dim 0
    sizes: dict[str, list[int]]  # per key, each item's extent along dim 0
    llm_tokens: torch.Tensor  # (items,)
    positions: torch.Tensor  # placeholder positions in the packed sequence


@dataclass
class Media:
    """A MediaInputs built on the model side (dummy inputs, tests)."""

    tensors: dict[str, torch.Tensor]
    sizes: dict[str, list[int]]
    llm_tokens: torch.Tensor
    positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @classmethod
    def of(cls, items: list[dict[str, torch.Tensor]], llm_tokens: list[int]) -> Media:
        keys = list(items[0])
        return cls(
            {k: torch.cat([i[k] for i in items]) for k in keys},
            {k: [int(i[k].shape[0]) for i in items] for k in keys},
            torch.tensor(llm_tokens),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Media:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)

        return Media(
            {k: move(v) for k, v in self.tensors.items()}, self.sizes, self.llm_tokens, self.positions
        )


@dataclass(frozen=True)
class MediaCount:
    llm_tokens: int
    encoder_units: int


class MediaProcessor(Protocol):
    """Raw item (with `.data` bytes and `.name`) -> tensors; ValueError for bytes that do not decode."""

    def count(self, item: Any) -> MediaCount: ...

    def process(self, item: Any) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class Encoder(Protocol):
    """An nn.Module: media of its modalities -> (sum of llm_tokens, output_size) embeddings per modality."""

    modalities: tuple[str, ...]
    output_size: int

    def lm_encode(self, media: Mapping[str, MediaInputs]) -> dict[str, torch.Tensor]: ...

    def dummy_media(self) -> dict[str, Media]:
        """The smallest valid input, run on ranks whose micro-batch has none of its modalities."""
        ...

    def processor(self, modality: str) -> MediaProcessor: ...

    def plan(self) -> ParallelPlan:
        """FSDP units / recompute for this encoder, relative to the encoder module."""
        ...

    def flops(self, media: Mapping[str, MediaInputs]) -> float:
        """Training FLOPs (forward + backward) of encoding this media."""
        ...


@runtime_checkable
class Decoder(Protocol):
    """Reads the foundation's output for a generated modality (e.g. VQ image tokens)."""

    modalities: tuple[str, ...]

    def lm_encode(self, media: Mapping[str, MediaInputs]) -> dict[str, torch.Tensor]:
        """Teacher forcing: target media -> input embeddings at its placeholder positions."""
        ...

    def lm_embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Generated codes -> input embeddings (autoregressive sampling)."""
        ...

    def lm_head(self, hidden: torch.Tensor, media: Mapping[str, MediaInputs]) -> tuple[torch.Tensor, int]:
        """Foundation hidden states at the target positions -> (loss sum, scored tokens)."""
        ...

    def lm_generate(self, foundation: Any, prompt_embeds: torch.Tensor, **kwargs: Any) -> Any: ...

    def processor(self, modality: str) -> MediaProcessor: ...
