"""M-RoPE positions of one sample, computed by the family's own HF `get_rope_index`.

Calling HF's function (on a meta-device model: it reads only config fields) keeps the positions exact
for the installed transformers version, with nothing copied. Each sample's positions start at 0, so
packed samples restart as their own sequences would.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# HF's mm_token_type_ids: text 0, image 1, video 2
TOKEN_TYPES = {"image": 1, "video": 2}


@dataclass
class _Media:
    """One sample's media, by what get_rope_index reads."""

    types: torch.Tensor  # (L,) mm_token_type_ids
    images: list[torch.Tensor] = field(default_factory=list)  # grid_thw (1, 3) each
    videos: list[torch.Tensor] = field(default_factory=list)
    seconds: list[torch.Tensor] = field(default_factory=list)  # per video: seconds per temporal patch
    audio_frames: list[torch.Tensor] = field(default_factory=list)  # per audio: mel frames (1,)
    audio_in_video: bool = False  # the videos' audio tracks are interleaved with their frames


class MRopePositions:
    """fn(input_ids (L,), media) -> (3, L); media items have modality, generate, positions, offsets, tensors.

    `model_class(hf_config)` is built on the meta device with one layer per tower; `_rope` calls its
    `get_rope_index` with the arguments this family's version takes."""

    audio = False  # the family's own audio (its tower's mel frames) is placed by get_rope_index

    def __init__(self, hf_config: Any, model_class: type, video_seconds: bool = False):
        self.config = copy.deepcopy(hf_config)
        self.model_class = model_class
        self.video_seconds = video_seconds  # pass each video's seconds per temporal patch (Qwen2.5-VL)
        self._model = None  # built on first use, per process (the processor travels to loader workers)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    def _index(self):
        if self._model is None:
            cfg = self.config  # only config fields are read: keep the meta build small
            cfg.text_config.num_hidden_layers = 1
            cfg.vision_config.depth = 1
            if hasattr(cfg, "audio_config"):
                cfg.audio_config.encoder_layers = 1
            with torch.device("meta"):
                self._model = self.model_class(cfg)
        return self._model

    def __call__(self, input_ids: torch.Tensor, media: Sequence[Any]) -> torch.Tensor:
        found = _Media(torch.zeros_like(input_ids, dtype=torch.int32))
        for m in media:
            kind = None if m.generate else TOKEN_TYPES.get(m.modality)
            if kind is None:
                if m.modality == "audio" and self.audio:
                    found.audio_frames.append(m.tensors["feature_lens"])
                    # a video's audio track sits at its own placeholders inside the video's span
                    found.audio_in_video |= m.offsets is not None
                # A modality the family does not read (a part added by config, e.g. generated images):
                # its tokens get text positions, as HF's get_rope_index gives any token not its media.
                continue
            found.types[m.positions] = kind
            (found.images if kind == 1 else found.videos).append(m.tensors["grid_thw"])
            if kind == 2 and self.video_seconds:
                found.seconds.append(m.tensors["second_per_grid_ts"])
        return self._rope(self._index(), input_ids[None], found)[:, 0]

    def _rope(self, model, ids: torch.Tensor, media: _Media) -> torch.Tensor:
        extra = {"second_per_grid_ts": torch.cat(media.seconds)} if media.seconds else {}
        positions, _ = model.get_rope_index(
            ids,
            mm_token_type_ids=media.types[None],
            image_grid_thw=_cat(media.images),
            video_grid_thw=_cat(media.videos),
            **extra,
        )
        return positions


class OmniThinkerPositions(MRopePositions):
    """Qwen2.5-Omni's thinker: positions found from the marker token ids, audio by its mel frames in
    sequence order; `use_audio_in_video` when the sample's videos carry their audio tracks (the
    processor gives every video its track or fails the item, so a sample's videos are all alike)."""

    audio = True

    def _rope(self, model, ids: torch.Tensor, media: _Media) -> torch.Tensor:
        positions, _ = model.get_rope_index(
            ids,
            image_grid_thw=_cat(media.images),
            video_grid_thw=_cat(media.videos),
            attention_mask=torch.ones_like(ids),
            use_audio_in_video=media.audio_in_video,
            audio_seqlens=_cat(media.audio_frames),
            second_per_grids=_cat(media.seconds),
        )
        return positions


def _cat(items: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.cat(items) if items else None
