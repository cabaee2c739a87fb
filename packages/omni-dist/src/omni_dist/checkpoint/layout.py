"""The folder layout of a checkpoint root, answerable without a process group (plain pathlib).

    step-00000120/        a complete checkpoint: DCP shards + `.metadata` (written last by DCP)
    step-00000140.tmp/    a save in progress, or the debris of one that crashed
    latest                the name of the newest complete checkpoint (replaced atomically)

Every name of the layout is spelled here and only here: the checkpoint manager writes through this
class, and launchers, inference and export tools read through it.
"""

from __future__ import annotations

import operator
import os
import re
import shutil
from pathlib import Path

_STEP_DIR = re.compile(r"^step-(\d+)$")
_PREFIX = "step-"
_PARTIAL = ".tmp"
POINTER = "latest"
METADATA = ".metadata"  # DCP's index, written after every rank's shards: its presence means complete


class CheckpointError(RuntimeError):
    """No checkpoint to resume from, or one that does not fit the parts being loaded."""


class CheckpointLayout:
    """Names and questions about the checkpoints under `root`; no torch, no process group."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"CheckpointLayout({str(self.root)!r})"

    # ---- names ------------------------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        """Where the complete checkpoint of `step` lives (whether or not it exists)."""
        return self.root / _name(step)

    def tmp_dir(self, step: int) -> Path:
        """Where a save of `step` is written before it is published."""
        return self.root / (_name(step) + _PARTIAL)

    @staticmethod
    def step_of(path: str | Path) -> int:
        """The step of a checkpoint directory, from its name (`.../step-00000120` -> 120)."""
        m = _STEP_DIR.match(Path(path).name)
        if m is None:
            raise ValueError(
                f"{str(path)!r} is not a checkpoint step directory: expected a name like "
                f"{_name(120)!r} (partial saves end in {_PARTIAL!r} and are not checkpoints)."
            )
        return int(m.group(1))

    # ---- questions --------------------------------------------------------------------------------

    @staticmethod
    def is_complete(path: str | Path) -> bool:
        """Whether `path` is a published step directory whose save finished (it has `.metadata`)."""
        path = Path(path)
        return _STEP_DIR.match(path.name) is not None and (path / METADATA).is_file()

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints under root, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(self.step_of(p) for p in self.root.iterdir() if self.is_complete(p))

    def partial_dirs(self) -> list[Path]:
        """Unpublished saves (`step-N.tmp`): in progress, or left by a crash; oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            if path.name.endswith(_PARTIAL) and _STEP_DIR.match(path.name[: -len(_PARTIAL)]):
                found.append((int(path.name[len(_PREFIX) : -len(_PARTIAL)]), path))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the one `latest` names if it is complete, else the newest
        complete step directory (a stale or missing pointer falls back); None if there is none."""
        pointer = self.root / POINTER
        if pointer.is_file():
            try:
                name = pointer.read_text().strip()
            except (OSError, UnicodeDecodeError):
                name = ""
            if _STEP_DIR.match(name) and self.is_complete(self.root / name):
                return self.root / name
        steps = self.complete_steps()
        return self.step_dir(steps[-1]) if steps else None

    def latest_step(self) -> int | None:
        """The step of `latest()`, or None when there is no complete checkpoint."""
        path = self.latest()
        return None if path is None else self.step_of(path)

    def checkpoint(self, step: int | None = None) -> Path:
        """The directory of the complete checkpoint of `step` (default: the latest); CheckpointError
        naming the root and the steps that exist if there is none."""
        if step is None:
            path = self.latest()
            if path is None:
                raise CheckpointError(f"no complete checkpoint under {self.root}{self._partial_note()}.")
            return path
        path = self.step_dir(step)
        if self.is_complete(path):
            return path
        if path.is_dir():
            why = f"{path} is incomplete (it has no {METADATA})"
        elif self.tmp_dir(step).is_dir():
            why = f"step {step} has only an unfinished save ({self.tmp_dir(step).name})"
        else:
            why = f"there is no checkpoint of step {step}"
        steps = self.complete_steps()
        have = f"complete steps: {steps}" if steps else "there are no complete checkpoints"
        raise CheckpointError(f"{why} under {self.root}; {have}.")

    def _partial_note(self) -> str:
        partial = self.partial_dirs()
        return f" (unfinished saves: {[p.name for p in partial]})" if partial else ""

    # ---- writing ----------------------------------------------------------------------------------

    def publish(self, tmp: Path, final: Path) -> None:
        """Make a finished save visible: rename `tmp` to `final` (replacing an older `final`), then
        point `latest` at it with an atomic replace. Call on one process only."""
        tmp, final = Path(tmp), Path(final)
        self.step_of(final)  # a misnamed target would be invisible to every reader
        if final.parent != self.root:
            raise ValueError(f"{final} is not a checkpoint directory of {self.root}.")
        if not (tmp / METADATA).is_file():
            raise CheckpointError(f"{tmp} has no {METADATA} after the save: not publishing it.")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = self.root / (POINTER + _PARTIAL)
        pointer.write_text(final.name)
        os.replace(pointer, self.root / POINTER)

    def remove(self, step: int) -> None:
        """Delete the checkpoint of `step` (missing is fine)."""
        shutil.rmtree(self.step_dir(step), ignore_errors=True)

    def remove_partial(self) -> None:
        """Delete every unpublished save (only while no save is in progress)."""
        for path in self.partial_dirs():
            shutil.rmtree(path, ignore_errors=True)


def _name(step: int) -> str:
    try:
        n = operator.index(step)
    except TypeError:
        n = -1
    if isinstance(step, bool) or n < 0:
        raise ValueError(f"a checkpoint step is an int >= 0, got {step!r}.")
    return f"{_PREFIX}{n:08d}"
