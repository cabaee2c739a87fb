"""The rank's loader: worker processes, equal steps across DP ranks, optional cost balancing, state.

Workers run under torchdata's StatefulDataLoader, which collects each worker's state with every item
it yields and restores workers (and its own round-robin position) from a state dict: the reason to
use it rather than torch's DataLoader, which cannot resume a worker mid-stream.

Every step, each rank takes up to `micro_batches_per_step` micro-batches and the ranks agree (one
small all-reduce) on whether any of them still has data and whether any has seen too much bad data.
A rank whose stream has ended fills its step with padding micro-batches (no labels, no samples), so
every rank runs the same number of forward/backward passes and no collective hangs; when no rank
has data left the epoch ends everywhere. No sample is dropped to equalise.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchdata.stateful_dataloader import StatefulDataLoader

from omni_data.balance import balance_step
from omni_data.collate import PackedBatch, padding_batch
from omni_data.config import DataConfig
from omni_data.dataset import StreamingDataset, WorkerItem
from omni_data.errors import DataErrorRateExceeded, ErrorCounts
from omni_data.processor import Processor


@dataclass
class Step:
    micro_batches: list[PackedBatch]
    epoch: int

    @property
    def num_label_tokens(self) -> int:
        return sum(b.num_label_tokens for b in self.micro_batches)


def _identity(x):
    return x


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
        self.config = config
        self.group = group
        self.device = torch.device(device)
        self.pad_id = pad_id
        self.dp_size = dp_size
        self.dataset = StreamingDataset(config, processor, dp_rank=dp_rank, dp_size=dp_size, pad_id=pad_id)
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch API here
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self._loader = StatefulDataLoader(
                self.dataset,
                batch_size=None,
                num_workers=config.num_workers,
                collate_fn=_identity,
                prefetch_factor=2 if config.num_workers else None,
            )
        self.epoch = 0
        self.steps = 0
        self._exhausted = False
        self._worker_errors: dict[int, ErrorCounts] = {}
        self._dropped: dict[int, int] = {}
        self._truncated: dict[int, int] = {}

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

    def _note(self, item: WorkerItem) -> None:
        self._worker_errors[item.slot] = ErrorCounts.from_state(item.errors)
        self._dropped[item.slot] = item.dropped
        self._truncated[item.slot] = item.truncated

    # -- iteration -----------------------------------------------------------------------------
    def _agree(self, real: int, abort: bool) -> tuple[int, bool]:
        flags = torch.tensor([real, int(abort)], dtype=torch.int64, device=self.device)
        if self.dp_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return int(flags[0]), bool(flags[1])

    def __iter__(self) -> Iterator[Step]:
        g = self.config.micro_batches_per_step
        it = None
        while self.config.epochs is None or self.epoch < self.config.epochs:
            if it is None and not self._exhausted:
                self.dataset.set_epoch(self.epoch)
                it = iter(self._loader)
            real: list[PackedBatch] = []
            abort = None
            while len(real) < g and not self._exhausted and abort is None:
                item = next(it, None)
                if item is None:
                    self._exhausted = True
                    break
                self._note(item)
                abort = item.abort
                if item.batch is not None:
                    real.append(item.batch)
            most, any_abort = self._agree(len(real), abort is not None)
            if any_abort:
                raise DataErrorRateExceeded(
                    abort or "another data-parallel rank exceeded data.max_error_rate"
                )
            if most == 0:  # no rank has data: the epoch is over everywhere
                self.epoch += 1
                self._exhausted = False
                it = None
                continue
            batches = real + [padding_batch(self.config.pad_to_multiple, self.pad_id)] * (g - len(real))
            if self.config.balance and self.dp_size > 1:
                batches = balance_step(batches, self.group, self.device)
            self.steps += 1
            yield Step(batches, self.epoch)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Valid between steps; JSON-able except for what StatefulDataLoader keeps (plain Python)."""
        return {
            "epoch": self.epoch,
            "steps": self.steps,
            "exhausted": self._exhausted,
            "loader": self._loader.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.steps, self._exhausted = state["epoch"], state["steps"], state["exhausted"]
        if not self._exhausted:  # an ended stream restarts fresh at the next epoch
            self._loader.load_state_dict(state["loader"])
