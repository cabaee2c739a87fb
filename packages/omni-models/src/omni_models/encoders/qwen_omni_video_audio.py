"""Qwen2.5-Omni's (and Qwen3-Omni's) video with its audio track (`use_audio_in_video`): one item, two
encoders' inputs.

Between the video's markers the frames' tokens and the audio's tokens alternate in chunks of
`seconds_per_chunk`, as the family's processor lays them out (its own `replace_video_with_audio_token`
is called, so the layout is transformers'). The frames go to the vision tower, the audio track (decoded
from the container by PyAV, at the feature extractor's rate) to the audio tower; the data side places
each part's features at its own placeholders (MediaCount.layout).
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import torch

from omni_dist.media import MediaCount
from omni_models.encoders.qwen2_vl_processing import Qwen2VLVideoProcessor
from omni_models.encoders.qwen_omni_audio import OmniAudioProcessor
from omni_models.media import video_audio

_TOKEN = re.compile(r"<\|[^|]+\|>")


class OmniVideoAudioProcessor:
    """A video and its audio track: {"video": video tensors, "audio": log-mel frames} (modality names
    as the model's encoders read them)."""

    def __init__(
        self,
        video: Qwen2VLVideoProcessor,
        audio: OmniAudioProcessor,
        hf: Any,
        settings: dict[str, Any],
        modalities: tuple[str, str] = ("video", "audio"),
    ):
        if not video.requested_rate:  # the layout's seconds per temporal patch are the asked rate's
            raise ValueError("a video with its audio track is laid out at the requested frame rate")
        self.video, self.audio, self.hf, self.modalities = video, audio, hf, modalities
        # what the family's processor passes its layout (position_id_per_seconds, seconds_per_chunk)
        self.settings = {k: settings[k] for k in ("position_id_per_seconds", "seconds_per_chunk")}

    def _wave(self, data: bytes) -> torch.Tensor:
        wave = video_audio(data, self.audio.fe.sampling_rate)
        if wave is None:  # HF's positions cannot place a silent video beside videos with audio
            raise ValueError("the video has no audio track, and the model reads videos with their audio")
        return wave

    def count(self, item) -> MediaCount:
        video = self.video.count(item)
        t = self.video.temporal_patches(item)
        # Decoding the audio track (cheap beside the frames) gives its exact length: a header's
        # duration misses codec priming and padding.
        frames = self.audio.frames(self._wave(item.data).numel())
        layout = self._layout(t, video.llm_tokens // t, self.audio.tokens(frames))
        units = tuple(zip(self.modalities, (video.encoder_units, frames), strict=True))
        return MediaCount(sum(n for _, n in layout), video.encoder_units + frames, layout, units)

    def process(self, item) -> dict[str, dict[str, torch.Tensor]]:
        video, audio = self.modalities
        return {video: self.video.process(item), audio: self.audio.features(self._wave(item.data))}

    def _layout(self, t: int, per_t: int, audio: int) -> tuple[tuple[str, int], ...]:
        """(token, repeat) runs of the family processor's text for this video and audio. Its layout reads
        the grid only as t slices of (h / merge) x (w / merge) tokens, so a grid of t x 1 x per_t is given."""
        merge = self.video.hf.merge_size
        seconds = self.video.hf.temporal_patch_size / self.video.fps
        text = self.hf.replace_video_with_audio_token(
            {"video_grid_thw": [[t, merge, merge * per_t]], "video_second_per_grid": [seconds]},
            0,
            {"num_audio_tokens": [audio]},
            0,
            **self.settings,
        )
        tokens = _TOKEN.findall(text)
        if "".join(tokens) != text:
            raise RuntimeError(
                f"the processor's video layout is not made of special tokens only: {text[:200]!r}"
            )
        return tuple((tok, len(list(run))) for tok, run in itertools.groupby(tokens))
