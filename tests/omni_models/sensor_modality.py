"""A toy "sensor" modality: a float32 time series stored inline (`.f32` bytes), cut into windows of 8
readings, each window one LLM token through a small MLP.

Self-contained (it imports only the installed packages): test_new_modality registers it in-process, and
tests/omni_train/test_plugins.py copies this file into a separate package that registers it as a plugin.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from omni_dist.media import MediaCount
from omni_dist.packed import MediaBatch
from omni_dist.plan import ParallelPlan
from omni_models.flops import transformer_flops

WINDOW = 8


class SensorProcessor:
    def count(self, item) -> MediaCount:
        if len(item.data) % 4:
            raise ValueError("sensor bytes are not float32")
        n = len(item.data) // 4 // WINDOW
        if n == 0:
            raise ValueError("fewer readings than one window")
        return MediaCount(n, n)

    def process(self, item) -> dict[str, torch.Tensor]:
        n = self.count(item).llm_tokens
        x = torch.from_numpy(np.frombuffer(item.data, dtype=np.float32)[: n * WINDOW].copy())
        return {"windows": x.view(n, WINDOW)}


class SensorEncoder(nn.Module):
    def __init__(self, config: Mapping, modalities: tuple[str, ...] = ("sensor",)):
        super().__init__()
        self.modalities = tuple(modalities)
        self.output_size = config.get("width", 16)
        self.net = nn.Sequential(
            nn.Linear(WINDOW, self.output_size), nn.Tanh(), nn.Linear(self.output_size, self.output_size)
        )

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.net(windows)

    def lm_encode(self, media):
        (m,) = [k for k in self.modalities if k in media]
        return {m: self(media[m].tensors["windows"].to(self.net[0].weight.dtype))}

    def dummy_media(self):
        return {self.modalities[0]: MediaBatch.of([{"windows": torch.zeros(1, WINDOW)}], [1])}

    def processor(self, modality: str):
        return SensorProcessor()

    def plan(self) -> ParallelPlan:
        return ParallelPlan()

    def flops(self, media) -> float:
        n = sum(int(m.tensors["windows"].shape[0]) for m in media.values())
        return transformer_flops(sum(p.numel() for p in self.parameters()), [1] * n, 0, 0, causal=False)
