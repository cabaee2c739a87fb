"""Wiring the data side to the model side: the chat processor of an omni model configuration.

omni-data and omni-models never import each other; this is where a model's encoders hand their
processors (raw item -> tensors + token counts) to omni-data's ChatProcessor. Encoders are built on
the meta device, so nothing is allocated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import yaml

from omni_data.processor import ChatProcessor
from omni_models.config import OmniModelConfig
from omni_models.registry import DECODERS, ENCODERS, FOUNDATIONS


def model_config(model: str | Mapping[str, Any]) -> OmniModelConfig:
    """From a mapping, or a YAML file whose `model:` section is the omni model spec."""
    if isinstance(model, str):
        with open(model) as f:
            model = (yaml.safe_load(f) or {}).get("model")
        if model is None:
            raise ValueError("the YAML file has no 'model' section")
    return OmniModelConfig.from_dict(model)


def media_processors(cfg: OmniModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(encoder processors, decoder processors) by modality; parts are built on meta to ask them."""
    media, targets = {}, {}
    with torch.device("meta"):
        width = FOUNDATIONS[cfg.foundation.name](**cfg.foundation.config).hidden_size
        for e in cfg.encoders.values():
            encoder = ENCODERS[e.name](dict(e.config), modalities=e.modalities, **e.options)
            media.update({m: encoder.processor(m) for m in e.modalities})
        for d in cfg.decoders.values():
            decoder = DECODERS[d.name](
                dict(d.config), modalities=d.modalities, hidden_size=width, **d.options
            )
            targets.update({m: decoder.processor(m) for m in d.modalities})
    return media, targets


def chat_processor(
    model: str | Mapping[str, Any], tokenizer: str, use_recorded_counts: bool = True
) -> ChatProcessor:
    from transformers import AutoTokenizer

    media, targets = media_processors(model_config(model))
    return ChatProcessor(
        AutoTokenizer.from_pretrained(tokenizer),
        media=media,
        targets=targets,
        use_recorded_counts=use_recorded_counts,
    )
