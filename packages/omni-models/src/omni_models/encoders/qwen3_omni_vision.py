"""Qwen3-Omni's vision tower as the encoder of images and videos: Qwen3-VL's tower (DeepStack, learned
position table; Qwen3VLVisionEncoder) under Qwen3-Omni's classes, its media laid out as Qwen2.5-Omni's.

Qwen3OmniMoeProcessor writes a video as one run of placeholders (no frame timestamps, unlike Qwen3-VL's)
and M-RoPE spaces its temporal patches by the seconds each spans at the requested rate, as Qwen2.5-Omni.
With `use_audio_in_video`, a video item brings its audio track for the audio tower (modality "audio"),
interleaved with its frames as the family's processor lays them out (qwen_omni_video_audio.py); that
layout needs the pretrained directory's processor.
"""

from __future__ import annotations

from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeVisionEncoderConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

from omni_dist.plan import ParallelPlan
from omni_models.encoders.qwen2_vl import AudioInVideo, Qwen2VLVisionEncoder
from omni_models.encoders.qwen3_vl import Qwen3VLVisionEncoder


class Qwen3OmniVisionTower(AudioInVideo, Qwen3VLVisionEncoder):
    config_class = Qwen3OmniMoeVisionEncoderConfig
    tower_class = Qwen3OmniMoeVisionEncoder
    block = "Qwen3OmniMoeVisionBlock"
    video_rate_requested = True  # as Qwen3OmniMoeProcessor computes video_second_per_grid

    def plan(self) -> ParallelPlan:
        """Blocks as units; each DeepStack merger too (`merger_list` here; Qwen3-VL's property
        `deepstack_merger_list` names the same modules), by name: a glob would also match the ModuleList
        inside each merger, which FSDP cannot wrap."""
        plan = Qwen2VLVisionEncoder.plan(self)
        units = (*plan.fsdp_units, *(f"tower.merger_list.{i}" for i in range(self.deepstack_layers)))
        return ParallelPlan(
            fsdp_units=units, recompute=plan.recompute, kernels=plan.kernels, compile=plan.compile
        )

    def processor(self, modality: str):
        """Qwen2-VL's image and video processors (a video is one run of placeholders); a video with its
        audio track under `use_audio_in_video`."""
        proc = Qwen2VLVisionEncoder.processor(self, modality)
        if modality != "video" or not self._audio_in_video:
            return proc
        from omni_models.encoders.qwen3_omni_audio import Qwen3OmniAudioProcessor
        from omni_models.encoders.qwen_omni_video_audio import OmniVideoAudioProcessor
        from omni_models.hf_processor import pretrained_processor, processor_part

        hf, merged = pretrained_processor(
            self._processor_dir
        )  # loaded once for the audio part and the layout
        extractor, kwargs = processor_part(hf, merged, "audio", self._processor_dir)
        audio = Qwen3OmniAudioProcessor(extractor, kwargs, n_window=merged.get("n_window", 50))
        return OmniVideoAudioProcessor(proc, audio, hf, merged)

    def _hf_processor(self, modality: str):
        return Qwen2VLVisionEncoder._hf_processor(self, modality)
