"""Janus's understanding path as an image encoder: its SigLIP-style vision model and its aligner MLP
(so the projector is the identity). Every image becomes the fixed (image_size / patch_size)^2 tokens
of `last_hidden_state` through the aligner, as HF's `JanusModel.get_image_features` computes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers.models.janus.configuration_janus import JanusVisionConfig
from transformers.models.janus.modeling_janus import JanusVisionAlignerMLP, JanusVisionModel

from omni_dist.media import MediaCount
from omni_dist.packed import MediaBatch
from omni_dist.plan import ParallelPlan
from omni_models.flops import transformer_flops
from omni_models.hf_processor import pretrained_part
from omni_models.media import image_size, open_image


class JanusImageProcessor:
    """An image -> HF's Janus image processor output (resized, padded to a square, normalised):
    {"pixel_values": (1, 3, S, S)}; always `tokens` LLM tokens."""

    def __init__(self, hf_processor: Any, tokens: int, kwargs: dict[str, Any] | None = None):
        self.hf, self.tokens, self.kwargs = hf_processor, tokens, dict(kwargs or {})

    def count(self, item) -> MediaCount:
        image_size(item.data)  # bytes that do not parse are a decode error now, not at process time
        return MediaCount(self.tokens, self.tokens)

    def process(self, item) -> dict[str, torch.Tensor]:
        image = open_image(item.data)
        return {"pixel_values": self.hf(images=[image], **self.kwargs, return_tensors="pt")["pixel_values"]}


class JanusVisionEncoder(nn.Module):
    def __init__(
        self,
        config: Mapping[str, Any] | JanusVisionConfig,
        modalities: tuple[str, ...] = ("image",),
        processor_dir: str | None = None,
    ):
        super().__init__()
        cfg = config if isinstance(config, JanusVisionConfig) else JanusVisionConfig(**config)
        if tuple(modalities) != ("image",):
            raise ValueError(f"the Janus vision encoder reads images, got {modalities}")
        self.modalities = ("image",)
        self.vision_model = JanusVisionModel(cfg)
        self.aligner = JanusVisionAlignerMLP(cfg)
        self.output_size = cfg.projection_dim
        self.tokens = (cfg.image_size // cfg.patch_size) ** 2
        self._processor_dir = processor_dir  # a pretrained directory: its own processor

    def processor(self, modality: str) -> JanusImageProcessor:
        if modality != "image":
            raise KeyError(modality)
        from transformers import JanusImageProcessor as HFJanusImageProcessor

        if self._processor_dir is not None:
            hf, kwargs = pretrained_part(self._processor_dir, "image")
        else:
            size = self.vision_model.config.image_size
            hf, kwargs = HFJanusImageProcessor(size={"height": size, "width": size}), {}
        return JanusImageProcessor(hf, self.tokens, kwargs)

    def lm_encode(self, media: Mapping[str, MediaBatch]) -> dict[str, torch.Tensor]:
        pixels = media["image"].tensors["pixel_values"].to(self.aligner.fc1.weight.dtype)
        hidden = self.vision_model(pixels).last_hidden_state  # (images, tokens, width)
        return {"image": self.aligner(hidden).flatten(0, 1)}

    def dummy_media(self) -> dict[str, MediaBatch]:
        size = self.vision_model.config.image_size
        return {"image": MediaBatch.of([{"pixel_values": torch.zeros(1, 3, size, size)}], [self.tokens])}

    def plan(self) -> ParallelPlan:
        block = ("JanusVisionEncoderLayer",)
        return ParallelPlan(fsdp_units=block, recompute=block, compile=block)

    @cached_property
    def _block_params(self) -> int:  # counted once: flops() runs for every micro-batch
        return sum(p.numel() for p in self.vision_model.encoder.layers.parameters())

    def flops(self, media: Mapping[str, MediaBatch]) -> float:
        cfg = self.vision_model.config
        images = sum(m.num_items for m in media.values())
        return transformer_flops(
            self._block_params, [self.tokens] * images, cfg.num_hidden_layers, cfg.hidden_size, causal=False
        )
