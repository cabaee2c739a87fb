"""Qwen3-VL and Qwen3-VL-MoE: the vision tower (mergers inside, DeepStack's too, so the projector is the
identity) and the text model (dense, or MoE). The two differ in their classes only.

Their checkpoints keep transformers' nested names (`model.language_model.*`, `model.visual.*`,
`lm_head.weight`; LAYOUT); the MoE's released checkpoints store its fused experts transposed ((E, H, 2I),
(E, I, H)), save_pretrained as in memory: loading reads either (TRANSPOSED). Images go through the directory's image processor, videos through its video
processor, laid out with their frame timestamps as its Qwen3VLProcessor does (encoders/
qwen3_vl_processing.py). Positions are the family's own `get_rope_index` (each frame placed after its
timestamp's text).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omni_models.families.base import PartSpecs, PretrainedFamily, processor_dir
from omni_models.families.mrope import MRopePositions
from omni_models.families.qwen2_vl import MARKERS

LAYOUT = {
    "foundation.model.": "model.language_model.",
    "foundation.lm_head.": "lm_head.",
    "encoders.vision.tower.": "model.visual.",
}


def _expander(foundation: str, encoder: str) -> Callable[[Any, str], PartSpecs]:
    def expand(hf_config: Any, path: str) -> PartSpecs:
        text = hf_config.text_config.to_dict()
        text["tie_word_embeddings"] = bool(hf_config.tie_word_embeddings)  # the top level's is the model's
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


def _positions(model_class: str) -> Callable[[Any], MRopePositions]:
    def positions(hf_config: Any) -> MRopePositions:
        import transformers

        return MRopePositions(hf_config, getattr(transformers, model_class))

    return positions


TRANSPOSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
QWEN3_VL = PretrainedFamily(
    name="qwen3_vl",
    expand=_expander("qwen3_vl_text", "qwen3_vl_vision"),
    markers=MARKERS,
    layout=LAYOUT,
    positions=_positions("Qwen3VLModel"),
)
QWEN3_VL_MOE = PretrainedFamily(
    name="qwen3_vl_moe",
    expand=_expander("qwen3_vl_moe_text", "qwen3_vl_moe_vision"),
    markers=MARKERS,
    layout=LAYOUT,
    positions=_positions("Qwen3VLMoeModel"),
    transposed=TRANSPOSED,
)
