"""Qwen2-VL's (and Qwen2.5-VL's) vision transformer as the encoder of images and videos (one tower,
packed patches)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniVisionEncoderConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.utils.generic import is_flash_attention_requested
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from omni_dist.packed import MediaBatch
from omni_dist.plan import ParallelPlan
from omni_models.encoders.qwen2_vl_processing import Qwen2VLImageProcessor, Qwen2VLVideoProcessor
from omni_models.flops import transformer_flops
from omni_models.hf_processor import pretrained_part


class Qwen2VLVisionEncoder(nn.Module):
    """Images and videos through one Qwen2-VL vision tower; output width is the merger's hidden_size."""

    config_class: type = Qwen2VLVisionConfig
    tower_class: type = Qwen2VisionTransformerPretrainedModel
    block = "Qwen2VLVisionBlock"
    # modules a kernel set may replace (plan.kernels): none in Qwen2-VL's LayerNorm + QuickGELU blocks
    block_kernels: tuple[tuple[str, str], ...] = ()
    video_rate_requested = False  # video seconds per temporal patch at the asked fps, not the sampled one

    def __init__(
        self,
        config: Mapping[str, Any] | Qwen2VLVisionConfig,
        modalities: tuple[str, ...] = ("image", "video"),
        min_pixels: int = 56 * 56,
        max_pixels: int = 28 * 28 * 1280,
        video_fps: float = 2.0,
        video_max_frames: int = 32,
        checkpoint_prefix: str = "",
        processor_dir: str | None = None,
    ):
        super().__init__()
        cfg = config if isinstance(config, self.config_class) else self.config_class(**config)
        unknown = set(modalities) - {"image", "video"}
        if unknown:
            raise ValueError(f"the Qwen2-VL vision encoder reads images and videos, not {sorted(unknown)}")
        self.modalities = tuple(modalities)
        self.tower = self.tower_class(cfg)
        self.output_size = self._output_size(cfg)
        self._pixels = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        self._video = (video_fps, video_max_frames)
        # A pretrained model's directory: its own image and video processors (the pixel options and
        # the processors' defaults are used only without it).
        self._processor_dir = processor_dir
        # "" for a tower saved on its own; "visual." to read a whole Qwen2-VL checkpoint (a pretrained
        # family reads through its layout instead).
        self.checkpoint_prefix = checkpoint_prefix

    @staticmethod
    def _output_size(cfg: Any) -> int:
        return cfg.hidden_size

    @staticmethod
    def _width(cfg: Any) -> int:
        return cfg.embed_dim

    def checkpoint_keys(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        return {self.checkpoint_prefix + name: tensor} if self.checkpoint_prefix else None

    def processor(self, modality: str):
        if modality not in ("image", "video"):
            raise KeyError(modality)
        if self._processor_dir is not None:
            hf, kwargs = pretrained_part(self._processor_dir, modality)
        else:
            hf, kwargs = self._hf_processor(modality), {}
        if modality == "image":
            return Qwen2VLImageProcessor(hf, kwargs)
        return Qwen2VLVideoProcessor(
            hf, *self._video, requested_rate=self.video_rate_requested, kwargs=kwargs
        )

    def _hf_processor(self, modality: str):
        """transformers' Qwen2-VL image or video processor with this tower's geometry and the pixel options."""
        import transformers

        cfg = self.tower.config
        geometry = {
            **self._pixels,
            "patch_size": cfg.patch_size,
            "temporal_patch_size": cfg.temporal_patch_size,
            "merge_size": cfg.spatial_merge_size,
        }
        if modality == "image":
            return transformers.Qwen2VLImageProcessor(**geometry)
        # Frames stay within max_pixels each; no extra per-video pixel budget (said, so HF need not warn).
        return transformers.Qwen2VLVideoProcessor(**geometry, cap_pixels_per_frame=False)

    def lm_encode(self, media: Mapping[str, MediaBatch]) -> dict[str, torch.Tensor]:
        names = [m for m in self.modalities if m in media]
        pixels = torch.cat([media[m].tensors["pixel_values"] for m in names])
        grid = torch.cat([media[m].tensors["grid_thw"] for m in names])
        dtype = self.tower.patch_embed.proj.weight.dtype
        merged = self._features(
            self.tower(pixels.to(dtype), grid_thw=grid, **self._index_inputs(grid, pixels.device))
        )
        if len(names) == 1:
            return {names[0]: merged}
        counts = [int(media[m].llm_tokens.sum()) for m in names]
        # Copies, not views: FSDP hooks the outputs of lm_encode for backward.
        return {m: part.clone() for m, part in zip(names, merged.split(counts), strict=True)}

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        """The LLM-token features (one row per merged token) of the tower's output."""
        return out.pooler_output

    def _index_inputs(self, grid: torch.Tensor, device: torch.device) -> dict[str, Any]:
        """The tower's index tensors, made by transformers' own functions from the grids on the host (they
        stay there: MediaBatch.to), so the tower never reads the device to build them. Sequence
        boundaries stay on the host too: HF's non-flash vision attention splits by them there."""
        cfg = self.tower.config
        cu = get_vision_cu_seqlens(grid)
        flash = is_flash_attention_requested(cfg)
        return {
            "position_ids": get_vision_position_ids(grid, cfg.spatial_merge_size).to(
                device, non_blocking=True
            ),
            "cu_seqlens": cu.to(device, non_blocking=True) if flash else cu,
            "max_seqlen": int((cu[1:] - cu[:-1]).max()),
        }

    def dummy_media(self) -> dict[str, MediaBatch]:
        cfg = self.tower.config  # one merge group of zero patches: a single LLM token
        m, rows = cfg.spatial_merge_size, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
        tensors = {"pixel_values": torch.zeros(m * m, rows), "grid_thw": torch.tensor([[1, m, m]])}
        return {self.modalities[0]: MediaBatch.of([tensors], [1])}

    def plan(self) -> ParallelPlan:
        return ParallelPlan(
            fsdp_units=(self.block,),
            recompute=(self.block,),
            kernels=dict(self.block_kernels),
            compile=(self.block,),
        )

    @cached_property
    def _block_params(self) -> int:  # counted once: flops() runs for every micro-batch
        return sum(p.numel() for p in self.tower.blocks.parameters())

    def flops(self, media: Mapping[str, MediaBatch]) -> float:
        cfg = self.tower.config
        # Attention runs within each temporal slice of h x w patches.
        lengths = [
            h * w for m in media.values() for t, h, w in m.tensors["grid_thw"].tolist() for _ in range(t)
        ]
        return transformer_flops(self._block_params, lengths, cfg.depth, self._width(cfg), causal=False)


class Qwen2_5_VLVisionEncoder(Qwen2VLVisionEncoder):
    """Qwen2.5-VL's tower: windowed attention except in `fullatt_block_indexes`, SwiGLU blocks, RMSNorm;
    `hidden_size` is its width and `out_hidden_size` the merger's output."""

    config_class = Qwen2_5_VLVisionConfig
    tower_class = Qwen2_5_VisionTransformerPretrainedModel
    block = "Qwen2_5_VLVisionBlock"
    block_kernels = (("Qwen2_5_VLRMSNorm", "rms_norm"), ("Qwen2_5_VLMLP", "swiglu"))

    @staticmethod
    def _output_size(cfg: Any) -> int:
        return cfg.out_hidden_size

    def _index_inputs(self, grid: torch.Tensor, device: torch.device) -> dict[str, Any]:
        out = super()._index_inputs(grid, device)
        tower = self.tower
        window, cu = get_vision_window_index(
            grid, tower.spatial_merge_size, tower.window_size, tower.patch_size
        )
        flash = is_flash_attention_requested(tower.config)
        return out | {
            "window_index": window.to(device, non_blocking=True),
            "cu_window_seqlens": cu.to(device, non_blocking=True) if flash else cu,
            "max_window_seqlen": int((cu[1:] - cu[:-1]).max()),
        }

    @staticmethod
    def _width(cfg: Any) -> int:
        return cfg.hidden_size


class AudioInVideo:
    """The Omni towers' `use_audio_in_video` option (before the tower class in the bases): each video item
    brings its audio track, laid out by the pretrained directory's processor, which it therefore needs."""

    def __init__(
        self,
        config: Any,
        modalities: tuple[str, ...] = ("image", "video"),
        use_audio_in_video: bool = False,
        **options: Any,
    ):
        super().__init__(config, modalities, **options)
        self._audio_in_video = use_audio_in_video
        if self._audio_in_video and self._processor_dir is None:
            raise ValueError("use_audio_in_video needs the pretrained directory's processor files")


class Qwen2_5OmniVisionTower(AudioInVideo, Qwen2_5_VLVisionEncoder):
    """Qwen2.5-Omni's vision tower: Qwen2.5-VL's architecture under the Omni thinker's classes.

    With `use_audio_in_video`, a video item brings its audio track for the audio tower (modality
    "audio"), interleaved with its frames as the family's processor lays them out; that layout needs
    the pretrained directory's processor."""

    config_class = Qwen2_5OmniVisionEncoderConfig
    tower_class = Qwen2_5OmniVisionEncoder
    block = "Qwen2_5OmniVisionBlock"
    block_kernels = (("Qwen2_5OmniRMSNorm", "rms_norm"), ("Qwen2_5OmniMLP", "swiglu"))
    video_rate_requested = True  # as Qwen2_5OmniProcessor computes video_second_per_grid

    def processor(self, modality: str):
        proc = super().processor(modality)
        if modality != "video" or not self._audio_in_video:
            return proc
        from omni_models.encoders.qwen_omni_audio import OmniAudioProcessor
        from omni_models.encoders.qwen_omni_video_audio import OmniVideoAudioProcessor
        from omni_models.hf_processor import pretrained_processor, processor_part

        hf, merged = pretrained_processor(
            self._processor_dir
        )  # loaded once for the audio part and the layout
        audio = OmniAudioProcessor(*processor_part(hf, merged, "audio", self._processor_dir))
        return OmniVideoAudioProcessor(proc, audio, hf, merged)
