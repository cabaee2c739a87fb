"""Distributed checkpoints (torch DCP): folder layout, stateful parts, atomic manager, HF export."""

from omni_dist.checkpoint.layout import CheckpointError, CheckpointLayout
from omni_dist.checkpoint.manager import CheckpointManager
from omni_dist.checkpoint.parts import ModelPart, OptimizerPart, RNGPart, Stateful

__all__ = [
    "CheckpointError",
    "CheckpointLayout",
    "CheckpointManager",
    "ModelPart",
    "OptimizerPart",
    "RNGPart",
    "Stateful",
]
