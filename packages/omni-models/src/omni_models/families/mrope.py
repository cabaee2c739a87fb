"""M-RoPE positions of one sample, computed by the family's own HF `get_rope_index`.

Calling HF's function (on a meta-device model: it reads only config fields) keeps the positions exact
for the installed transformers version, with nothing copied. Each sample's positions start at 0, so
packed samples restart as their own sequences would.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

# HF's mm_token_type_ids: text 0, image 1, video 2
TOKEN_TYPES = {"image": 1, "video": 2}


class MRopePositions:
    """fn(input_ids (L,), media) -> (3, L); media items have modality, start, llm_tokens, tensors."""

    def __init__(self, hf_config: Any, model_class: type, video_seconds: bool = False):
        self.config = copy.deepcopy(hf_config)
        self.model_class = model_class
        self.video_seconds = video_seconds  # pass each video's seconds per temporal patch (Qwen2.5-VL)
        self._model = None  # built on first use, per process (the processor travels to loader workers)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    def _index(self):
        if self._model is None:
            cfg = self.config
            cfg.text_config.num_hidden_layers = 1  # only config fields are read: keep the meta build small
            cfg.vision_config.depth = 1
            with torch.device("meta"):
                self._model = self.model_class(cfg)
        return self._model

    def __call__(self, input_ids: torch.Tensor, media: Sequence[Any]) -> torch.Tensor:
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        grids: dict[int, list[torch.Tensor]] = {1: [], 2: []}
        seconds = []
        for m in media:
            kind = TOKEN_TYPES.get(m.modality)
            if kind is None:
                raise ValueError(f"M-RoPE positions know images and videos, not {m.modality!r}")
            types[m.start : m.start + m.llm_tokens] = kind
            grids[kind].append(m.tensors["grid_thw"])
            if kind == 2 and self.video_seconds:
                seconds.append(m.tensors["second_per_grid_ts"])
        extra = {"second_per_grid_ts": torch.cat(seconds)} if seconds else {}
        positions, _ = self._index().get_rope_index(
            input_ids[None],
            mm_token_type_ids=types[None],
            image_grid_thw=torch.cat(grids[1]) if grids[1] else None,
            video_grid_thw=torch.cat(grids[2]) if grids[2] else None,
            **extra,
        )
        return positions[:, 0]
