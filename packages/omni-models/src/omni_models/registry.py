"""Registries by name: encoders (config, modalities, **options), decoders, foundations (HF configs).

A part from outside the repository registers with `register_*`, called by a plugin that omni-train loads
(omni_train.plugins: an `omniscale.plugins` entry point, or a module the recipe's `plugins` names).
Registering the same class under the same name again is a no-op (a plugin may load more than once in a
process); another class under a taken name is an error.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from transformers import LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig

from omni_models.decoders.janus_vq import JanusVQImageDecoder
from omni_models.encoders.janus_vision import JanusVisionEncoder
from omni_models.encoders.qwen2_vl import (
    Qwen2_5_VLVisionEncoder,
    Qwen2_5OmniVisionTower,
    Qwen2VLVisionEncoder,
)
from omni_models.encoders.qwen3_omni_audio import Qwen3OmniAudioEncoder
from omni_models.encoders.qwen3_omni_vision import Qwen3OmniVisionTower
from omni_models.encoders.qwen3_vl import Qwen3VLMoeVisionEncoder, Qwen3VLVisionEncoder
from omni_models.encoders.qwen_omni_audio import QwenOmniAudioEncoder
from omni_models.encoders.siglip import SiglipImageEncoder
from omni_models.encoders.whisper import WhisperAudioEncoder
from omni_models.foundations.qwen3_omni import Qwen3OmniMoeThinkerTextForCausalLM
from omni_models.foundations.qwen3_vl import Qwen3VLMoeTextForCausalLM, Qwen3VLTextForCausalLM
from omni_models.foundations.text_lm import (
    Qwen2_5_VLTextForCausalLM,
    Qwen2_5OmniThinkerTextForCausalLM,
    Qwen2VLTextForCausalLM,
)

ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "qwen2_vl_vision": Qwen2VLVisionEncoder,
    "qwen2_5_vl_vision": Qwen2_5_VLVisionEncoder,
    "qwen2_5_omni_vision": Qwen2_5OmniVisionTower,
    "qwen2_5_omni_audio": QwenOmniAudioEncoder,
    "qwen3_vl_vision": Qwen3VLVisionEncoder,
    "qwen3_vl_moe_vision": Qwen3VLMoeVisionEncoder,
    "qwen3_omni_moe_vision": Qwen3OmniVisionTower,
    "qwen3_omni_moe_audio": Qwen3OmniAudioEncoder,
    "janus_vision": JanusVisionEncoder,
    "siglip": SiglipImageEncoder,
    "whisper": WhisperAudioEncoder,
}

# A decoder class takes (config, modalities, hidden_size=<the foundation's width>).
DECODERS: dict[str, Callable[..., nn.Module]] = {
    "janus_vq": JanusVQImageDecoder,
}

FOUNDATIONS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "qwen3_moe": Qwen3MoeConfig,
    "qwen2_vl_text": Qwen2VLTextConfig,
    "qwen2_5_vl_text": Qwen2_5_VLTextConfig,
    "qwen2_5_omni_text": Qwen2_5OmniTextConfig,
    "qwen3_vl_text": Qwen3VLTextConfig,
    "qwen3_vl_moe_text": Qwen3VLMoeTextConfig,
    "qwen3_omni_moe_text": Qwen3OmniMoeTextConfig,
}

# Foundations whose class AutoModelForCausalLM does not build (the text LM of an HF multimodal family).
FOUNDATION_MODELS: dict[str, type[nn.Module]] = {
    "qwen2_vl_text": Qwen2VLTextForCausalLM,
    "qwen2_5_vl_text": Qwen2_5_VLTextForCausalLM,
    "qwen2_5_omni_text": Qwen2_5OmniThinkerTextForCausalLM,
    "qwen3_vl_text": Qwen3VLTextForCausalLM,
    "qwen3_vl_moe_text": Qwen3VLMoeTextForCausalLM,
    "qwen3_omni_moe_text": Qwen3OmniMoeThinkerTextForCausalLM,
}


def register_encoder(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add an encoder (e.g. a new modality); its class follows omni_models.modality.Encoder."""
    if ENCODERS.get(name, factory) is not factory:
        raise ValueError(f"encoder {name!r} is already registered (as {ENCODERS[name]!r})")
    ENCODERS[name] = factory


def register_foundation(
    name: str, config_class: type[PretrainedConfig], model_class: type[nn.Module] | None = None
) -> None:
    """Add a foundation: its HF config class, and its model class when not an AutoModelForCausalLM."""
    if name in FOUNDATIONS and (FOUNDATIONS[name], FOUNDATION_MODELS.get(name)) != (
        config_class,
        model_class,
    ):
        raise ValueError(f"foundation {name!r} is already registered (as {FOUNDATIONS[name]!r})")
    FOUNDATIONS[name] = config_class
    if model_class is not None:
        FOUNDATION_MODELS[name] = model_class


def register_decoder(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add a decoder (a generated modality); its class follows omni_models.modality.Decoder."""
    if DECODERS.get(name, factory) is not factory:
        raise ValueError(f"decoder {name!r} is already registered (as {DECODERS[name]!r})")
    DECODERS[name] = factory
