"""Per-step metrics on rank 0: RUN_DIR/metrics.jsonl, TensorBoard, and a progress bar with ETA."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REQUIRED = ("step", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "mfu", "mem_gb", "elapsed_s")


class Metrics:
    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int,
        tensorboard: bool,
        console: str,
        enabled: bool,
    ):
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._progress = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        self._lines = console == "lines"
        if console == "progress":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, status="")
            self._progress.start()

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._progress is not None:
            self._progress.update(
                self._task, completed=step, status=f"loss {loss:.4f}  {tokens_per_s:.0f} tok/s"
            )

    def log(self, record: dict[str, Any]) -> None:
        """One step's record (the trainer calls this every `log_every` steps and at the last)."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k if "/" in k else f"train/{k}", v, record["step"])
        if self._lines:
            print(json.dumps(clean), flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
