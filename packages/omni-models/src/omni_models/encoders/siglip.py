"""SigLIP's vision transformer as an image encoder: fixed-size square images, one token per patch.

A second image option beside Qwen2-VL's tower: every image is resized to image_size x image_size and
normalised to [-1, 1]; its (image_size / patch_size)^2 patch features become LLM tokens
(`vision_use_head` is turned off: the pooled head is for contrastive training, not for an LLM).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from omni_dist.media import MediaCount
from omni_dist.packed import MediaBatch
from omni_dist.plan import ParallelPlan
from omni_models.flops import transformer_flops
from omni_models.media import decode_image, image_size


class SiglipImageProcessor:
    def __init__(self, size: int, patch: int):
        self.size, self.tokens = size, (size // patch) ** 2

    def count(self, item) -> MediaCount:
        image_size(item.data)  # a header that does not parse is a decode error now, not at process time
        return MediaCount(self.tokens, self.tokens)

    def process(self, item) -> dict[str, torch.Tensor]:
        return {"pixel_values": (decode_image(item.data, (self.size, self.size)) * 2 - 1).unsqueeze(0)}


class SiglipImageEncoder(nn.Module):
    def __init__(
        self, config: Mapping[str, Any] | SiglipVisionConfig, modalities: tuple[str, ...] = ("image",)
    ):
        super().__init__()
        cfg = (
            config
            if isinstance(config, SiglipVisionConfig)
            else SiglipVisionConfig(**{"vision_use_head": False, **config})
        )
        if len(modalities) != 1:
            raise ValueError(f"the SigLIP encoder reads one image modality, got {modalities}")
        self.modalities = tuple(modalities)
        self.tower = SiglipVisionModel(cfg)
        self.output_size = cfg.hidden_size

    def processor(self, modality: str):
        if modality not in self.modalities:
            raise KeyError(modality)
        cfg = self.tower.config
        return SiglipImageProcessor(cfg.image_size, cfg.patch_size)

    def lm_encode(self, media: Mapping[str, MediaBatch]) -> dict[str, torch.Tensor]:
        (name,) = [m for m in self.modalities if m in media]
        pixels = media[name].tensors["pixel_values"]
        hidden = self.tower(pixels.to(next(self.tower.parameters()).dtype)).last_hidden_state
        return {name: hidden.flatten(0, 1).clone()}  # a copy: FSDP hooks lm_encode outputs for backward

    def dummy_media(self) -> dict[str, MediaBatch]:
        cfg = self.tower.config
        item = {"pixel_values": torch.zeros(1, cfg.num_channels, cfg.image_size, cfg.image_size)}
        return {self.modalities[0]: MediaBatch.of([item], [(cfg.image_size // cfg.patch_size) ** 2])}

    def plan(self) -> ParallelPlan:
        block = ("SiglipEncoderLayer",)
        return ParallelPlan(fsdp_units=block, recompute=block, compile=block)

    @cached_property
    def _block_params(self) -> int:  # counted once: flops() runs for every micro-batch
        layers = [m for m in self.tower.modules() if type(m).__name__ == "SiglipEncoderLayer"]
        return sum(p.numel() for m in layers for p in m.parameters())

    def flops(self, media: Mapping[str, MediaBatch]) -> float:
        cfg = self.tower.config
        images = sum(int(m.tensors["pixel_values"].shape[0]) for m in media.values())
        n = (cfg.image_size // cfg.patch_size) ** 2
        return transformer_flops(
            self._block_params, [n] * images, cfg.num_hidden_layers, cfg.hidden_size, causal=False
        )
