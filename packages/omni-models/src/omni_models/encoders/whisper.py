"""Whisper's encoder over log-mel windows, pooled into LLM tokens."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from omni_dist.packed import MediaBatch
from omni_dist.plan import ParallelPlan
from omni_models.encoders.whisper_processing import WhisperAudioProcessor, window_frames
from omni_models.flops import transformer_flops


class WhisperAudioEncoder(nn.Module):
    def __init__(
        self,
        config: Mapping[str, Any] | WhisperConfig,
        modalities: tuple[str, ...] = ("audio",),
        pool: int = 2,
    ):
        super().__init__()
        cfg = config if isinstance(config, WhisperConfig) else WhisperConfig(**config)
        if len(modalities) != 1:
            raise ValueError(f"the Whisper encoder reads one audio modality, got {modalities}")
        self.modalities = tuple(modalities)
        self.tower = WhisperEncoder(cfg)
        self.output_size = cfg.d_model
        self.pool = pool
        self.window = 2 * cfg.max_source_positions

    def processor(self, modality: str):
        if modality not in self.modalities:
            raise KeyError(modality)
        cfg = self.tower.config
        return WhisperAudioProcessor(cfg.num_mel_bins, cfg.max_source_positions, self.pool)

    def lm_encode(self, media: Mapping[str, MediaBatch]) -> dict[str, torch.Tensor]:
        (name,) = [m for m in self.modalities if m in media]
        batch = media[name]
        feats = batch.tensors["input_features"].to(self.tower.conv1.weight.dtype)
        hidden = self.tower(feats).last_hidden_state  # (windows, window / 2, d)
        out, w = [], 0
        for frames in batch.tensors["num_frames"][:, 0].tolist():
            valid = [
                hidden[w + j, : math.ceil(f / 2)] for j, f in enumerate(window_frames(frames, self.window))
            ]
            w += len(valid)
            seq = torch.cat(valid).T.unsqueeze(0)  # (1, d, valid frames)
            out.append(F.avg_pool1d(seq, self.pool, self.pool, ceil_mode=True)[0].T)
        return {name: torch.cat(out)}

    def dummy_media(self) -> dict[str, MediaBatch]:
        cfg = self.tower.config
        item = {
            "input_features": torch.zeros(1, cfg.num_mel_bins, self.window),
            "num_frames": torch.tensor([[2]]),
        }
        return {self.modalities[0]: MediaBatch.of([item], [1])}

    def plan(self) -> ParallelPlan:
        block = ("WhisperEncoderLayer",)
        return ParallelPlan(fsdp_units=block, recompute=block, compile=block)

    @cached_property
    def _block_params(self) -> int:  # counted once: flops() runs for every micro-batch
        return sum(p.numel() for p in self.tower.layers.parameters())

    def flops(self, media: Mapping[str, MediaBatch]) -> float:
        cfg = self.tower.config
        windows = sum(int(m.tensors["input_features"].shape[0]) for m in media.values())
        return transformer_flops(
            self._block_params, [self.window // 2] * windows, cfg.encoder_layers, cfg.d_model, causal=False
        )
