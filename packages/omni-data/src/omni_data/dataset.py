"""The per-worker stream: pieces -> weighted mix -> shuffle buffer -> packer -> collated micro-batches.

Each (rank, loader worker) pair is a slot, a reader; slot s of n reads its pieces of each source
(`omni_data.splits.plan_epoch`: the epoch's seeded shard order cut into n equal spans of records where
the source can be split, whole shards round robin where it cannot), so slots read disjoint data and,
where splitting is possible, about the same amount of it. All randomness is drawn from counters
(seed, epoch, slot, draw number), so the state is a handful of integers, each source's cursor (piece
number and the seekable position of the next record in it) and the restore keys (source, shard,
position, key) of the samples sitting in the shuffle and packing buffers; restoring it seeks to each
cursor's position, re-reads those samples (one seek each) and continues the identical stream.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from omni_data.collate import collate
from omni_data.config import DataConfig
from omni_data.errors import SHARD_REASONS, ErrorCounts
from omni_data.packing import take_batch
from omni_data.processor import Measured, Processor
from omni_data.schema import SampleError
from omni_data.sources import SOURCES, Record, Source
from omni_data.splits import Piece, Size, fingerprint, plan_epoch, probe, read_piece, seeded, splittable
from omni_dist.packed import PackedBatch

log = logging.getLogger("omni_data")

RestoreKey = tuple[int, str, int, str]  # source index, shard, position in shard, sample key
STATE_VERSION = 2  # 2: cursors are (piece, position); JSONL positions are byte offsets


def build_sources(config: DataConfig) -> list[Source]:
    out = []
    for i, s in enumerate(config.sources):
        if s.kind not in SOURCES:
            raise ValueError(f"unknown source kind {s.kind!r}; registered: {sorted(SOURCES)}")
        paths = s.paths if isinstance(s.paths, str) else list(s.paths)
        out.append(SOURCES[s.kind](s.name or f"{s.kind}{i}", paths, media_root=s.media_root))
    return out


def _rng(*parts: Any) -> random.Random:
    return seeded(*parts)


@dataclass
class WorkerItem:
    """What a worker hands the loader: a micro-batch (or none, at the end) and its bad-data counts."""

    slot: int
    batch: PackedBatch | None
    errors: dict
    dropped: int  # over-budget samples dropped
    truncated: int
    abort: str | None = None

    def pin_memory(self) -> WorkerItem:
        """The batch in page-locked memory (torch's DataLoader pins with pin_memory=True), so its copy to
        the GPU is asynchronous."""
        return self if self.batch is None else dataclasses.replace(self, batch=self.batch.pin_memory())


@dataclass
class _Cursor:
    """One source's pieces for this reader, and how far into them it is."""

    pieces: list[Piece]
    seekable: bool  # the source reads from a position (else a resume skips `consumed` records)
    piece_pos: int = 0
    position: int | None = None  # the next record's position in pieces[piece_pos]; None: its start
    consumed: int = 0  # records taken from pieces[piece_pos]
    done: bool = False
    _reader: Iterator[Record] | None = field(default=None, repr=False)

    def next(self, source: Source) -> Record | None:
        while not self.done:
            if self.piece_pos >= len(self.pieces):
                self.done = True
                return None
            if self._reader is None:
                self._reader = read_piece(source, self.pieces[self.piece_pos], self.position)
                if self.position is None:  # a source that cannot seek: skip what was consumed
                    for _ in range(self.consumed):
                        next(self._reader, None)
            rec = next(self._reader, None)
            if rec is None:
                self._next_piece()
                continue
            self.consumed += 1
            if self.seekable and rec.end is not None:
                self.position = rec.end
            if rec.error is not None and rec.error.reason in SHARD_REASONS:
                self._next_piece()  # nothing follows it: a resume must not read (and count) it again
            return rec
        return None

    def _next_piece(self) -> None:
        close = getattr(self._reader, "close", None)
        if close is not None:
            close()
        self._reader, self.position, self.consumed = None, None, 0
        self.piece_pos += 1

    def state(self) -> list:
        return [self.piece_pos, self.position, self.consumed, self.done]

    def restore(self, st: list) -> None:
        self.piece_pos, self.position, self.consumed, self.done = st


@dataclass
class _Candidate:
    measured: Measured
    key: RestoreKey

    @property
    def llm_tokens(self) -> int:
        return self.measured.llm_tokens

    @property
    def encoder_units(self) -> int:
        return self.measured.encoder_units

    @property
    def media_items(self) -> int:
        return self.measured.media_items


class _WorkerStream:
    def __init__(self, ds: StreamingDataset, slot: int, nslots: int, epoch: int, state: dict | None):
        self.ds, self.cfg, self.slot, self.nslots, self.epoch = ds, ds.config, slot, nslots, epoch
        self.cursors = [
            _Cursor(pieces[slot], splittable(src))
            for src, pieces in zip(ds.sources, ds.plan(epoch, nslots), strict=True)
        ]
        self.draws = 0
        self.shuffle_draws = 0
        self.shuffle: list[tuple[Record, RestoreKey]] = []
        self.pack: list[_Candidate] = []
        self.errors = ErrorCounts()
        self.dropped = 0
        self.truncated = 0
        self.done = False
        if state is not None:
            self._restore(state)

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "slot": self.slot,
            "nslots": self.nslots,
            "sources": self.ds.fingerprints(self.nslots),  # what the pieces were planned from
            "draws": self.draws,
            "shuffle_draws": self.shuffle_draws,
            "cursors": [c.state() for c in self.cursors],
            "shuffle": [list(k) for _, k in self.shuffle],
            "pack": [list(c.key) for c in self.pack],
            "errors": self.errors.state(),
            "dropped": self.dropped,
            "truncated": self.truncated,
            "done": self.done,
        }

    def _restore(self, st: dict) -> None:
        if st.get("version") != STATE_VERSION:
            raise RuntimeError(
                f"data loader state version {st.get('version', 1)} cannot be restored by this loader "
                f"(version {STATE_VERSION}: reader positions are seekable offsets, JSONL lines by byte "
                "offset): resume with the omni-data version that saved it, or start a new run"
            )
        if (st["slot"], st["nslots"]) != (self.slot, self.nslots):
            raise RuntimeError(
                f"data loader state is for slot {st['slot']} of {st['nslots']} (rank x worker), this is slot "
                f"{self.slot} of {self.nslots}: exact resume needs the same DP size and num_workers"
            )
        for src, saved, now in zip(
            self.ds.sources, st["sources"], self.ds.fingerprints(self.nslots), strict=True
        ):
            if saved != now:
                raise RuntimeError(
                    f"data source {src.name!r} changed since the save (its shard list or shard sizes "
                    "differ), so the saved read positions are meaningless: restore the files or start a new run"
                )
        self.draws, self.shuffle_draws = st["draws"], st["shuffle_draws"]
        for c, cst in zip(self.cursors, st["cursors"], strict=True):
            c.restore(cst)
        self.errors = ErrorCounts.from_state(st["errors"])
        self.dropped, self.truncated, self.done = st["dropped"], st["truncated"], st["done"]
        keys = [tuple(k) for k in st["shuffle"]] + [tuple(k) for k in st["pack"]]
        found = self._fetch(keys)
        self.shuffle = [(found[tuple(k)], tuple(k)) for k in st["shuffle"]]
        for k in st["pack"]:
            rec = found[tuple(k)]
            measured = self._admit(self.ds.processor.measure(rec.sample))
            if measured is None:
                raise RuntimeError(f"restored sample {k} no longer fits the budget: the config changed")
            self.pack.append(_Candidate(measured, tuple(k)))

    def _fetch(self, keys: list[RestoreKey]) -> dict[RestoreKey, Record]:
        """Re-read buffered samples by restore key: one seek per run of adjacent positions (a pass
        over the shard for a source that cannot seek)."""
        by_shard: dict[tuple[int, str], dict[int, str]] = {}
        for src, shard, index, key in keys:
            by_shard.setdefault((src, shard), {})[index] = key
        found: dict[RestoreKey, Record] = {}
        for (src, shard), wanted in by_shard.items():
            source = self.ds.sources[src]
            records = _seek_each(source, shard, sorted(wanted)) if splittable(source) else source.read(shard)
            for rec in records:
                if rec.index in wanted and rec.sample is not None and rec.key == wanted[rec.index]:
                    found[(src, shard, rec.index, rec.key)] = rec
        missing = [k for k in keys if k not in found]
        if missing:
            raise RuntimeError(
                f"cannot restore buffered samples {missing[:3]}: their shards changed since the save"
            )
        return found

    # -- stream --------------------------------------------------------------------------------
    def _next_record(self) -> tuple[Record, RestoreKey] | None:
        """Weighted mix over sources that still have data in this epoch."""
        while True:
            active = [i for i, c in enumerate(self.cursors) if not c.done]
            if not active:
                return None
            weights = [self.cfg.sources[i].weight for i in active]
            i = _rng(self.cfg.seed, self.epoch, self.slot, "mix", self.draws).choices(active, weights)[0]
            self.draws += 1
            cur = self.cursors[i]
            rec = cur.next(self.ds.sources[i])
            if rec is not None:
                return rec, (i, rec.shard, rec.index, rec.key)

    def _shuffled(self) -> tuple[Record, RestoreKey] | None:
        size = self.cfg.shuffle_buffer
        if size == 0:
            return self._next_record()
        while len(self.shuffle) < size:
            nxt = self._next_record()
            if nxt is None:
                break
            self.shuffle.append(nxt)
        if not self.shuffle:
            return None
        j = _rng(self.cfg.seed, self.epoch, self.slot, "shuffle", self.shuffle_draws).randrange(
            len(self.shuffle)
        )
        self.shuffle_draws += 1
        return self.shuffle.pop(j)

    def _admit(self, m: Measured) -> Measured | None:
        budget = self.cfg.budget
        why = budget.over(m)
        if why is None:
            return m
        if self.cfg.overlong == "truncate":
            cut = m.truncate(budget.max_tokens)
            return cut if budget.over(cut) is None else None
        return None

    def _skip(self, rec: Record, err: SampleError) -> None:
        self.errors.record_bad(err.reason, rec.shard, rec.key, err.detail)

    def _fill(self) -> str | None:
        """Top the packing buffer up; returns an abort message if the error rate is exceeded."""
        while len(self.pack) < self.cfg.pack_buffer:
            nxt = self._shuffled()
            if nxt is None:
                return None
            rec, key = nxt
            if rec.error is not None and rec.error.reason in SHARD_REASONS:  # a bad shard, not a sample
                self.errors.record_bad(rec.error.reason, rec.shard, rec.key, rec.error.detail)
                continue
            self.errors.seen += 1
            if rec.error is not None:
                self._skip(rec, rec.error)
            else:
                try:
                    measured = self.ds.processor.measure(rec.sample)
                except SampleError as e:
                    self._skip(rec, e)
                else:
                    admitted = self._admit(measured)
                    if admitted is None:
                        self.dropped += 1
                        log.info(
                            "dropping over-budget sample %r (shard %s): %s",
                            rec.key,
                            rec.shard,
                            self.cfg.budget.over(measured),
                        )
                    else:
                        self.truncated += admitted is not measured
                        self.pack.append(_Candidate(admitted, key))
            abort = self.errors.check(self.cfg.max_error_rate, self.cfg.error_min_samples)
            if abort:
                return abort
        return None

    def _item(self, batch: PackedBatch | None, abort: str | None = None) -> WorkerItem:
        return WorkerItem(self.slot, batch, self.errors.state(), self.dropped, self.truncated, abort)

    def run(self) -> Iterator[WorkerItem]:
        while not self.done:
            abort = self._fill()
            if abort:
                yield self._item(None, abort)
                return
            if not self.pack:
                self.done = True
                yield self._item(None)  # final counts for this epoch
                return
            processed = []
            for c in take_batch(self.pack, self.cfg.budget):
                try:
                    processed.append(self.ds.processor.process(c.measured))
                except SampleError as e:
                    self.errors.record_bad(e.reason, c.key[1], c.key[3], e.detail)
            if processed:
                yield self._item(collate(processed, self.cfg.pad_to_multiple, self.ds.pad_id))


