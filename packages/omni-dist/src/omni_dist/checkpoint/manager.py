"""Sharded, atomic, optionally asynchronous checkpoints of a set of stateful parts (torch DCP).

The folder layout of `root` (complete step directories, partial saves, the `latest` pointer) is owned
by `CheckpointLayout` (layout.py), which answers questions about it without a process group.

A checkpoint becomes visible only when every rank has written its shards and rank 0 has renamed the
partial directory; the `latest` pointer moves after that. Partial directories are ignored by `load`
and removed by the next `save`. At most one asynchronous save is in flight; the time `save` blocks
training is returned and logged. Checkpoints hold tensors only (see parts.py); DCP's own `.metadata`
index is a pickle, so load checkpoints you or your jobs wrote, and take weights from others as
safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from omni_dist.checkpoint.layout import METADATA, CheckpointError, CheckpointLayout
from omni_dist.checkpoint.parts import Stateful, decode_json, encode_json, join_state, split_state
from omni_dist.gather import all_gather_json

log = logging.getLogger(__name__)

_SKELETON = "__skeleton__"

__all__ = ["CheckpointError", "CheckpointManager"]


class CheckpointManager:
    """Save and load `{name: part}` under `root`, keeping the newest `keep` complete checkpoints."""

    def __init__(self, root: str | Path, keep: int = 2, async_save: bool = False):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}.")
        self.layout = CheckpointLayout(root)
        self.root = self.layout.root
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
        final, tmp = self.layout.step_dir(step), self.layout.tmp_dir(step)

        def prepare() -> None:
            self.layout.remove_partial()
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()

        _on_rank0_then_agree(prepare, f"preparing {tmp}")
        state = self._flatten(step, parts)
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
            self._pending = threading.Thread(target=self._finish, args=(future, tmp, final), daemon=True)
            self._pending.start()
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            _on_rank0_then_agree(lambda: self._commit(tmp, final), f"committing {final}")
        self.last_blocked_s = time.perf_counter() - start
        if self.rank == 0:
            log.info("checkpoint step %d: training blocked %.3fs (%s)", step, self.last_blocked_s,
                     "async write continues" if self.async_save else "written")  # fmt: skip
        return self.last_blocked_s

    def wait(self) -> None:
        """Block until the in-flight async save is written and committed, on every rank (collective
        when saving asynchronously); a failure on any rank raises on all of them."""
        if not self.async_save:
            return
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        error, self._pending_error = self._pending_error, None
        _agree(error, "the previous asynchronous checkpoint")

    def _finish(self, future: Future, tmp: Path, final: Path) -> None:
        try:
            future.result()  # DCP gathers every rank's results before rank 0 writes .metadata
            if self.rank == 0:
                self._commit(tmp, final)
        except BaseException as e:  # surfaced on every rank by the next save(), load() or wait()
            self._pending_error = e

    def _commit(self, tmp: Path, final: Path) -> None:
        self.layout.publish(tmp, final)
        # Keep the one just written plus the newest keep-1 others (a run resumed from an older step
        # must not lose what it just saved to checkpoints of the abandoned, later steps).
        others = [s for s in self.layout.complete_steps() if self.layout.step_dir(s) != final]
        for old in others[: max(0, len(others) - (self.keep - 1))]:
            self.layout.remove(old)

    def _flatten(self, step: int, parts: Mapping[str, Stateful]) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {
            "meta/step": torch.tensor(step),
            "meta/world_size": torch.tensor(self.world_size),
        }
        replicated = {}
        for name, part in parts.items():
            prefix = self._prefix(name, part)
            tensors, skeleton = split_state(part.state_dict(), prefix)
            state.update(tensors)
            state[f"{prefix}/{_SKELETON}"] = encode_json(skeleton)
            if not getattr(part, "per_rank", False) and self.world_size > 1:
                replicated[name] = _fingerprint(skeleton, tensors)
        if self.world_size > 1:
            # DCP stores one copy of a key that all ranks have: such parts must really be identical.
            everyone = all_gather_json(replicated)  # JSON, not pickle, between ranks
            differing = sorted(n for n in replicated if any(o.get(n) != replicated[n] for o in everyone))
            if differing:
                raise CheckpointError(
                    f"parts {differing} differ between ranks but are not per-rank: mark them `per_rank = True` "
                    "(each rank's state is then stored separately) or make them identical."
                )
        return state

    def _prefix(self, name: str, part: Stateful) -> str:
        if "/" in name:
            raise ValueError(f"checkpoint part names may not contain '/': {name!r}")
        return f"{name}/rank{self.rank}" if getattr(part, "per_rank", False) else name

    # ---- loading ----------------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints under root, oldest first (see `CheckpointLayout`)."""
        return self.layout.complete_steps()

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None (see `CheckpointLayout.latest`)."""
        return self.layout.latest()

    def load(self, parts: Mapping[str, Stateful], path: str | Path | None = None) -> int:
        """Load `parts` from `path` (default: the latest complete checkpoint); returns its step.

        Per-rank parts (RNG) are restored only when the checkpoint was written by the same world size;
        otherwise every rank skips them (logged once). A per-rank part with `gather_ranks = True` (data
        cursors) gets every saved rank's state on every rank, whatever the world sizes:
        `load_state_dict({"ranks": [state of rank 0, state of rank 1, ...]})`. Every other part must be
        present with the same tensors; a mismatch on any rank raises on all of them.
        """
        self.wait()
        path = Path(path) if path is not None else self.layout.checkpoint()
        if not (path / METADATA).is_file():  # any finished DCP directory loads, even renamed or moved
            raise CheckpointError(f"no complete checkpoint at {path} (it has no {METADATA}).")
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        meta = self._read(path, {"meta/world_size": torch.tensor(0), "meta/step": torch.tensor(0)})
        saved_world = int(meta["meta/world_size"])
        same_world = saved_world == self.world_size
        active = {}  # load key -> (part, prefix of its tensors in the checkpoint)
        gathered: dict[str, list[str]] = {}  # part name -> the load keys of every saved rank's state
        for name, part in parts.items():
            if getattr(part, "per_rank", False) and getattr(part, "gather_ranks", False):
                gathered[name] = [f"{name}/rank{r}" for r in range(saved_world)]
                active.update({key: (part, key) for key in gathered[name]})
                continue
            if getattr(part, "per_rank", False) and not same_world:
                if self.rank == 0:
                    log.warning("checkpoint %s: per-rank part %r was saved by %d ranks, not %d: not restored",
                                path, name, int(meta["meta/world_size"]), self.world_size)  # fmt: skip
                continue
            active[name] = (part, self._prefix(name, part))
        keys = {name: f"{prefix}/{_SKELETON}" for name, (_, prefix) in active.items()}
        absent = [name for name, key in keys.items() if key not in stored]
        _agree(
            CheckpointError(f"checkpoint {path} has no part(s) {absent} (it has {self._part_names(stored)}).")
            if absent else None,
            f"loading {path}",
        )  # fmt: skip
        raw = self._read(path, {k: torch.empty(stored[k].size, dtype=torch.uint8) for k in keys.values()})
        skeletons = {name: decode_json(raw[key]) for name, key in keys.items()}
        state: dict[str, torch.Tensor] = {}
        error = None
        try:
            for name, (part, prefix) in active.items():
                self._plan_part(name, part, prefix, skeletons[name], path, stored, state)
        except CheckpointError as e:
            error = e
        _agree(error, f"loading {path}")  # nobody enters the collective load unless everyone can
        dcp.load(state, checkpoint_id=str(path))
        for name, (part, _) in active.items():
            if not any(name in keys for keys in gathered.values()):
                part.load_state_dict(join_state(skeletons[name], state))
        for name, keys in gathered.items():
            parts[name].load_state_dict({"ranks": [join_state(skeletons[k], state) for k in keys]})
        return int(meta["meta/step"])

    def _plan_part(self, name, part, prefix, skeleton, path, stored, state) -> None:
        """Check one part against the checkpoint and add its load targets to `state` (no collectives)."""
        current, _ = split_state(part.state_dict(), prefix)
        wanted, _ = split_state(join_state(skeleton, _Keys()), prefix)
        extra = sorted(set(current) - set(wanted))
        if extra and any(isinstance(current[k], DTensor) for k in extra):
            raise CheckpointError(f"part {name!r}: the checkpoint lacks {extra[:5]} (a different model?).")
        for key in wanted:
            if key not in stored:
                raise CheckpointError(f"part {name!r}: {key} is missing from {path}.")
            have = current.get(key)
            if isinstance(have, DTensor):  # sharded: load into the live shards, resharding as needed
                if tuple(have.shape) != tuple(stored[key].size):
                    raise CheckpointError(
                        f"{key}: shape {tuple(stored[key].size)} in the checkpoint, {tuple(have.shape)} now."
                    )
                state[key] = have
            else:  # plain state may change size (buffers, counters): allocate what was stored
                state[key] = torch.empty(stored[key].size, dtype=stored[key].properties.dtype)
        model_like = [k for k in wanted if isinstance(current.get(k), DTensor)]
        missing = sorted(k for k in wanted if k not in current and model_like)
        if missing:
            raise CheckpointError(
                f"part {name!r}: the checkpoint has {missing[:5]} which the current model lacks."
            )

    def _read(self, path: Path, templates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dcp.load(templates, checkpoint_id=str(path))
        return templates

    @staticmethod
    def _part_names(stored) -> list[str]:
        return sorted({k.split("/")[0] for k in stored if k.endswith(_SKELETON)})


def _fingerprint(skeleton, tensors: dict[str, torch.Tensor]) -> str:
    """Hash of a part's structure and of its plain (unsharded) tensor values."""
    h = hashlib.sha256(json.dumps(skeleton, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key]
        if not isinstance(t, DTensor):
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _agree(error: BaseException | None, what: str) -> None:
    """Collective: raise on every rank if any rank failed `what` (so none is left in a collective)."""
    failed = torch.tensor([0 if error is None else 1])
    dist.all_reduce(failed)
    if error is not None:
        raise CheckpointError(f"{what} failed on rank {dist.get_rank()}: {error}") from error
    if int(failed):
        raise CheckpointError(f"{what} failed on {int(failed)} other rank(s); see their logs.")


def _on_rank0_then_agree(fn, what: str) -> None:
    error = None
    if dist.get_rank() == 0:
        try:
            fn()
        except BaseException as e:
            error = e
    _agree(error, what)


class _Keys(dict):
    """Resolves every tensor placeholder of a skeleton to a dummy, to list the keys it expects."""

    def __missing__(self, key: str) -> torch.Tensor:
        return torch.empty(0)
