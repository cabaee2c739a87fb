"""Typed data configuration (plain dataclasses: omni-data stays free of pydantic; unknown keys fail).

A training recipe's `data` section takes DataConfig's fields as they are (omni_train.config), so a new
field and its default are declared here only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from omni_data.packing import Budget
from omni_dist.strict import strict_fields


class DataConfigError(ValueError):
    """A data config that cannot work; the message names the key."""


@dataclass(frozen=True)
class SourceConfig:
    kind: str  # a registered source kind: webdataset, parquet, jsonl
    paths: str | tuple[str, ...]
    name: str | None = None
    weight: float = 1.0
    media_root: str | None = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise DataConfigError(f"source weight must be > 0, got {self.weight}")


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[SourceConfig, ...]
    max_tokens: int  # LLM tokens per micro-batch
    max_encoder_units: int | None = None
    max_media_items: int | None = None
    micro_batches_per_step: int = 1
    num_workers: int = 0  # loader processes per rank (0: read in the training process)
    # How the rank starts them: "fork" (PyTorch's Linux default) starts one in milliseconds, and each epoch
    # and evaluation starts new ones; "spawn" / "forkserver" for readers that are not fork-safe (a
    # spawned worker imports torch and the processors again, seconds each)
    worker_start: Literal["fork", "forkserver", "spawn"] = "fork"
    seed: int = 0
    shuffle_shards: bool = True
    shuffle_buffer: int = 0  # samples; 0 keeps shard order
    pack_buffer: int = 64  # candidates the packer chooses from
    overlong: Literal["truncate", "drop"] = "truncate"  # samples over the token budget
    max_error_rate: float = 0.01
    max_bad_shards: float = 0.1  # fraction of a source's shards that may be missing or unreadable
    error_min_samples: int = 200  # the rate is judged only after this many records
    pad_to_multiple: int = 1  # the SP degree: every micro-batch's length is a multiple of it
    balance: bool = False  # redistribute micro-batches across DP ranks by cost each step
    streams: int | None = None  # data streams (default: the DP size); a multiple of it
    epochs: int | None = None  # None: until the trainer stops

    def __post_init__(self) -> None:
        if not self.sources:
            raise DataConfigError("data.sources is empty")
        if self.worker_start not in ("fork", "forkserver", "spawn"):
            raise DataConfigError(
                f"data.worker_start must be 'fork', 'forkserver' or 'spawn', got {self.worker_start!r}"
            )
        if self.overlong not in ("truncate", "drop"):
            raise DataConfigError(f"data.overlong must be 'truncate' or 'drop', got {self.overlong!r}")
        for name in ("micro_batches_per_step", "pack_buffer", "pad_to_multiple"):
            if getattr(self, name) < 1:
                raise DataConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise DataConfigError("data.num_workers and data.shuffle_buffer must be >= 0")
        for name in ("max_error_rate", "max_bad_shards"):
            if not 0 <= getattr(self, name) <= 1:
                raise DataConfigError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_tokens % self.pad_to_multiple:
            raise DataConfigError(
                f"data.max_tokens ({self.max_tokens}) must be a multiple of pad_to_multiple "
                f"({self.pad_to_multiple}) so a padded micro-batch stays within the budget"
            )
        Budget(self.max_tokens, self.max_encoder_units, self.max_media_items)  # validates the numbers

    @property
    def budget(self) -> Budget:
        return Budget(self.max_tokens, self.max_encoder_units, self.max_media_items)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        d = strict_fields(cls, d, "data", DataConfigError)
        if "sources" not in d or "max_tokens" not in d:
            raise DataConfigError("data needs 'sources' and 'max_tokens'")
        sources = []
        for i, s in enumerate(d["sources"]):
            s = strict_fields(SourceConfig, s, f"data.sources[{i}]", DataConfigError)
            paths = s.get("paths")
            sources.append(SourceConfig(**{**s, "paths": paths if isinstance(paths, str) else tuple(paths)}))
        return cls(**{**d, "sources": tuple(sources)})
