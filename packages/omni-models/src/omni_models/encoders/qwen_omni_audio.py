"""Qwen2.5-Omni's audio tower as the audio encoder: Whisper log-mel frames of any length in, one LLM
token per 4 frames out (two stride-2 steps), its own projection to the LLM's width.

An item is its unpadded log-mel frames, frames first (L, mel), so a micro-batch concatenates items
along dim 0; `lm_encode` rebuilds HF's (mel, sum L) input with each item's length, as the thinker's
`get_audio_features` does after removing padding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

from omni_dist.media import MediaCount
from omni_dist.packed import MediaBatch
from omni_dist.plan import ParallelPlan
from omni_models.flops import transformer_flops
from omni_models.hf_processor import pretrained_part
from omni_models.media import audio_frames, decode_audio, resampled_length


def audio_tokens(frames: int) -> int:
    """LLM tokens of `frames` mel frames (the tower's conv stride 2, then its pooling by 2)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


class OmniAudioProcessor:
    """Waveform -> log-mel frames as Qwen2.5-Omni's processor makes them: its Whisper feature extractor on
    the waveform at its rate, zero-padded to the extractor's window (longer audio is cut there, as HF
    cuts it), kept up to the attention mask's length: {"input_features": (L, mel), "feature_lens": (1,)}."""

    def __init__(self, extractor: Any, kwargs: dict[str, Any] | None = None):
        self.fe = extractor
        self.kwargs = {k: v for k, v in (kwargs or {}).items() if k not in ("padding", "sampling_rate")}

    def tokens(self, frames: int) -> int:
        """LLM tokens of `frames` mel frames (the family's count)."""
        return audio_tokens(frames)

    def frames(self, samples: int) -> int:
        """Mel frames kept of `samples` samples at the extractor's rate."""
        frames = min(math.ceil(samples / self.fe.hop_length), self.fe.nb_max_frames)
        if self.tokens(frames) < 1:
            raise ValueError(f"audio of {frames} mel frames is too short for one token (needs 4 x 10 ms)")
        return frames

    def count(self, item) -> MediaCount:
        frames = self.frames(resampled_length(*audio_frames(item.data), self.fe.sampling_rate))
        return MediaCount(self.tokens(frames), frames)

    def process(self, item) -> dict[str, torch.Tensor]:
        return self.features(decode_audio(item.data, self.fe.sampling_rate))

    def features(self, wave: torch.Tensor) -> dict[str, torch.Tensor]:
        """A waveform at the extractor's rate -> its log-mel frames and their number."""
        frames = self.frames(wave.numel())
        out = self.fe(
            [wave.numpy()],
            **{**self.kwargs, "return_attention_mask": True},
            sampling_rate=self.fe.sampling_rate,
            padding="max_length",  # as Qwen2.5-Omni's processor forces it
            return_tensors="pt",
        )
        if int(out["attention_mask"].sum()) != frames:
            raise RuntimeError(
                f"the feature extractor kept {int(out['attention_mask'].sum())} frames, the count said {frames}"
            )
        return {
            "input_features": out["input_features"][0, :, :frames].T.contiguous(),
            "feature_lens": torch.tensor([frames]),
        }


class QwenOmniAudioEncoder(nn.Module):
    def __init__(
        self,
        config: Mapping[str, Any] | Qwen2_5OmniAudioEncoderConfig,
        modalities: tuple[str, ...] = ("audio",),
        checkpoint_prefix: str = "",
        processor_dir: str | None = None,
    ):
        super().__init__()
        cfg = (
            config
            if isinstance(config, Qwen2_5OmniAudioEncoderConfig)
            else Qwen2_5OmniAudioEncoderConfig(**config)
        )
        if len(modalities) != 1:
            raise ValueError(f"the Qwen2.5-Omni audio encoder reads one audio modality, got {modalities}")
        self.modalities = tuple(modalities)
        self.tower = Qwen2_5OmniAudioEncoder(cfg)
        self.output_size = cfg.output_dim
        self.checkpoint_prefix = checkpoint_prefix  # "" for a tower saved alone; "audio_tower." in a thinker
        self._processor_dir = processor_dir  # a pretrained model's directory: its own feature extractor

    def checkpoint_keys(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        return {self.checkpoint_prefix + name: tensor} if self.checkpoint_prefix else None

    def processor(self, modality: str):
        if modality not in self.modalities:
            raise KeyError(modality)
        from transformers import WhisperFeatureExtractor

        if self._processor_dir is not None:
            return OmniAudioProcessor(*pretrained_part(self._processor_dir, "audio"))
        return OmniAudioProcessor(WhisperFeatureExtractor(feature_size=self.tower.config.num_mel_bins))

    def lm_encode(self, media: Mapping[str, MediaBatch]) -> dict[str, torch.Tensor]:
        (name,) = [m for m in self.modalities if m in media]
        batch = media[name]
        feats = batch.tensors["input_features"].T.to(self.tower.conv1.weight.dtype)  # (mel, sum L)
        lens = batch.tensors["feature_lens"].to(feats.device, non_blocking=True)
        after_cnn, _ = self.tower._get_feat_extract_output_lengths(lens)
        return {name: self.tower(feats, feature_lens=lens, aftercnn_lens=after_cnn).last_hidden_state}

    def dummy_media(self) -> dict[str, MediaBatch]:
        item = {
            "input_features": torch.zeros(4, self.tower.config.num_mel_bins),
            "feature_lens": torch.tensor([4]),
        }
        return {self.modalities[0]: MediaBatch.of([item], [audio_tokens(4)])}

    def plan(self) -> ParallelPlan:
        block = ("Qwen2_5OmniAudioEncoderLayer",)
        return ParallelPlan(fsdp_units=block, recompute=block, compile=block)

    @cached_property
    def _block_params(self) -> int:  # counted once: flops() runs for every micro-batch
        return sum(p.numel() for p in self.tower.layers.parameters())

    def flops(self, media: Mapping[str, MediaBatch]) -> float:
        cfg = self.tower.config
        # Attention runs within windows of n_window * 2 frames, halved by the first conv.
        lengths = []
        for m in media.values():
            for frames in m.tensors["feature_lens"].tolist():
                full, rest = divmod(int(frames), 2 * cfg.n_window)
                lengths += [cfg.n_window] * full + ([(rest + 1) // 2] if rest else [])
        return transformer_flops(self._block_params, lengths, cfg.encoder_layers, cfg.d_model, causal=False)
