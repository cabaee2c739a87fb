"""Qwen2-VL style processors: variable-resolution images and videos as packed patches.

Images go through transformers' own Qwen2-VL image processor (its PIL backend, which needs no
torchvision); the packer's count comes from the same processor (`get_number_of_image_patches`, from the
image header alone). Videos are frames sampled at `fps` (two per temporal patch), resized and patched
the same way here, since transformers' video processors need torchvision: each frame is resized so its
sides are multiples of patch_size x merge_size (aspect kept, pixel count within [min_pixels, max_pixels]),
normalised, and cut into patches laid out as the vision tower expects: (t*h*w, C * temporal_patch * p * p),
merge groups contiguous. Each item becomes t*h*w / merge^2 LLM tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from omni_models.media import decode_video, image_size, open_image, sample_times, video_info
from omni_models.modality import MediaCount

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PatchGeometry:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resize(self, width: int, height: int) -> tuple[int, int]:
        """Target (width, height): multiples of patch x merge with the pixel count within bounds."""
        if width < 1 or height < 1:
            raise ValueError(f"image of size {width}x{height}")
        if max(width, height) / min(width, height) > 200:
            raise ValueError(f"aspect ratio of {width}x{height} is over 200")
        f = self.factor
        h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
        return w, h

    def count(self, frames: int, width: int, height: int) -> MediaCount:
        units = (
            (frames // self.temporal_patch_size) * (height // self.patch_size) * (width // self.patch_size)
        )
        return MediaCount(units // self.merge_size**2, units)

    def patchify(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """(F, 3, H, W) in [0, 1] -> {"pixel_values": (t*h*w, 3*tp*p*p), "grid_thw": (1, 3)}."""
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        x = (frames - mean) / std
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if x.shape[0] % tp:
            x = torch.cat([x, x[-1:].expand(tp - x.shape[0] % tp, -1, -1, -1)])
        t, c, gh, gw = x.shape[0] // tp, x.shape[1], x.shape[2] // p, x.shape[3] // p
        x = x.reshape(t, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return {
            "pixel_values": x.reshape(t * gh * gw, c * tp * p * p).contiguous(),
            "grid_thw": torch.tensor([[t, gh, gw]]),
        }


class Qwen2VLImageProcessor:
    """An image through transformers' `Qwen2VLImageProcessorPil` with this geometry:
    {"pixel_values": (t*h*w patches, C * tp * p * p), "grid_thw": (1, 3)}."""

    def __init__(self, geometry: PatchGeometry):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        g = geometry
        self.merge = g.merge_size
        self.hf = Qwen2VLImageProcessorPil(
            min_pixels=g.min_pixels,
            max_pixels=g.max_pixels,
            patch_size=g.patch_size,
            temporal_patch_size=g.temporal_patch_size,
            merge_size=g.merge_size,
            image_mean=list(CLIP_MEAN),
            image_std=list(CLIP_STD),
        )

    def count(self, item) -> MediaCount:
        w, h = image_size(item.data)
        patches = self.hf.get_number_of_image_patches(h, w, {})
        return MediaCount(patches // self.merge**2, patches)

    def process(self, item) -> dict[str, torch.Tensor]:
        image = open_image(item.data)
        out = self.hf(images=[image], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "grid_thw": out["image_grid_thw"]}


class Qwen2VLVideoProcessor:
    def __init__(self, geometry: PatchGeometry, fps: float = 2.0, max_frames: int = 32):
        self.geometry, self.fps, self.max_frames = geometry, fps, max_frames

    def _plan(self, data: bytes) -> tuple[list[float], tuple[int, int]]:
        duration, w, h = video_info(data)
        times = sample_times(duration, self.fps, self.max_frames, self.geometry.temporal_patch_size)
        return times, self.geometry.resize(w, h)

    def count(self, item) -> MediaCount:
        times, (w, h) = self._plan(item.data)
        return self.geometry.count(len(times), w, h)

    def process(self, item) -> dict[str, torch.Tensor]:
        times, size = self._plan(item.data)
        out = self.geometry.patchify(decode_video(item.data, times, size))
        # seconds per temporal patch: Qwen2.5-VL spaces video positions in time by it
        out["second_per_grid_ts"] = torch.tensor([self.geometry.temporal_patch_size / self.fps])
        return out
