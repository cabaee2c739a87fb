"""Janus (understanding and VQ image generation): its Llama language model, its vision model with the
aligner (the projector is the identity) for images in, and its VQ-VAE with the generation embeddings,
aligner and head (the `janus_vq` decoder) for images out. Positions are 1-D.

`save_pretrained` writes `model.language_model.*`, `model.vision_model.*`, `model.aligner.*`,
`model.vqmodel.*`, `model.generation_{embeddings,aligner,head}.*` and `lm_head.weight` (unless tied).
"""

from __future__ import annotations

from typing import Any

from omni_models.families.base import PartSpecs, PretrainedFamily, processor_dir

LAYOUT = {
    "foundation.model.": "model.language_model.",
    "foundation.lm_head.": "lm_head.",
    "encoders.vision.vision_model.": "model.vision_model.",
    "encoders.vision.aligner.": "model.aligner.",
    "decoders.image_gen.tower.": "model.vqmodel.",
    "decoders.image_gen.embed.": "model.generation_embeddings.",
    "decoders.image_gen.aligner.": "model.generation_aligner.",
    "decoders.image_gen.head.": "model.generation_head.",
}


def expand(hf_config: Any, path: str) -> PartSpecs:
    text = hf_config.text_config.to_dict()
    text["tie_word_embeddings"] = bool(hf_config.tie_word_embeddings)  # JanusConfig's, as HF ties by it
    return {
        "foundation": {"name": "llama", "config": text, "path": path, "freeze": False},
        "encoders": {
            "vision": {
                "name": "janus_vision",
                "modalities": ["image"],
                "config": hf_config.vision_config.to_dict(),
                "options": {"processor_dir": processor_dir(path)},
                "path": path,
                "freeze": False,
                "projector": "identity",
            }
        },
        "decoders": {
            "image_gen": {
                "name": "janus_vq",
                "modalities": ["image"],
                "config": hf_config.vq_config.to_dict(),
                "path": path,
                "freeze": False,
            }
        },
    }


JANUS = PretrainedFamily(
    name="janus",
    expand=expand,
    markers={"image": ("<begin_of_image>", "<image_placeholder>", "<end_of_image>")},
    layout=LAYOUT,
)
