"""The trainer's periodic work as small hooks the loop calls (VeOmni's trainer callbacks): the profiler,
the launcher's heartbeat, the sample log, the metrics, evaluation and checkpoints.

`Trainer._hooks` builds them once from the config, in this order, and the loop calls every hook in it:

    before_step(n)     before step n (1-based) fetches its batch          profiler
    after_step(state)  after step n's numbers were read and its rates     profiler, heartbeat, sample log,
                       computed                                           metrics, evaluation, checkpoint
    on_end(step)       once the loop reached train.steps (not on errors)  checkpoint (the final one)
    close()            always, also on errors                             profiler, sample log, metrics

After the hooks' on_end the trainer writes the data report and waits for an asynchronous checkpoint still
being written. The order is part of the behaviour: a step's metrics line is written before its evaluation
line, and the evaluation runs before that step's checkpoint, so whatever it draws from the RNGs is in the
checkpoint and a resumed run continues as the uninterrupted one did.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from omni_data.loader import Step
from omni_dist.checkpoint import CheckpointManager
from omni_train.metrics import Metrics
from omni_train.profiling import StepProfiler


@dataclass(frozen=True)
class StepState:
    """What the hooks see of a step that ended."""

    step: int  # 1-based: the optimizer steps done, this one included
    batch: Step  # its micro-batches
    record: dict[str, Any]  # its metrics line (Trainer._step's record and the rates)


class StepHook(Protocol):
    """Periodic work around the optimizer steps. A hook subclassing this keeps the methods it does not
    define as no-ops."""

    def before_step(self, step: int) -> None:
        """Before step `step` fetches its batch."""

    def after_step(self, state: StepState) -> None:
        """After the step ended: its numbers were read and the counters advanced."""

    def on_end(self, step: int) -> None:
        """The loop reached train.steps (`step`); not called when training fails."""

    def close(self) -> None:
        """The end of training, also on errors: release files and writers."""


class ProfilerHook(StepHook):
    """train.profile: the torch profiler around the steps of its window (omni_train.profiling); a step's
    annotation ends once its numbers are read and its rates computed."""

    def __init__(self, profiler: StepProfiler):
        self.profiler = profiler

    def before_step(self, step: int) -> None:
        self.profiler.step_started(step)

    def after_step(self, state: StepState) -> None:
        self.profiler.step_ended(state.step)

    def close(self) -> None:
        self.profiler.close()


class Heartbeat(StepHook):
    """The launcher's progress callback after every step: its heartbeats and the last loss."""

    def __init__(self, on_progress: Callable[[int, float | None], None]):
        self.on_progress = on_progress

    def after_step(self, state: StepState) -> None:
        self.on_progress(state.step, state.record["loss"])


class SampleLog(StepHook):
    """logging.sample_ids: one JSON line per step with the sample ids it trained on, in `path` (one file per
    data-parallel rank, for audits). Appends: a resumed run continues the file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a")  # noqa: SIM115 - closed in close()

    def after_step(self, state: StepState) -> None:
        ids = [i for b in state.batch.micro_batches for i in b.sample_ids]
        self._file.write(json.dumps({"step": state.step, "epoch": state.batch.epoch, "ids": ids}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsLog(StepHook):
    """Each step's record: the progress bar every step, a metrics line every `every` steps and at `last`."""

    def __init__(self, metrics: Metrics, every: int, last: int):
        self.metrics, self.every, self.last = metrics, every, last

    def after_step(self, state: StepState) -> None:
        self.metrics.progress(state.step, state.record["loss"], state.record["tokens_per_s"])
        if state.step % self.every == 0 or state.step == self.last:
            self.metrics.log(state.record)

    def close(self) -> None:
        self.metrics.close()


class Evaluation(StepHook):
    """train.eval_every: every `every` steps, the eval set's losses (`evaluate`) as one line to `log`."""

    def __init__(
        self, evaluate: Callable[[], dict[str, Any]], log: Callable[[dict[str, Any]], None], every: int
    ):
        self.evaluate, self.log, self.every = evaluate, log, every

    def after_step(self, state: StepState) -> None:
        if state.step % self.every == 0:
            self.log({"step": state.step, **self.evaluate()})


class Checkpoints(StepHook):
    """A checkpoint every `interval` steps before the last (0: none), and a final one at the end when
    `save_final`, unless the run resumed at its end (nothing new to save)."""

    def __init__(
        self,
        manager: CheckpointManager,
        parts: Mapping[str, Any],
        interval: int,
        last: int,
        save_final: bool,
        resumed_at: int,
    ):
        self.manager, self.parts = manager, parts
        self.interval, self.last = interval, last
        self.save_final, self.resumed_at = save_final, resumed_at

    def after_step(self, state: StepState) -> None:
        if self.interval and state.step % self.interval == 0 and state.step < self.last:
            self.manager.save(state.step, self.parts)

    def on_end(self, step: int) -> None:
        if self.save_final and step > self.resumed_at:
            self.manager.save(step, self.parts)
