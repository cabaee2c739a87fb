"""The media contract between the data side and the model side: a processor and the counts it reports.

omni-models implements processors (one per modality, handed out by an encoder's or decoder's
`processor(modality)`); omni-data calls them (omni_data.processor.ChatProcessor) and never imports
omni-models. Both read the Protocol and MediaCount from here, so each is declared once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class MediaCount:
    """What one media item becomes, known before it is decoded (the packer budgets with it)."""

    llm_tokens: int  # positions between the item's markers in the LLM sequence
    encoder_units: int  # what the encoder runs over (patches, frames x patches, mel frames)
    # An item whose span holds the inputs of several encoders (Qwen2.5-Omni's video with its audio
    # track, interleaved): the tokens between its markers as (token, repeat) runs, `llm_tokens` in all;
    # each modality's placeholder runs are filled by that modality's part, whose encoder units
    # `part_units` gives. Empty: `llm_tokens` placeholders of the item's own modality.
    layout: tuple[tuple[str, int], ...] = ()
    part_units: tuple[tuple[str, int], ...] = ()


@runtime_checkable
class MediaProcessor(Protocol):
    """One modality's raw item -> tensors, plus the counts the packer budgets with.

    omni-train hands these (an encoder's or decoder's `processor(modality)`) to
    omni_data.processor.ChatProcessor, which calls `count` for every item of a sample it measures and
    `process` for the items of samples it packs. `item` is an omni_data.schema.MediaItem: `.data` (raw
    bytes), `.name`, `.modality`. Both raise ValueError for bytes that do not decode (the sample is
    skipped and counted as `decode_error`); any other exception is a bug and propagates.
    omni_models.contracts checks a processor against this Protocol when the model is built.
    """

    def count(self, item: Any, /) -> MediaCount:
        """(LLM tokens, encoder units) of the item, cheaply: from its header, without decoding it."""
        ...

    def process(self, item: Any, /) -> dict[str, torch.Tensor]:
        """The decoded item as tensors; a micro-batch concatenates each key over its items along dim 0.
        An item whose count has a `layout`: {part modality: its tensors}."""
        ...
