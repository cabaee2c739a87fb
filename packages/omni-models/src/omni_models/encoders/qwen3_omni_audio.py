"""Qwen3-Omni's audio tower as the audio encoder: Whisper log-mel frames of any length in chunks of
2 * n_window frames, three stride-2 convolutions per chunk, attention within windows of n_window_infer
frames' tokens, its own projection to the LLM's width.

An item is its unpadded log-mel frames, frames first (L, mel), as Qwen2.5-Omni's (qwen_omni_audio.py);
`lm_encode` cuts each item into chunks and pads every chunk to a whole one, builds the tower's index
tensors on the host and hands them to HF's tower as its precomputed inputs. HF pads the chunks of a
batch to its longest chunk instead, which is a whole one as soon as one item is (>= 2 * n_window frames,
1 s): there the two agree; padding to a whole chunk always makes an item's features independent of the
items packed beside it (the convolutions see the padding at a chunk's end).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoder,
    _get_feat_extract_output_lengths,
)
from transformers.utils.generic import is_flash_attention_requested

from omni_dist.packed import MediaBatch
from omni_dist.plan import ParallelPlan
from omni_models.encoders.qwen_omni_audio import OmniAudioProcessor
from omni_models.flops import transformer_flops
from omni_models.hf_processor import pretrained_part


class Qwen3OmniAudioProcessor(OmniAudioProcessor):
    """Waveform -> log-mel frames as Qwen3OmniMoeProcessor makes them for one item: its Whisper feature
    extractor on the waveform alone (the processor pads a batch to its longest item, so one item is not
    padded; nothing is cut), L = samples // hop frames: {"input_features": (L, mel), "feature_lens": (1,)}.
    Tokens are the family's count for `n_window` (13 per whole chunk of 100 frames)."""

    def __init__(self, extractor: Any, kwargs: dict[str, Any] | None = None, n_window: int = 50):
        super().__init__(extractor, kwargs)
        self.n_window = n_window

    def tokens(self, frames: int) -> int:
        return int(_get_feat_extract_output_lengths(frames, self.n_window))

    def frames(self, samples: int) -> int:
        frames = samples // self.fe.hop_length
        if frames < 1:
            raise ValueError(f"audio of {samples} samples is shorter than one mel frame")
        return frames

    def features(self, wave: torch.Tensor) -> dict[str, torch.Tensor]:
        frames = self.frames(wave.numel())
        out = self.fe(
            [wave.numpy()],
            **{**self.kwargs, "return_attention_mask": True, "truncation": False},
            sampling_rate=self.fe.sampling_rate,
            padding="longest",
            return_tensors="pt",
        )
        if out["input_features"].shape[-1] != frames or int(out["attention_mask"].sum()) != frames:
            raise RuntimeError(
                f"the feature extractor made {out['input_features'].shape[-1]} frames, the count said {frames}"
            )
        return {
            "input_features": out["input_features"][0].T.contiguous(),
            "feature_lens": torch.tensor([frames]),
        }


