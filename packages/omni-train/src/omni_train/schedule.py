"""Learning-rate schedules: linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(schedule: str, steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * shape

    return factor
