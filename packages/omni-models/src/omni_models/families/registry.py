"""Families by HF model_type (extension point: `register_family`), and reading a directory's family."""

from __future__ import annotations

from pathlib import Path

from omni_models.families.base import PretrainedFamily, PretrainedSource
from omni_models.families.janus import JANUS
from omni_models.families.qwen2_5_omni import QWEN2_5_OMNI, QWEN2_5_OMNI_THINKER
from omni_models.families.qwen2_vl import QWEN2_5_VL, QWEN2_VL
from omni_models.families.qwen3_omni_moe import QWEN3_OMNI_MOE, QWEN3_OMNI_MOE_THINKER
from omni_models.families.qwen3_vl import QWEN3_VL, QWEN3_VL_MOE

FAMILIES: dict[str, PretrainedFamily] = {  # by HF model_type
    "qwen2_vl": QWEN2_VL,
    "qwen2_5_vl": QWEN2_5_VL,
    "qwen2_5_omni_thinker": QWEN2_5_OMNI_THINKER,
    "qwen2_5_omni": QWEN2_5_OMNI,
    "janus": JANUS,
    "qwen3_vl": QWEN3_VL,
    "qwen3_vl_moe": QWEN3_VL_MOE,
    "qwen3_omni_moe_thinker": QWEN3_OMNI_MOE_THINKER,
    "qwen3_omni_moe": QWEN3_OMNI_MOE,
}


def register_family(model_type: str, family: PretrainedFamily) -> None:
    if model_type in FAMILIES:
        raise ValueError(f"a family is already registered for model_type {model_type!r}")
    FAMILIES[model_type] = family


def read_source(path: str, error: type[Exception]) -> PretrainedSource:
    """The family of the HF model directory `path` (by its config.json's model_type)."""
    if not (Path(path) / "config.json").is_file():
        raise error(f"model.pretrained: {path} has no config.json (expected a save_pretrained directory)")
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    model_type = hf_config.model_type
    if model_type not in FAMILIES:
        raise error(
            f"model.pretrained: {path} is a {model_type!r} model; families with a mapping: {sorted(FAMILIES)}"
        )
    return PretrainedSource(path, FAMILIES[model_type], hf_config)
