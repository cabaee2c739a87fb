"""Audio for the Whisper encoder: waveform at 16 kHz -> log-mel frames, cut into encoder windows.

Whisper's encoder reads fixed windows of 2 x max_source_positions mel frames (30 s for the real
model); an item of F frames takes ceil(F / window) windows (the last padded with the item's floor
value, as Whisper pads with silence), yields ceil(f / 2) valid frames per window of f real frames,
and those are average-pooled by `pool` into LLM tokens.
"""

from __future__ import annotations

import math

import torch

from omni_dist.media import MediaCount
from omni_models.media import audio_frames, decode_audio, resampled_length

SAMPLE_RATE = 16000
HOP = 160


def window_frames(frames: int, window: int) -> list[int]:
    return [min(window, frames - s) for s in range(0, frames, window)]


def mel_frames(data: bytes) -> int:
    """10 ms log-mel frames of an audio file at 16 kHz, from its header."""
    return resampled_length(*audio_frames(data), SAMPLE_RATE) // HOP


class LogMel:
    """Whisper log-mel features of a whole item (transformers' WhisperFeatureExtractor), unpadded: (mel, frames)."""

    def __init__(self, num_mel_bins: int):
        from transformers import WhisperFeatureExtractor

        self.extractor = WhisperFeatureExtractor(
            feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE, hop_length=HOP, n_fft=400
        )

    def __call__(self, data: bytes, frames: int) -> torch.Tensor:
        wave = decode_audio(data, SAMPLE_RATE)
        mel = self.extractor(
            wave.numpy(), sampling_rate=SAMPLE_RATE, padding="longest", truncation=False, return_tensors="pt"
        )["input_features"][0]
        if mel.shape[-1] != frames:
            raise RuntimeError(f"feature extractor gave {mel.shape[-1]} frames, the count said {frames}")
        return mel


class WhisperAudioProcessor:
    def __init__(self, num_mel_bins: int, max_source_positions: int, pool: int):
        self.window = 2 * max_source_positions
        self.pool = pool
        self.mel = LogMel(num_mel_bins)

    def _frames(self, data: bytes) -> int:
        frames = mel_frames(data)
        if frames < 1:
            raise ValueError("audio shorter than one mel frame (10 ms)")
        return frames

    def count(self, item) -> MediaCount:
        frames = self._frames(item.data)
        windows = window_frames(frames, self.window)
        valid = sum(math.ceil(f / 2) for f in windows)
        return MediaCount(math.ceil(valid / self.pool), len(windows) * self.window // 2)

    def process(self, item) -> dict[str, torch.Tensor]:
        frames = self._frames(item.data)
        mel = self.mel(item.data, frames)
        n = len(window_frames(frames, self.window))
        padded = mel.new_full((mel.shape[0], n * self.window), float(mel.min()))
        padded[:, :frames] = mel
        windows = padded.view(mel.shape[0], n, self.window).transpose(0, 1).contiguous()
        return {"input_features": windows, "num_frames": torch.tensor([[frames]])}
