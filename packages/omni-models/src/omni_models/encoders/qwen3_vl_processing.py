"""Qwen3-VL videos: Qwen2-VL-style frames and tensors, laid out with their frame timestamps.

The family's processor writes each temporal patch of a video as its timestamp in text, then the patch's
placeholders between vision markers: `<0.2 seconds><|vision_start|><|video_pad|>...<|vision_end|><1.5
seconds>...` (inside the item's own start and end markers, as the chat template puts them). That text
is the family processor's own `replace_video_token`, its timestamp text split into tokens by its
tokenizer (special tokens split the text, so a timestamp tokenizes alone as it does in the whole
prompt), so the layout is transformers'. The data side fills the placeholders (MediaCount.layout); the
timestamps and inner markers are text tokens.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import torch

from omni_dist.media import MediaCount
from omni_models.encoders.qwen2_vl_processing import Qwen2VLVideoProcessor, _header


class Qwen3VLVideoProcessor(Qwen2VLVideoProcessor):
    """`family`: the directory's Qwen3VLProcessor (its tokenizer and layout); without it (a composite built
    by hand, whose tokenizer is another model's) a video is one run of placeholders, without timestamps."""

    def __init__(
        self,
        hf: Any,
        fps: float,
        max_frames: int,
        kwargs: dict[str, Any] | None = None,
        family: Any = None,
    ):
        super().__init__(hf, fps, max_frames, kwargs=kwargs)
        if family is not None and not hasattr(family, "replace_video_token"):
            raise ValueError(
                f"{type(family).__name__} does not lay out Qwen3-VL videos (no replace_video_token)"
            )
        self.family = family
        self._text_tokens: dict[str, list[str]] = {}  # timestamp text -> its tokens, as first met
        if family is not None:
            names = (family.vision_start_token, family.video_token, family.vision_end_token)
            self._special = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    def count(self, item) -> MediaCount:
        plain = super().count(item)
        if self.family is None:
            return plain
        metadata = _header(item.data)
        metadata.frames_indices = self._indices(metadata)
        t = -(-len(metadata.frames_indices) // self.hf.temporal_patch_size)
        layout = self._layout(t, plain.llm_tokens // t, metadata)
        units = (("video", plain.encoder_units),)
        return MediaCount(sum(n for _, n in layout), plain.encoder_units, layout, units)

    def process(self, item) -> dict[str, Any]:
        out = super().process(item)
        out.pop("second_per_grid_ts")  # Qwen3-VL's positions place frames by their timestamps' text
        return out if self.family is None else {"video": out}

    def _layout(self, t: int, per_t: int, metadata) -> tuple[tuple[str, int], ...]:
        """(token, repeat) runs of the family processor's text for a video of `t` temporal patches of
        `per_t` tokens each. Its layout reads the grid only as t slices of (h / merge) x (w / merge)
        tokens, so a grid of t x merge x (merge * per_t) is given."""
        merge = self.hf.merge_size
        grid = torch.tensor([[t, merge, merge * per_t]])
        text = self.family.replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
        tokens: list[str] = []
        for piece in self._special.split(text):
            if self._special.fullmatch(piece):
                tokens.append(piece)
            elif piece:
                if piece not in self._text_tokens:
                    self._text_tokens[piece] = self.family.tokenizer.tokenize(piece)
                tokens += self._text_tokens[piece]
        return tuple((tok, len(list(run))) for tok, run in itertools.groupby(tokens))
