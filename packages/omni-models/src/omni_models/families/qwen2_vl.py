"""Qwen2-VL and Qwen2.5-VL: the vision tower (merger inside, so the projector is the identity) and the
text model. The two differ in their classes (Qwen2.5-VL's tower attends in windows, and its M-RoPE
spaces video frames by seconds per temporal patch) and share everything else.

The foundation's module names equal the checkpoint's language-model keys; the tower's are read under
`visual.` (LAYOUT: loading reads and export writes these keys). Images and videos go through the
directory's own image and video processors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omni_models.families.base import PartSpecs, PretrainedFamily, processor_dir
from omni_models.families.mrope import MRopePositions

# save_pretrained's (legacy) keys: the language model as `model.*` + `lm_head.weight`, the tower as `visual.*`
LAYOUT = {"foundation.": "", "encoders.vision.tower.": "visual."}


def expander(foundation: str, encoder: str) -> Callable[[Any, str], PartSpecs]:
    """The part specs of a VLM of these two parts (Qwen3-VL's families use it too)."""

    def expand(hf_config: Any, path: str) -> PartSpecs:
        text = hf_config.text_config.to_dict()
        text["tie_word_embeddings"] = bool(hf_config.tie_word_embeddings)  # only the top level carries it
        return {
            "foundation": {"name": foundation, "config": text, "path": path, "freeze": False},
            "encoders": {
                "vision": {
                    "name": encoder,
                    "modalities": ["image", "video"],
                    "config": hf_config.vision_config.to_dict(),
                    "path": path,
                    "freeze": False,
                    "projector": "identity",
                    "options": {"processor_dir": processor_dir(path)},
                }
            },
        }

    return expand


def rope_positions(model_class: str, video_seconds: bool) -> Callable[[Any], MRopePositions]:
    def positions(hf_config: Any) -> MRopePositions:
        import transformers

        return MRopePositions(hf_config, getattr(transformers, model_class), video_seconds)

    return positions


MARKERS = {
    "image": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "video": ("<|vision_start|>", "<|video_pad|>", "<|vision_end|>"),
}
QWEN2_VL = PretrainedFamily(
    name="qwen2_vl",
    expand=expander("qwen2_vl_text", "qwen2_vl_vision"),
    markers=MARKERS,
    layout=LAYOUT,
    positions=rope_positions("Qwen2VLModel", video_seconds=False),
)
QWEN2_5_VL = PretrainedFamily(
    name="qwen2_5_vl",
    expand=expander("qwen2_5_vl_text", "qwen2_5_vl_vision"),
    markers=MARKERS,
    layout=LAYOUT,
    positions=rope_positions("Qwen2_5_VLModel", video_seconds=True),
)
