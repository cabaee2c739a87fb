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


def closing_summary(run_dir: Path, window: int = 10) -> list[str]:
    """What a run learned, from RUN_DIR/metrics.jsonl (all of its steps, across restarts): each part's
    mean loss over the first and the last `window` logged steps, and the last evaluation by part."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    steps: dict[int, dict[str, Any]] = {}
    evals = []
    for r in records:
        if "loss" in r:
            steps[r["step"]] = r  # a resumed run's records replace those of the steps it redid
        elif "eval/loss" in r:
            evals.append(r)
    if not steps:
        return []
    ordered = [steps[s] for s in sorted(steps)]
    first, last = ordered[:window], ordered[-window:]
    span = lambda rs: f"{rs[0]['step']}-{rs[-1]['step']}"  # noqa: E731
    lines = [f"mean loss by part, steps {span(first)} -> {span(last)}:"]
    keys = ["loss", *sorted(k for k in ordered[-1] if k.startswith("loss_"))]
    for key in keys:
        a, b = _mean(first, key), _mean(last, key)
        name = "all parts" if key == "loss" else key.removeprefix("loss_")
        lines.append(f"  {name:<12} {_fmt(a)} -> {_fmt(b)}")
    if evals:
        e = evals[-1]
        parts = ", ".join(
            f"{k.removeprefix('eval/loss_')} {_fmt(v)}" for k, v in e.items() if k.startswith("eval/loss_")
        )
        lines.append(
            f"eval at step {e['step']}: loss {_fmt(e['eval/loss'])}" + (f" ({parts})" if parts else "")
        )
    return lines


def _mean(records: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), int | float)]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