class Qwen3OmniAudioEncoder(nn.Module):
    def __init__(
        self,
        config: Mapping[str, Any] | Qwen3OmniMoeAudioEncoderConfig,
        modalities: tuple[str, ...] = ("audio",),
        checkpoint_prefix: str = "",
        processor_dir: str | None = None,
    ):
        super().__init__()
        cfg = (
            config
            if isinstance(config, Qwen3OmniMoeAudioEncoderConfig)
            else Qwen3OmniMoeAudioEncoderConfig(**config)
        )
        if len(modalities) != 1:
            raise ValueError(f"the Qwen3-Omni audio encoder reads one audio modality, got {modalities}")
        chunk = 2 * cfg.n_window
        if _cnn_tokens(chunk) != _get_feat_extract_output_lengths(chunk, cfg.n_window):
            raise ValueError(
                f"audio n_window={cfg.n_window}: the family counts 13 tokens per chunk of 2 * n_window frames, "
                f"which holds for n_window=50 only (its convolutions make {_cnn_tokens(chunk)})"
            )
        if cfg.n_window_infer < chunk:
            raise ValueError(
                f"audio n_window_infer={cfg.n_window_infer} must be at least 2 * n_window={chunk}"
            )
        self.modalities = tuple(modalities)
        self.tower = Qwen3OmniMoeAudioEncoder(cfg)
        self.output_size = cfg.output_dim
        self.checkpoint_prefix = checkpoint_prefix  # "" for a tower saved alone; "audio_tower." in a thinker
        self._processor_dir = processor_dir  # a pretrained model's directory: its own feature extractor

    def checkpoint_keys(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        return {self.checkpoint_prefix + name: tensor} if self.checkpoint_prefix else None

    def processor(self, modality: str) -> Qwen3OmniAudioProcessor:
        if modality not in self.modalities:
            raise KeyError(modality)
        from transformers import WhisperFeatureExtractor

        n_window = self.tower.config.n_window
        if self._processor_dir is not None:
            return Qwen3OmniAudioProcessor(*pretrained_part(self._processor_dir, "audio"), n_window=n_window)
        extractor = WhisperFeatureExtractor(feature_size=self.tower.config.num_mel_bins)
        return Qwen3OmniAudioProcessor(extractor, n_window=n_window)

    def lm_encode(self, media: Mapping[str, MediaBatch]) -> dict[str, torch.Tensor]:
        (name,) = [m for m in self.modalities if m in media]
        batch = media[name]
        feats = batch.tensors["input_features"]  # (sum L, mel)
        index = self._index_inputs(batch.tensors["feature_lens"], feats.device)
        chunk = 2 * self.tower.config.n_window
        # Each chunk's frames, then zero rows up to a whole chunk: (chunks, mel, chunk) as HF pads them
        rows = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])[index.pop("frames")]
        padded = rows.view(-1, chunk, feats.shape[1]).transpose(1, 2).to(self.tower.conv2d1.weight.dtype)
        out = self.tower(padded_feature=padded, **index)
        return {name: out.last_hidden_state}

    def _index_inputs(self, lens: torch.Tensor, device: torch.device) -> dict[str, Any]:
        """The tower's inputs besides the features, from the items' frame counts on the host: each chunk's
        frame rows (the zero row past the last frame pads), chunk lengths, the valid tokens after the
        convolutions and the attention windows' boundaries (on the host unless flash attention runs, as
        HF's non-flash audio attention splits by them there)."""
        cfg = self.tower.config
        chunk = 2 * cfg.n_window
        lens = lens.cpu().long()
        starts = torch.cat([lens.new_zeros(1), lens.cumsum(0)[:-1]])
        chunk_lengths, frames = [], []
        for start, n in zip(starts.tolist(), lens.tolist(), strict=True):
            for at in range(0, n, chunk):
                size = min(chunk, n - at)
                chunk_lengths.append(size)
                rows = torch.arange(start + at, start + at + chunk)
                frames.append(torch.where(torch.arange(chunk) < size, rows, int(lens.sum())))
        chunk_lengths = torch.tensor(chunk_lengths)
        width = _cnn_tokens(chunk)
        valid = torch.arange(width) < _get_feat_extract_output_lengths(chunk_lengths, cfg.n_window)[:, None]
        cu = torch.tensor([0, *self._windows(lens)]).cumsum(0, dtype=torch.int32)
        flash = is_flash_attention_requested(cfg)
        return {
            "frames": torch.cat(frames).to(device, non_blocking=True),
            "chunk_lengths": chunk_lengths.to(device, non_blocking=True),
            "valid_indices": valid.flatten().nonzero().squeeze(-1).to(device, non_blocking=True),
            "cu_seqlens": cu.to(device, non_blocking=True) if flash else cu,
            "max_seqlen": int((cu[1:] - cu[:-1]).max()),
        }

    def _windows(self, lens: torch.Tensor) -> list[int]:
        """Tokens per attention window, items in order (HF's get_audio_cu_seqlens with whole chunks)."""
        cfg = self.tower.config
        window = _cnn_tokens(2 * cfg.n_window) * (cfg.n_window_infer // (2 * cfg.n_window))
        out = []
        for tokens in _get_feat_extract_output_lengths(lens, cfg.n_window).tolist():
            out += [window] * (tokens // window) + ([tokens % window] if tokens % window else [])
        return out

    def dummy_media(self) -> dict[str, MediaBatch]:
        item = {
            "input_features": torch.zeros(4, self.tower.config.num_mel_bins),
            "feature_lens": torch.tensor([4]),
        }
        tokens = _get_feat_extract_output_lengths(4, self.tower.config.n_window)
        return {self.modalities[0]: MediaBatch.of([item], [tokens])}

    def plan(self) -> ParallelPlan:
        block = ("Qwen3OmniMoeAudioEncoderLayer",)
        return ParallelPlan(fsdp_units=block, recompute=block, compile=block)

    @cached_property
    def _block_params(self) -> int:  # counted once: flops() runs for every micro-batch
        return sum(p.numel() for p in self.tower.layers.parameters())

    def flops(self, media: Mapping[str, MediaBatch]) -> float:
        cfg = self.tower.config
        lengths = [w for m in media.values() for w in self._windows(m.tensors["feature_lens"])]
        return transformer_flops(self._block_params, lengths, cfg.encoder_layers, cfg.d_model, causal=False)


def _cnn_tokens(frames: int) -> int:
    """Tokens the tower's three stride-2 convolutions (kernel 3, padding 1) make of `frames` frames."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames
