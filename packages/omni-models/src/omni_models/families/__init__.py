"""Whole pretrained HF omni models (`model.pretrained: DIR`) mapped onto the composite's parts."""

from omni_models.families.base import PretrainedFamily, PretrainedSource
from omni_models.families.registry import FAMILIES, read_source, register_family

__all__ = ["FAMILIES", "PretrainedFamily", "PretrainedSource", "read_source", "register_family"]
