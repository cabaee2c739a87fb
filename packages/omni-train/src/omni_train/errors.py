"""Errors of a run that a restart cannot fix; the Ray launcher ends the run on them, by type."""

from __future__ import annotations

from omni_data.config import DataConfigError
from omni_data.errors import DataErrorRateExceeded, DataUnreadable
from omni_data.peers import DataPeerMismatch
from omni_models.config import ModelConfigError
from omni_train.config import ConfigError


class TrainingError(RuntimeError):
    """Training cannot go on (too many non-finite steps, data ended early); a restart would not help."""


FATAL_ERRORS: tuple[type[BaseException], ...] = (
    TrainingError,
    ConfigError,
    ModelConfigError,
    DataConfigError,
    DataErrorRateExceeded,
    DataUnreadable,
    DataPeerMismatch,
)
