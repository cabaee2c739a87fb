"""Image generation through discrete VQ tokens, on the VQ-VAE of Janus (transformers).

An image target is quantised by the frozen VQ encoder into an (h x w) grid of codebook indices; the
foundation reads them as input embeddings (codebook index -> `embed` -> `aligner` MLP, teacher
forcing) and predicts each next index from its hidden state through a separate `head` over the
codebook (Janus's generation head). At inference `lm_embed` feeds generated indices back and
`lm_generate` turns a full grid into pixels with the VQ decoder. The VQ-VAE never trains; `embed`,
`aligner` and `head` do unless the decoder is frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers.models.janus.configuration_janus import JanusVQVAEConfig
from transformers.models.janus.modeling_janus import JanusVQVAE, JanusVQVAEAlignerMLP, JanusVQVAEHead

from omni_dist.loss_head import head_cross_entropy
from omni_dist.media import MediaCount
from omni_dist.packed import MediaBatch
from omni_dist.plan import ParallelPlan
from omni_models.flops import transformer_flops
from omni_models.media import decode_image, image_size

# Checkpoint layouts: "native" (this module's own names, as `export_parts` writes them), "janus"
# (a JanusForConditionalGeneration checkpoint: point `path` at e.g. deepseek-ai/Janus-Pro-1B) and
# "vqvae" (a JanusVQVAE directory alone, e.g. a tokenizer trained on your images: it fills the VQ-VAE;
# embed, aligner and head are initialised).
JANUS_KEYS: dict[str, dict[str, str]] = {
    "native": {},
    "vqvae": {},  # `path` fills `tower` alone, under the VQ-VAE's own names
    "janus": {
        "tower.": "model.vqmodel.",
        "embed.": "model.generation_embeddings.",
        "aligner.": "model.generation_aligner.",
        "head.": "model.generation_head.",
    },
}


class VQImageProcessor:
    """Any image -> (1, 3, S, S) in [-1, 1]; always `tokens` codebook indices."""

    def __init__(self, size: int, tokens: int):
        self.size, self.tokens = size, tokens

    def count(self, item) -> MediaCount:
        image_size(item.data)  # bytes that do not parse are a decode error now, not at process time
        return MediaCount(self.tokens, self.tokens)

    def process(self, item) -> dict[str, torch.Tensor]:
        return {"pixel_values": (decode_image(item.data, (self.size, self.size)) * 2 - 1).unsqueeze(0)}


class JanusVQImageDecoder(nn.Module):
    def __init__(
        self,
        config: Mapping[str, Any],
        modalities: tuple[str, ...] = ("image",),
        hidden_size: int = 0,
        checkpoint_layout: str = "native",
    ):
        super().__init__()
        if len(modalities) != 1:
            raise ValueError(f"the VQ image decoder generates one image modality, got {modalities}")
        if hidden_size < 1:
            raise ValueError("the VQ image decoder needs the foundation's hidden_size")
        # Aligner output and head input are the foundation's width.
        cfg = JanusVQVAEConfig(
            **{**config, "projection_dim": hidden_size, "image_token_embed_dim": hidden_size}
        )
        self.modalities = tuple(modalities)
        self.tower = JanusVQVAE(cfg)  # the HF model of this part (named like the encoders' towers)
        self.tower.requires_grad_(False)
        self.embed = nn.Embedding(cfg.num_embeddings, cfg.embed_dim)
        self.aligner = JanusVQVAEAlignerMLP(cfg)
        self.head = JanusVQVAEHead(cfg)
        self.grid = cfg.num_patches
        self.tokens = cfg.num_patches**2
        self.image_size = cfg.num_patches * 2 ** (len(cfg.channel_multiplier) - 1)
        self.codebook_size = cfg.num_embeddings
        if checkpoint_layout not in JANUS_KEYS:
            raise ValueError(
                f"checkpoint_layout must be one of {sorted(JANUS_KEYS)}, got {checkpoint_layout!r}"
            )
        self._layout = JANUS_KEYS[checkpoint_layout]
        self._vqvae_only = checkpoint_layout == "vqvae"

    @property
    def checkpoint_module(self) -> nn.Module:
        """What `path` fills: the VQ-VAE alone (layout "vqvae"), or the whole decoder."""
        return self.tower if self._vqvae_only else self

    def checkpoint_keys(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Where `name` lives in a checkpoint of the configured layout (None: under its own name)."""
        for ours, theirs in self._layout.items():
            if name.startswith(ours):
                return {theirs + name[len(ours) :]: tensor}
        return None

    def processor(self, modality: str) -> VQImageProcessor:
        if modality not in self.modalities:
            raise KeyError(modality)
        return VQImageProcessor(self.image_size, self.tokens)

    @torch.no_grad()
    def codes(self, media: MediaBatch) -> torch.Tensor:
        """(images, tokens) codebook indices of the target images (the VQ-VAE is frozen)."""
        pixels = media.tensors["pixel_values"].to(next(self.tower.parameters()).dtype)
        return self.tower.encode(pixels).image_tokens.view(pixels.shape[0], -1)

    def lm_encode(self, media: Mapping[str, MediaBatch]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per modality: (input embeddings (n, hidden), their codebook indices (n,))."""
        (name,) = [m for m in self.modalities if m in media]
        codes = self.codes(media[name]).flatten()
        return {name: (self.lm_embed(codes), codes)}

    def lm_embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.aligner(self.embed(codes))

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Foundation hidden states -> logits over the codebook (the next image token)."""
        return self.head(hidden)

    def lm_loss(self, hidden: torch.Tensor, codes: torch.Tensor, chunk: int) -> torch.Tensor:
        return head_cross_entropy(self.head, hidden, codes, chunk)

    @torch.no_grad()
    def lm_generate(self, codes: torch.Tensor) -> torch.Tensor:
        """(images, tokens) indices -> (images, 3, S, S) pixels in [0, 1]."""
        pixels = self.tower.decode(codes.view(-1, self.tokens))
        return ((pixels.float() + 1) / 2).clamp(0, 1)

    def dummy_media(self) -> dict[str, MediaBatch]:
        item = {"pixel_values": torch.zeros(1, 3, self.image_size, self.image_size)}
        return {self.modalities[0]: MediaBatch.of([item], [self.tokens])}

    def plan(self) -> ParallelPlan:
        return ParallelPlan()  # small trainable parts; the decoder is one FSDP unit

    @cached_property
    def _token_params(self) -> int:  # counted once: flops() runs for every micro-batch
        return sum(p.numel() for p in [*self.aligner.parameters(), *self.head.parameters()])

    def flops(self, media: Mapping[str, MediaBatch]) -> float:
        # The aligner and head per token (the VQ encoder's convolutions run without gradients; left out).
        tokens = sum(int(m.llm_tokens.sum()) for m in media.values())
        return transformer_flops(self._token_params, [1] * tokens, 0, 0, causal=False)
