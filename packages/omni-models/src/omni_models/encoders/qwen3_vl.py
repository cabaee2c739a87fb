"""Qwen3-VL's (and Qwen3-VL-MoE's) vision tower as the encoder of images and videos, with DeepStack.

The tower is Qwen2-VL's packed-patch design (Qwen2VLVisionEncoder) with a learned position table resampled
to each grid, and DeepStack: mergers after some blocks (`deepstack_visual_indexes`) whose features the
foundation's first layers add at the media positions. `lm_encode` returns per modality (rows, 1 + N,
out_hidden_size): [:, 0] the final merger's features (the input embeddings), [:, 1 + i] what layer i adds
(the Encoder protocol's `deepstack_layers`, omni_models.modality).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeVisionConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from omni_dist.plan import ParallelPlan
from omni_models.encoders.qwen2_vl import Qwen2VLVisionEncoder
from omni_models.encoders.qwen3_vl_processing import Qwen3VLVideoProcessor
from omni_models.hf_processor import pretrained_processor, processor_part


class Qwen3VLVisionEncoder(Qwen2VLVisionEncoder):
    """Images and videos through one Qwen3-VL vision tower; `hidden_size` is its width and
    `out_hidden_size` the mergers' output (the foundation's width)."""

    config_class = Qwen3VLVisionConfig
    tower_class = Qwen3VLVisionModel
    block = "Qwen3VLVisionBlock"  # LayerNorm + GELU blocks: nothing for a kernel set to replace

    def __init__(self, config: Mapping[str, Any] | Qwen3VLVisionConfig, *args: Any, **options: Any):
        super().__init__(config, *args, **options)
        self.deepstack_layers = len(self.tower.config.deepstack_visual_indexes)

    @staticmethod
    def _output_size(cfg: Any) -> int:
        return cfg.out_hidden_size

    @staticmethod
    def _width(cfg: Any) -> int:
        return cfg.hidden_size

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        return torch.stack([out.pooler_output, *out.deepstack_features], dim=1)

    def _index_inputs(self, grid: torch.Tensor, device: torch.device) -> dict[str, Any]:
        """Qwen2-VL's, and the taps and weights that resample the learned position table to each grid."""
        tower = self.tower
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid,
            num_grid_per_side=tower.num_grid_per_side,
            mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners,
            spatial_merge_size=tower.config.spatial_merge_size,
        )
        return super()._index_inputs(grid, device) | {
            "interp_indices": indices.to(device, non_blocking=True),
            "interp_weights": weights.to(device, non_blocking=True),
        }

    def plan(self) -> ParallelPlan:
        """Blocks as units; each DeepStack merger too (as large as the final merger, which stays with the
        encoder's own unit), gathered when its block's output reaches it."""
        plan = super().plan()
        if not self.deepstack_layers:
            return plan
        units = (*plan.fsdp_units, "tower.deepstack_merger_list.*")
        return ParallelPlan(
            fsdp_units=units, recompute=plan.recompute, kernels=plan.kernels, compile=plan.compile
        )

    def processor(self, modality: str):
        """Images as Qwen2-VL's; videos with their frame timestamps when the directory's processor lays
        them out (qwen3_vl_processing)."""
        if modality != "video":
            return super().processor(modality)
        family = None
        if self._processor_dir is None:
            hf, kwargs = self._hf_processor(modality), {}
        else:
            family, merged = pretrained_processor(self._processor_dir)
            hf, kwargs = processor_part(family, merged, modality, self._processor_dir)
        return Qwen3VLVideoProcessor(hf, *self._video, kwargs=kwargs, family=family)

    def _hf_processor(self, modality: str):
        if modality != "video":
            return super()._hf_processor(modality)
        import transformers

        cfg = self.tower.config
        frames, factor = self._video[1], cfg.patch_size * cfg.spatial_merge_size
        # Its size bounds a whole video's pixels; capped per frame, each frame stays within max_pixels
        # as an image does.
        return transformers.Qwen3VLVideoProcessor(
            size={
                "shortest_edge": self._pixels["min_pixels"],
                "longest_edge": self._pixels["max_pixels"] * frames,
            },
            patch_size=cfg.patch_size,
            temporal_patch_size=cfg.temporal_patch_size,
            merge_size=cfg.spatial_merge_size,
            max_frames=frames,
            cap_pixels_per_frame=True,
            max_video_tokens=self._pixels["max_pixels"] // factor**2,
        )


class Qwen3VLMoeVisionEncoder(Qwen3VLVisionEncoder):
    """Qwen3-VL-MoE's tower: the same architecture under the MoE family's classes."""

    config_class = Qwen3VLMoeVisionConfig
    tower_class = Qwen3VLMoeVisionModel
    block = "Qwen3VLMoeVisionBlock"