def _seek_each(source: Source, shard: str, positions: list[int]) -> Iterator[Record]:
    """The records at `positions` (sorted) of a splittable source: a new seek only across a gap."""
    reader: Iterator[Record] | None = None
    following: int | None = None
    for pos in positions:
        if reader is None or pos != following:
            reader = iter(source.read(shard, pos))
        rec = next(reader, None)
        if rec is None:
            reader = None
            continue
        following = rec.end
        yield rec


class StreamingDataset(IterableDataset):
    """One rank's share of the data; each loader worker runs its own slot of it."""

    def __init__(
        self, config: DataConfig, processor: Processor, *, dp_rank: int, dp_size: int, pad_id: int = 0
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside dp_size {dp_size}")
        self.config = config
        self.processor = processor
        self.dp_rank, self.dp_size, self.pad_id = dp_rank, dp_size, pad_id
        self.sources = build_sources(config)
        self._shards = [src.shards() for src in self.sources]
        self._sizes: dict[int, list[list[Size]]] = {}
        self._fingerprints: dict[int, list[str]] = {}
        self.epoch = 0
        self._pending: dict | None = None
        self._live: _WorkerStream | None = None
        readers = dp_size * max(1, config.num_workers)
        # Sized here, in the rank's process: loader workers inherit the sizes with the dataset.
        plans, sizes = self.plan(0, readers), self.sizes(readers)
        for src, shards, pieces, sz in zip(self.sources, self._shards, plans, sizes, strict=True):
            if empty := sum(not p for p in pieces):
                log.warning(
                    "source %s gives no data to %d of %d readers (dp ranks x workers): %d shards, %d of "
                    "them read whole (a source kind without size(), or unreadable)",
                    src.name,
                    empty,
                    readers,
                    len(shards),
                    sum(n is None for n in sz),
                )

    def sizes(self, readers: int) -> list[list[Size]]:
        """Per source, its shards' sizes as split among `readers` (None: read whole); probed once."""
        if readers not in self._sizes:
            self._sizes[readers] = [
                probe(src, shards, readers) for src, shards in zip(self.sources, self._shards, strict=True)
            ]
        return self._sizes[readers]

    def fingerprints(self, readers: int) -> list[str]:
        """Per source, a digest of the shards and sizes its pieces are planned from (saved in state)."""
        if readers not in self._fingerprints:
            self._fingerprints[readers] = [
                fingerprint(sh, sz) for sh, sz in zip(self._shards, self.sizes(readers), strict=True)
            ]
        return self._fingerprints[readers]

    def plan(self, epoch: int, readers: int) -> list[list[list[Piece]]]:
        """Per source, each reader's pieces in `epoch`."""
        return [
            plan_epoch(
                shards,
                sizes,
                readers,
                seed=self.config.seed,
                epoch=epoch,
                source_index=i,
                shuffle=self.config.shuffle_shards,
            )
            for i, (shards, sizes) in enumerate(zip(self._shards, self.sizes(readers), strict=True))
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[WorkerItem]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        state, self._pending = self._pending, None
        epoch = state["epoch"] if state is not None else self.epoch
        self._live = _WorkerStream(self, self.dp_rank * nw + wid, self.dp_size * nw, epoch, state)
        yield from self._live.run()

    # torchdata's StatefulDataLoader calls these inside each worker (or in-process without workers).
    def state_dict(self) -> dict:
        if self._live is None:
            return self._pending or {}
        return self._live.state()

    def load_state_dict(self, state: dict) -> None:
        self._pending = state or None
