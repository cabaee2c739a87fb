"""Qwen2.5-Omni's thinker (vision + audio understanding): its vision tower and audio tower (each with
its own projection to the LLM, so the projectors are the identity) and its text model.

A thinker directory (`model_type: qwen2_5_omni_thinker`, as `Qwen2_5OmniThinkerForConditionalGeneration`
saves it) holds `model.*` + `lm_head.weight` for the language model, `visual.*` and `audio_tower.*`; the
whole model's directory (`qwen2_5_omni`, e.g. Qwen2.5-Omni-7B) holds the same under `thinker.`, beside
the talker and token2wav (speech output), which are not trained here: loading leaves them alone and
export copies them through unchanged, so the exported directory still speaks.
"""

from __future__ import annotations

from typing import Any

from omni_models.families.base import PartSpecs, PretrainedFamily, processor_dir
from omni_models.families.mrope import OmniThinkerPositions

LAYOUT = {"foundation.": "", "encoders.vision.tower.": "visual.", "encoders.audio.tower.": "audio_tower."}
SPEECH = ("talker.", "token2wav.")


PARTS = ("qwen2_5_omni_text", "qwen2_5_omni_vision", "qwen2_5_omni_audio")  # foundation, vision, audio


def expand(
    hf_config: Any, path: str, use_audio_in_video: bool = False, parts: tuple[str, ...] = PARTS
) -> PartSpecs:
    """`use_audio_in_video`: each video brings its audio track, interleaved with its frames (HF's flag);
    `parts`: the registered names of the foundation and the two towers (Qwen3-Omni's thinker is laid out
    alike)."""
    if not isinstance(use_audio_in_video, bool):
        raise ValueError(f"model.use_audio_in_video must be true or false, got {use_audio_in_video!r}")
    text = hf_config.text_config.to_dict()
    text["tie_word_embeddings"] = bool(hf_config.tie_word_embeddings)  # the thinker's, not its text config's
    part = {"path": path, "freeze": False, "projector": "identity"}
    return {
        "foundation": {"name": parts[0], "config": text, "path": path, "freeze": False},
        "encoders": {
            "vision": {
                "name": parts[1],
                "modalities": ["image", "video"],
                "config": hf_config.vision_config.to_dict(),
                "options": {"processor_dir": processor_dir(path), "use_audio_in_video": use_audio_in_video},
                **part,
            },
            "audio": {
                "name": parts[2],
                "modalities": ["audio"],
                "config": hf_config.audio_config.to_dict(),
                "options": {"processor_dir": processor_dir(path)},
                **part,
            },
        },
    }


def _positions(hf_config: Any) -> OmniThinkerPositions:
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerModel

    return OmniThinkerPositions(hf_config, Qwen2_5OmniThinkerModel, video_seconds=True)


MARKERS = {
    "image": ("<|vision_bos|>", "<|IMAGE|>", "<|vision_eos|>"),
    "video": ("<|vision_bos|>", "<|VIDEO|>", "<|vision_eos|>"),
    "audio": ("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"),
}
OPTIONS = ("use_audio_in_video",)
QWEN2_5_OMNI_THINKER = PretrainedFamily(
    name="qwen2_5_omni_thinker",
    expand=expand,
    markers=MARKERS,
    layout=LAYOUT,
    positions=_positions,
    options=OPTIONS,
)
QWEN2_5_OMNI = PretrainedFamily(
    name="qwen2_5_omni",
    expand=lambda hf_config, path, **options: expand(hf_config.thinker_config, path, **options),
    markers=MARKERS,
    layout={ours: "thinker." + theirs for ours, theirs in LAYOUT.items()},
    positions=lambda hf_config: _positions(hf_config.thinker_config),
    ignore=SPEECH,
    options=OPTIONS,
)
