"""Qwen3-VL and Qwen3-VL-MoE: the vision tower (mergers inside, DeepStack's too, so the projector is the
identity) and the text model (dense, or MoE). The two differ in their classes only.

Their checkpoints keep transformers' nested names (`model.language_model.*`, `model.visual.*`,
`lm_head.weight`; LAYOUT); the MoE's released checkpoints store its fused experts transposed ((E, H, 2I),
(E, I, H)), save_pretrained as in memory: loading reads either (TRANSPOSED). Images go through the
directory's image processor, videos through its video processor, laid out with their frame timestamps as
its Qwen3VLProcessor does (encoders/qwen3_vl_processing.py). Positions are the family's own
`get_rope_index` (each frame placed after its timestamp's text). Parts and positions are built as
Qwen2-VL's are (families/qwen2_vl.py).
"""

from __future__ import annotations

from omni_models.families.base import PretrainedFamily
from omni_models.families.qwen2_vl import MARKERS, expander, rope_positions

LAYOUT = {
    "foundation.model.": "model.language_model.",
    "foundation.lm_head.": "lm_head.",
    "encoders.vision.tower.": "model.visual.",
}


TRANSPOSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
QWEN3_VL = PretrainedFamily(
    name="qwen3_vl",
    expand=expander("qwen3_vl_text", "qwen3_vl_vision"),
    markers=MARKERS,
    layout=LAYOUT,
    positions=rope_positions("Qwen3VLModel", video_seconds=False),
)
QWEN3_VL_MOE = PretrainedFamily(
    name="qwen3_vl_moe",
    expand=expander("qwen3_vl_moe_text", "qwen3_vl_moe_vision"),
    markers=MARKERS,
    layout=LAYOUT,
    positions=rope_positions("Qwen3VLMoeModel", video_seconds=False),
    transposed=TRANSPOSED,
)
