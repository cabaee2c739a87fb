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
one process with streams=2 trains on exactly what two DP ranks do. The checkpointed state names each
stream's global number, so a run resumes on any DP/SP layout: the saved streams continue where they
were, spread over the new ranks (see `load_state_dict`).
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
from omni_data.dataset import StreamingDataset, WorkerItem, build_sources
from omni_data.errors import DataErrorRateExceeded, DataUnreadable, ErrorCounts
from omni_data.peers import check_peers
from omni_data.preflight import SourceHealth, check_sources, judge, warn
from omni_data.processor import Processor
from omni_dist.lifecycle import die_with_parent
from omni_dist.packed import PackedBatch, to_device


@dataclass
class Step:
    micro_batches: list[PackedBatch]
    epoch: int


def _identity(x):
    return x


def _worker_init(rank_pid: int, direct: bool, worker_id: int) -> None:
    die_with_parent(rank_pid, direct=direct)  # a forkserver's worker is the rank's grandchild


class _Stream:
    """One data stream: its dataset (a slot layout of its own) and its StatefulDataLoader."""

    def __init__(
        self, config: DataConfig, processor: Processor, index: int, total: int, pad_id: int, pin: bool
    ):
        self.index = index  # this stream's global number of `total`
        self.dataset = StreamingDataset(config, processor, dp_rank=index, dp_size=total, pad_id=pad_id)
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch API here
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self.loader = StatefulDataLoader(
                self.dataset,
                batch_size=None,
                num_workers=config.num_workers,
                multiprocessing_context=config.worker_start if config.num_workers else None,
                collate_fn=_identity,
                prefetch_factor=2 if config.num_workers else None,
                pin_memory=pin,  # batches bound for a GPU: page-locked, so their copies do not block
                # torch's own check of the parent never runs while a worker is blocked in a read (a hung
                # mount, a FIFO): tie the workers' lives to this process instead
                worker_init_fn=functools.partial(
                    _worker_init, os.getpid(), config.worker_start != "forkserver"
                ),
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


class DataResumeError(RuntimeError):
    """A saved data position that cannot continue exactly here; the message names the options."""


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
        peers: dist.ProcessGroup | None = None,
    ):
        """`group`: the data-parallel ranks (steps are agreed over it); `peers`: ranks that must get the
        same micro-batches (an SP group), checked every step."""
        if dp_size > 1 and not dist.is_initialized():
            raise RuntimeError(
                "dp_size > 1 needs torch.distributed initialised (steps are agreed across ranks)"
            )
        if config.streams and config.streams % dp_size:
            raise ValueError(
                f"data.streams ({config.streams}) must be a multiple of the data-parallel size ({dp_size})"
            )
        self.config = config
        self.processor = processor
        self.dp_rank = dp_rank
        self.group = group
        self.device = torch.device(device)
        self.pad_id = pad_id
        self.dp_size = dp_size
        self.peers = peers
        sources = build_sources(config)
        self._shard_source = {os.path.abspath(s): i for i, src in enumerate(sources) for s in src.shards()}
        self.health = check_sources(sources)
        problem = judge(self.health, config.max_bad_shards)
        if self._any(problem is not None) and problem is None:
            problem = "another data-parallel rank cannot read its data sources (its error names them)"
        if problem is not None:
            raise DataUnreadable(problem)
        warn(self.health)
        self._layout(config.streams or dp_size)
        self.epoch = 0
        self.steps = 0
        self.epoch_steps = 0  # steps with data in this epoch (the same on every rank)
        self._worker_errors: dict[tuple[int, int], ErrorCounts] = {}
        self._dropped: dict[tuple[int, int], int] = {}
        self._truncated: dict[tuple[int, int], int] = {}

    def _layout(self, total: int) -> None:
        """This rank's streams of `total`: a contiguous block when dp divides total, else every dp-th
        (after a resume onto more ranks than saved streams some ranks have none and step on fillers);
        every rank runs `per_rank` streams' worth of micro-batches per step."""
        self.total = total
        self.per_rank = -(-total // self.dp_size)
        if total % self.dp_size == 0:
            mine = range(self.dp_rank * self.per_rank, (self.dp_rank + 1) * self.per_rank)
        else:
            mine = range(self.dp_rank, total, self.dp_size)
        self._streams = [
            _Stream(self.config, self.processor, s, total, self.pad_id, self.device.type == "cuda")
            for s in mine
        ]

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
    def _agree(self, *values: int) -> list[int]:
        """The maximum of each value over the data-parallel ranks (one collective)."""
        if self.dp_size == 1:  # nothing to agree on: no device round trip
            return list(values)
        flags = to_device(torch.tensor(values, dtype=torch.int64), self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        return flags.tolist()  # one read for all values

    def _any(self, flag: bool) -> bool:
        return bool(self._agree(int(flag))[0])

    def bad_shards(self) -> list[dict[str, str]]:
        """Per source: the shards found missing before reading plus those that failed while read."""
        out = [dict(h.bad) for h in self.health]
        for shard, why in self.errors.bad_shards.items():
            path = os.path.abspath(shard)
            out[self._shard_source.get(path, 0)].setdefault(path, why)
        return out

    def _too_many_bad_shards(self) -> str | None:
        for h, bad in zip(self.health, self.bad_shards(), strict=True):
            if len(bad) > self.config.max_bad_shards * h.shards:
                h = SourceHealth(h.name, h.index, h.shards, bad)
                return judge([h], self.config.max_bad_shards)
        return None

    def report(self) -> dict:
        """This rank's account of its data: per source the bad shards (and the samples they held, per
        index.parquet), samples skipped by reason, dropped and truncated."""
        errors = self.errors
        sources = []
        for h, bad in zip(self.health, self.bad_shards(), strict=True):
            sources.append(SourceHealth(h.name, h.index, h.shards, bad, h.lost_samples).report())
        return {
            "sources": sources,
            "records_seen": errors.seen,
            "skipped": dict(errors.skipped),
            "dropped": self.dropped,
            "truncated": self.truncated,
        }

    def _nothing_usable(self) -> str:
        errors = self.errors
        skipped = ", ".join(f"{r}={n}" for r, n in errors.skipped.most_common()) or "none"
        bad = [f"{p} ({why})" for per in self.bad_shards() for p, why in per.items()][:3]
        return (
            f"epoch {self.epoch} produced no usable sample on any data-parallel rank: this rank saw "
            f"{errors.seen} records, skipped by reason: {skipped}; bad shards: {', '.join(bad) or 'none'}. "
            "The warnings above name each shard and key."
        )

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
            shards_abort = self._too_many_bad_shards()
            most, any_abort, any_shards_abort = self._agree(
                max((len(r) for r in per_stream), default=0), abort is not None, shards_abort is not None
            )
            if any_shards_abort:
                raise DataUnreadable(
                    shards_abort or "another data-parallel rank exceeded data.max_bad_shards"
                )
            if any_abort:
                raise DataErrorRateExceeded(
                    abort or "another data-parallel rank exceeded data.max_error_rate"
                )
            if most == 0:  # no stream on any rank has data: the epoch is over everywhere
                if not self.epoch_steps:  # an epoch without a single usable sample would repeat forever
                    raise DataUnreadable(self._nothing_usable())
                self.epoch += 1
                self.epoch_steps = 0
                if self.total != (self.config.streams or self.dp_size):  # resumed onto another layout
                    self._layout(self.config.streams or self.dp_size)
                for stream in self._streams:
                    stream.new_epoch()
                continue
            self.epoch_steps += 1
            filler = padding_batch(self.config.pad_to_multiple, self.pad_id)
            batches = [b for real in per_stream for b in real + [filler] * (g - len(real))]
            batches += [filler] * (g * (self.per_rank - len(per_stream)))
            if self.config.balance and self.dp_size > 1:
                batches = balance_step(batches, self.group, self.device)
            if self.peers is not None:
                check_peers(batches, self.peers, self.device, self.steps + 1)
            self.steps += 1
            yield Step(batches, self.epoch)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Valid between steps; plain Python (JSON-able): this rank's streams, by global number."""
        return {
            "epoch": self.epoch,
            "steps": self.steps,
            "epoch_steps": self.epoch_steps,
            "total_streams": self.total,
            "num_workers": self.config.num_workers,
            "streams": [
                {"index": s.index, "exhausted": s.exhausted, "loader": s.loader.state_dict()}
                for s in self._streams
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """This rank's own state, or `{"ranks": [every saved rank's state]}` (what the checkpoint gives
        a part with `gather_ranks`): the data position is global, so a run saved with any DP/SP layout
        continues with any other. The saved streams go on where they were, spread over the current ranks
        (the same micro-batches per step as before, so nothing is trained twice or skipped); from the next
        epoch the streams follow the current layout. Loader workers must stay as many per stream."""
        ranks = state.get("ranks", [state])
        saved: dict[int, dict] = {}
        for r in ranks:
            if "total_streams" not in r:
                raise DataResumeError(
                    "this data loader state predates layout-free resume: resume it with the layout that saved "
                    "it (same data-parallel size, data.streams and data.num_workers), or start a new run"
                )
            for st in r["streams"]:
                saved.setdefault(st["index"], st)  # SP peers saved the same streams
        first, total = ranks[0], ranks[0]["total_streams"]
        if sorted(saved) != list(range(total)) and "ranks" in state:
            raise DataResumeError(
                f"the checkpoint holds data streams {sorted(saved)} of {total}: some are missing"
            )
        live = [i for i, st in saved.items() if not st["exhausted"]]
        if live and first["num_workers"] != self.config.num_workers:
            raise DataResumeError(
                f"the data position was saved with data.num_workers={first['num_workers']} loader workers per "
                f"stream, this run has {self.config.num_workers}: resume with data.num_workers="
                f"{first['num_workers']} (the DP/SP layout may change), or change it at an epoch boundary"
            )
        if total != self.total:
            self._layout(total)
        self.epoch, self.steps = first["epoch"], first["steps"]
        self.epoch_steps = first.get("epoch_steps", self.steps)
        for stream in self._streams:
            st = saved.get(stream.index)
            if st is None:
                raise DataResumeError(f"data stream {stream.index} of {total} is not in the saved state")
            stream.exhausted = st["exhausted"]
            if not stream.exhausted:  # an ended stream restarts fresh at the next epoch
                stream.loader.load_state_dict(st["loader"])
