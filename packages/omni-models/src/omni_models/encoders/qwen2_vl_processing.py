"""Qwen2-VL style media through transformers' own image and video processors (the media-count protocol
around them).

Images: the image processor (torchvision backend when installed, as `AutoProcessor` picks it); the
packer's count is its `get_number_of_image_patches` on the size in the image header. Videos: frames are
chosen by the video processor's own `sample_frames` (at `fps`, at most `max_frames`) from the container
header's frame count and rate, decoded by transformers' PyAV reader, then processed by the video
processor; the count is its `get_num_of_video_patches` for those frames. Each item becomes
t*h*w / merge^2 LLM tokens.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from omni_dist.media import MediaCount
from omni_models.media import image_size, open_image


def _merged(patches: int, merge: int) -> MediaCount:
    return MediaCount(patches // merge**2, patches)


class Qwen2VLImageProcessor:
    """{"pixel_values": (t*h*w patches, C * tp * p * p), "grid_thw": (1, 3)} for one image."""

    def __init__(self, hf: Any, kwargs: dict[str, Any] | None = None):
        self.hf, self.kwargs = hf, dict(kwargs or {})  # kwargs: what the model's processor call passes

    def count(self, item) -> MediaCount:
        w, h = image_size(item.data)
        return _merged(self.hf.get_number_of_image_patches(h, w, self.kwargs), self.hf.merge_size)

    def process(self, item) -> dict[str, torch.Tensor]:
        out = self.hf(images=[open_image(item.data)], **self.kwargs, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "grid_thw": out["image_grid_thw"]}


class Qwen2VLVideoProcessor:
    """Like the image processor, plus `second_per_grid_ts`: seconds per temporal patch, for M-RoPE. Qwen2.5-VL's
    processor takes the sampled frames' rate; Qwen2.5-Omni's the rate asked for (`requested_rate`)."""

    def __init__(
        self,
        hf: Any,
        fps: float,
        max_frames: int,
        requested_rate: bool = False,
        kwargs: dict[str, Any] | None = None,
    ):
        self.hf, self.fps, self.max_frames, self.requested_rate = hf, fps, max_frames, requested_rate
        self.kwargs = {k: v for k, v in (kwargs or {}).items() if k not in ("fps", "do_sample_frames")}

    def _indices(self, metadata, **_: Any) -> torch.Tensor:
        if metadata.total_num_frames < self.hf.temporal_patch_size:  # too short to sample: every frame
            return torch.arange(metadata.total_num_frames)
        return self.hf.sample_frames(metadata, fps=self.fps, max_frames=self.max_frames)

    def temporal_patches(self, item) -> int:
        """The video's temporal patches (grid t), from its header: frames are padded to a whole patch."""
        return -(-len(self._indices(_header(item.data))) // self.hf.temporal_patch_size)

    def count(self, item) -> MediaCount:
        metadata = _header(item.data)
        frames = len(self._indices(metadata))
        patches = self.hf.get_num_of_video_patches(frames, metadata.height, metadata.width, self.kwargs)
        return _merged(patches, self.hf.merge_size)

    def process(self, item) -> dict[str, torch.Tensor]:
        from transformers.video_utils import read_video_pyav

        try:
            frames, metadata = read_video_pyav(io.BytesIO(item.data), sample_indices_fn=self._indices)
        except Exception as e:  # PyAV's errors, or no frame at the sampled indices
            raise ValueError(f"not a decodable video: {e}") from None
        out = self.hf(videos=[frames], **self.kwargs, do_sample_frames=False, return_tensors="pt")
        rate = self.fps if self.requested_rate else metadata.sampled_fps
        return {
            "pixel_values": out["pixel_values_videos"],
            "grid_thw": out["video_grid_thw"],
            "second_per_grid_ts": torch.tensor([self.hf.temporal_patch_size / rate]),
        }


def _header(data: bytes):
    """transformers' VideoMetadata from the container header alone (as its PyAV reader states it)."""
    import av
    from transformers.video_utils import VideoMetadata

    try:
        with av.open(io.BytesIO(data)) as c:
            if not c.streams.video:
                raise ValueError("no video stream")
            s = c.streams.video[0]
            if not s.frames or not s.average_rate:
                raise ValueError("the container states no frame count or frame rate")
            return VideoMetadata(
                total_num_frames=int(s.frames), fps=float(s.average_rate), width=s.width, height=s.height
            )
    except av.error.FFmpegError as e:
        raise ValueError(f"not a readable video: {e}") from None
