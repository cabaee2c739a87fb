"""Distributed checkpoints (torch DCP): stateful parts, atomic manager, HF safetensors export."""

from omni_dist.checkpoint.manager import CheckpointError, CheckpointManager
from omni_dist.checkpoint.parts import ModelPart, OptimizerPart, RNGPart, Stateful

__all__ = ["CheckpointError", "CheckpointManager", "ModelPart", "OptimizerPart", "RNGPart", "Stateful"]
