"""The rank's loader: worker processes, equal steps across DP ranks, optional cost balancing, state.

Workers run under torchdata's StatefulDataLoader, which collects each worker's state with every item
it yields and restores workers (and its own round-robin position) from a state dict: the reason to
use it rather than torch's DataLoader, which cannot resume a worker mid-stream.

Every step, each rank takes up to `micro_batches_per_step` micro-batches and the ranks agree (one
small all-reduce) on whether any of them still has data and whether any has seen too much bad data.
A rank whose stream has ended fills its step with padding micro-batches (no labels, no samples), so
every rank runs the same number of forward/backward passes and no collective hangs; when no rank
has data left the epoch ends everywhere. No sample is dropped to equalise.

The data is split into `streams` (default: one per DP rank); each rank reads streams
[dp_rank * k, (dp_rank + 1) * k) with k = streams / dp_size, and a step holds micro_batches_per_step
from each. With the same number of streams, any number of ranks sees the same global batch per step:
one process with streams=2 trains on exactly what two DP ranks do.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

from omni_data.balance import balance_step
from omni_data.collate import padding_batch
from omni_data.config import DataConfig
from omni_data.dataset import StreamingDataset, WorkerItem
from omni_data.errors import DataErrorRateExceeded, ErrorCounts
from omni_data.processor import Processor
from omni_dist.lifecycle import die_with_parent
from omni_dist.packed import PackedBatch


@dataclass
class Step:
    micro_batches: list[PackedBatch]
    epoch: int


def _identity(x):
    return x


def _worker_init(rank_pid: int, worker_id: int) -> None:
    die_with_parent(rank_pid)


class _Stream:
    """One data stream: its dataset (a slot layout of its own) and its StatefulDataLoader."""

    def __init__(self, config: DataConfig, processor: Processor, index: int, total: int, pad_id: int):
        self.dataset = StreamingDataset(config, processor, dp_rank=index, dp_size=total, pad_id=pad_id)
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch API here
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self.loader = StatefulDataLoader(
                self.dataset,
                batch_size=None,
                num_workers=config.num_workers,
                collate_fn=_identity,
                prefetch_factor=2 if config.num_workers else None,
                # torch's own check of the parent never runs while a worker is blocked in a read (a hung
                # mount, a FIFO): tie the workers' lives to this process instead
                worker_init_fn=functools.partial(_worker_init, os.getpid()),
            )
        self.iterator: Iterator[WorkerItem] | None = None
        self.exhausted = False

    def next(self, epoch: int) -> WorkerItem | None:
        if self.exhausted:
            return None
        if self.iterator is None:
            self.dataset.set_epoch(epoch)
            self.iterator = iter(self.loader)
        item = next(self.iterator, None)
        if item is None:
            self.exhausted = True
        return item

    def new_epoch(self) -> None:
        self.iterator, self.exhausted = None, False


class OmniLoader:
    """Yields `Step`s (equal micro-batch counts on every DP rank); `state_dict` resumes exactly."""

    def __init__(
        self,
        config: DataConfig,
        processor: Processor,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        pad_id: int = 0,
    ):
        if dp_size > 1 and not dist.is_initialized():
            raise RuntimeError(
                "dp_size > 1 needs torch.distributed initialised (steps are agreed across ranks)"
            )
        total = config.streams or dp_size
        if total % dp_size:
            raise ValueError(
                f"data.streams ({total}) must be a multiple of the data-parallel size ({dp_size})"
            )
        per = total // dp_size
        self.config = config
        self.group = group
        self.device = torch.device(device)
        self.pad_id = pad_id
        self.dp_size = dp_size
        self._streams = [
            _Stream(config, processor, s, total, pad_id) for s in range(dp_rank * per, (dp_rank + 1) * per)
        ]
        self.epoch = 0
        self.steps = 0
        self._worker_errors: dict[tuple[int, int], ErrorCounts] = {}
        self._dropped: dict[tuple[int, int], int] = {}
        self._truncated: dict[tuple[int, int], int] = {}

    # -- stats ---------------------------------------------------------------------------------
    @property
    def errors(self) -> ErrorCounts:
        """Bad records seen by this rank's workers, summed (as of their latest micro-batch)."""
        return ErrorCounts.merged(self._worker_errors.values())

    @property
    def dropped(self) -> int:
        return sum(self._dropped.values())

    @property
    def truncated(self) -> int:
        return sum(self._truncated.values())

    def _note(self, stream: int, item: WorkerItem) -> None:
        key = (stream, item.slot)
        self._worker_errors[key] = ErrorCounts.from_state(item.errors)
        self._dropped[key] = item.dropped
        self._truncated[key] = item.truncated

    # -- iteration -----------------------------------------------------------------------------
    def _agree(self, real: int, abort: bool) -> tuple[int, bool]:
        flags = torch.tensor([real, int(abort)], dtype=torch.int64, device=self.device)
        if self.dp_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return int(flags[0]), bool(flags[1])

    def __iter__(self) -> Iterator[Step]:
        g = self.config.micro_batches_per_step
        while self.config.epochs is None or self.epoch < self.config.epochs:
            per_stream: list[list[PackedBatch]] = []
            abort = None
            for k, stream in enumerate(self._streams):
                real: list[PackedBatch] = []
                while len(real) < g and abort is None:
                    item = stream.next(self.epoch)
                    if item is None:
                        break
                    self._note(k, item)
                    abort = item.abort
                    if item.batch is not None:
                        real.append(item.batch)
                per_stream.append(real)
            most, any_abort = self._agree(max(len(r) for r in per_stream), abort is not None)
            if any_abort:
                raise DataErrorRateExceeded(
                    abort or "another data-parallel rank exceeded data.max_error_rate"
                )
            if most == 0:  # no stream on any rank has data: the epoch is over everywhere
                self.epoch += 1
                for stream in self._streams:
                    stream.new_epoch()
                continue
            filler = padding_batch(self.config.pad_to_multiple, self.pad_id)
            batches = [b for real in per_stream for b in real + [filler] * (g - len(real))]
            if self.config.balance and self.dp_size > 1:
                batches = balance_step(batches, self.group, self.device)
            self.steps += 1
            yield Step(batches, self.epoch)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Valid between steps; plain Python (JSON-able): per stream, its loader's worker states."""
        return {
            "epoch": self.epoch,
            "steps": self.steps,
            "streams": [{"exhausted": s.exhausted, "loader": s.loader.state_dict()} for s in self._streams],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["streams"]) != len(self._streams):
            raise ValueError(
                f"data loader state has {len(state['streams'])} streams on this rank, the loader {len(self._streams)}: "
                "exact resume needs the same data.streams and data-parallel size"
            )
        self.epoch, self.steps = state["epoch"], state["steps"]
        for stream, st in zip(self._streams, state["streams"], strict=True):
            stream.exhausted = st["exhausted"]
            if not stream.exhausted:  # an ended stream restarts fresh at the next epoch
                stream.loader.load_state_dict(st["loader"])
