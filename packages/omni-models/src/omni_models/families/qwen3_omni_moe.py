"""Qwen3-Omni's thinker (vision + audio understanding, a MoE language model): its vision tower (DeepStack
mergers inside) and audio tower (each with its own projection to the LLM, so the projectors are the
identity) and its text model.

Laid out as Qwen2.5-Omni's thinker (families/qwen2_5_omni.py): a thinker directory (`model_type:
qwen3_omni_moe_thinker`, as `Qwen3OmniMoeThinkerForConditionalGeneration` saves it) holds `model.*` +
`lm_head.weight` for the language model, `visual.*` and `audio_tower.*`; the whole model's directory
(`qwen3_omni_moe`, e.g. Qwen3-Omni-30B-A3B-Instruct) holds the same under `thinker.`, beside the talker
and code2wav (speech output), which are not trained here: loading leaves them alone and export copies
them through unchanged. Experts are stored one tensor per expert and projection (PER_EXPERT), as
save_pretrained writes them. Positions are the thinker's own `get_rope_index` (audio by its mel frames;
`use_audio_in_video`: a video's audio track interleaved with its frames).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from omni_models.families.base import PretrainedFamily
from omni_models.families.mrope import OmniThinkerPositions
from omni_models.families.qwen2_5_omni import LAYOUT, expand

SPEECH = ("talker.", "code2wav.")
PARTS = ("qwen3_omni_moe_text", "qwen3_omni_moe_vision", "qwen3_omni_moe_audio")


def _positions(hf_config: Any) -> OmniThinkerPositions:
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerModel

    return OmniThinkerPositions(hf_config, Qwen3OmniMoeThinkerModel, video_seconds=True)


# The tokenizer's named tokens that Qwen3OmniMoeProcessor lays out (vision_bos_token, image_token,
# vision_eos_token, ...), as the released tokenizer names them
MARKERS = {
    "image": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"),
    "video": ("<|vision_start|>", "<|video_pad|>", "<|vision_end|>"),
    "audio": ("<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"),
}
OPTIONS = ("use_audio_in_video",)
QWEN3_OMNI_MOE_THINKER = PretrainedFamily(
    name="qwen3_omni_moe_thinker",
    expand=partial(expand, parts=PARTS),
    markers=MARKERS,
    layout=LAYOUT,
    positions=_positions,
    options=OPTIONS,
    per_expert=True,
)
QWEN3_OMNI_MOE = PretrainedFamily(
    name="qwen3_omni_moe",
    expand=lambda hf_config, path, **options: expand(hf_config.thinker_config, path, parts=PARTS, **options),
    markers=MARKERS,
    layout={ours: "thinker." + theirs for ours, theirs in LAYOUT.items()},
    positions=lambda hf_config: _positions(hf_config.thinker_config),
    ignore=SPEECH,
    options=OPTIONS,
    per_expert=True,
)
