"""Sharded, atomic, optionally asynchronous checkpoints of a set of stateful parts (torch DCP).

Layout of `root`:
    step-00000120/        complete checkpoints (DCP shards + .metadata, written last by DCP)
    step-00000140.tmp/    a save in progress, or the debris of one that crashed
    latest                name of the newest complete checkpoint (replaced atomically)

A checkpoint becomes visible only when every rank has written its shards and rank 0 has renamed the
`.tmp` directory; `latest` moves after that. Partial directories are ignored by `load` and removed by
the next `save`. At most one asynchronous save is in flight; the time `save` blocks training is
returned and logged. Checkpoints hold tensors only (see parts.py); DCP's own `.metadata` index is a
pickle, so load checkpoints you or your jobs wrote, and take weights from others as safetensors.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from omni_dist.checkpoint.parts import Stateful, decode_json, encode_json, join_state, split_state

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_SKELETON = "__skeleton__"


class CheckpointError(RuntimeError):
    """No checkpoint to resume from, or one that does not fit the parts being loaded."""


class CheckpointManager:
    """Save and load `{name: part}` under `root`, keeping the newest `keep` complete checkpoints."""

    def __init__(self, root: str | Path, keep: int = 2, async_save: bool = False):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}.")
        self.root = Path(root)
        self.keep = keep
        self.async_save = async_save
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # Async saves run collectives from a background thread: give them their own gloo group so
        # they never interleave with training collectives on the default group.
        self._group = dist.new_group(backend="gloo") if async_save else None
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self.last_blocked_s = 0.0

    # ---- saving -----------------------------------------------------------------------------------

    def save(self, step: int, parts: Mapping[str, Stateful]) -> float:
        """Checkpoint `parts` as step `step`; returns the seconds training was blocked."""
        start = time.perf_counter()
        self.wait()
        final, tmp = self._dir(step), self._dir(step).with_name(self._dir(step).name + ".tmp")
        if self.rank == 0:
            self._remove_partial()
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        dist.barrier()
        state = self._flatten(step, parts)
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
            self._pending = threading.Thread(
                target=self._finish, args=(future, step, tmp, final), daemon=True
            )
            self._pending.start()
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            dist.barrier()
            if self.rank == 0:
                self._commit(step, tmp, final)
            dist.barrier()
        self.last_blocked_s = time.perf_counter() - start
        if self.rank == 0:
            log.info("checkpoint step %d: training blocked %.3fs (%s)", step, self.last_blocked_s,
                     "async write continues" if self.async_save else "written")  # fmt: skip
        return self.last_blocked_s

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is written and committed."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise CheckpointError(f"the previous asynchronous checkpoint failed: {error!r}") from error

    def _finish(self, future: Future, step: int, tmp: Path, final: Path) -> None:
        try:
            future.result()  # DCP gathers every rank's results before rank 0 writes .metadata
            if self.rank == 0:
                self._commit(step, tmp, final)
        except BaseException as e:  # surfaced by the next save() or wait()
            self._pending_error = e

    def _commit(self, step: int, tmp: Path, final: Path) -> None:
        if not (tmp / ".metadata").exists():
            raise CheckpointError(f"{tmp} has no .metadata after the save: not committing it.")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = self.root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, self.root / "latest")
        complete = self.complete_steps()
        for old in complete[: -self.keep]:
            shutil.rmtree(self._dir(old), ignore_errors=True)

    def _remove_partial(self) -> None:
        for path in self.root.glob("step-*.tmp"):
            shutil.rmtree(path, ignore_errors=True)

    def _flatten(self, step: int, parts: Mapping[str, Stateful]) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {
            "meta/step": torch.tensor(step),
            "meta/world_size": torch.tensor(self.world_size),
        }
        for name, part in parts.items():
            prefix = self._prefix(name, part)
            tensors, skeleton = split_state(part.state_dict(), prefix)
            state.update(tensors)
            state[f"{prefix}/{_SKELETON}"] = encode_json(skeleton)
        return state

    def _prefix(self, name: str, part: Stateful) -> str:
        if "/" in name:
            raise ValueError(f"checkpoint part names may not contain '/': {name!r}")
        return f"{name}/rank{self.rank}" if getattr(part, "per_rank", False) else name

    # ---- loading ----------------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints under root, oldest first."""
        if not self.root.is_dir():
            return []
        steps = []
        for path in self.root.iterdir():
            m = _STEP_DIR.match(path.name)
            if m and (path / ".metadata").exists():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / "latest"
        if pointer.exists():
            path = self.root / pointer.read_text().strip()
            if (path / ".metadata").exists():
                return path
        steps = self.complete_steps()
        return self._dir(steps[-1]) if steps else None

    def load(self, parts: Mapping[str, Stateful], path: str | Path | None = None) -> int:
        """Load `parts` from `path` (default: the latest complete checkpoint); returns its step.

        Per-rank parts saved by a different world size are skipped with a warning (their state
        cannot be mapped onto other ranks); every other part must be present.
        """
        self.wait()
        path = Path(path) if path is not None else self.latest()
        if path is None or not (path / ".metadata").exists():
            raise CheckpointError(
                f"no complete checkpoint {'at ' + str(path) if path else 'under ' + str(self.root)}."
            )
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        saved_world = self._read(path, {"meta/world_size": torch.tensor(0), "meta/step": torch.tensor(0)})
        templates, skeleton_keys, active = {}, {}, {}
        for name, part in parts.items():
            prefix = self._prefix(name, part)
            key = f"{prefix}/{_SKELETON}"
            if key not in stored:
                if (
                    getattr(part, "per_rank", False)
                    and int(saved_world["meta/world_size"]) != self.world_size
                ):
                    if self.rank == 0:
                        log.warning("checkpoint %s: per-rank part %r was saved by %d ranks, not %d: not restored",
                                    path, name, int(saved_world["meta/world_size"]), self.world_size)  # fmt: skip
                    continue
                raise CheckpointError(
                    f"checkpoint {path} has no part {name!r} (it has {self._part_names(stored)})."
                )
            skeleton_keys[name] = key
            templates[key] = torch.empty(stored[key].size, dtype=torch.uint8)
            active[name] = (part, prefix)
        skeletons = self._read(path, dict(templates))
        state: dict[str, torch.Tensor] = {}
        for name, (part, prefix) in active.items():
            current, _ = split_state(part.state_dict(), prefix)
            skeleton = decode_json(skeletons[skeleton_keys[name]])
            wanted, _ = split_state(join_state(skeleton, _Keys()), prefix)
            missing = sorted(set(wanted) - set(current))
            if missing:
                raise CheckpointError(
                    f"part {name!r}: the checkpoint has {missing[:5]} which the current state lacks."
                )
            extra = sorted(set(current) - set(wanted))
            if extra:
                raise CheckpointError(
                    f"part {name!r}: the checkpoint lacks {extra[:5]} (a different model?)."
                )
            for key in wanted:
                if tuple(current[key].shape) != tuple(stored[key].size):
                    raise CheckpointError(
                        f"{key}: shape {tuple(stored[key].size)} in the checkpoint, {tuple(current[key].shape)} now."
                    )
                state[key] = current[key]
        dcp.load(state, checkpoint_id=str(path))
        for name, (part, _) in active.items():
            part.load_state_dict(join_state(decode_json(skeletons[skeleton_keys[name]]), state))
        return int(saved_world["meta/step"])

    def _read(self, path: Path, templates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dcp.load(templates, checkpoint_id=str(path))
        return templates

    @staticmethod
    def _part_names(stored) -> list[str]:
        return sorted({k.split("/")[0] for k in stored if k.endswith(_SKELETON)})

    def _dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"


class _Keys(dict):
    """Resolves every tensor placeholder of a skeleton to a dummy, to list the keys it expects."""

    def __missing__(self, key: str) -> torch.Tensor:
        return torch.empty(0)
