"""The training configuration: pydantic sections that reject unknown keys, YAML + dotted overrides.

Everything is checked before any process starts: unknown keys (with the closest valid key), wrong
types, and impossible combinations (degrees that do not multiply to the world size, an SP degree
that does not divide the attention heads, a token budget that is not a multiple of sp, an unknown
encoder or foundation). The `model` section is the omni model spec (omni_models.config) and the
`data` section the loader's (omni_data.config); both are validated by their own packages.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParallelSection(_Section):
    dp_replicate: int = Field(1, ge=1)
    dp_shard: int = -1  # -1: inferred from the world size
    sp: int = Field(1, ge=1)
    sp_async: int = Field(1, ge=1)  # >1: Ulysses all-to-alls overlapped in this many head chunks
    ep: int = Field(1, ge=1)
    ep_async: int = Field(1, ge=1)  # >1: EP token dispatch in this many chunks overlapping expert compute
    expert_compute: Literal["auto", "loop", "grouped_mm"] = "auto"  # local experts under EP
    recompute: Literal["none", "full", "selective"] = "none"
    offload_params: bool = False
    offload_activations: bool = False
    param_dtype: str = "float32"
    reduce_dtype: str = "float32"
    reshard_after_forward: bool = True


class TrainSection(_Section):
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    micro_batches_per_step: int = Field(1, ge=1)  # gradient accumulation
    seed: int = 0
    eval_every: int = Field(0, ge=0)  # 0: no evaluation
    eval_steps: int = Field(4, ge=1)
    max_bad_steps: int = Field(5, ge=1)  # consecutive non-finite losses before the run stops


class DataSection(_Section):
    tokenizer: str
    sources: list[dict[str, Any]]
    max_tokens: int = Field(4096, ge=1)
    max_encoder_units: int | None = None
    max_media_items: int | None = None
    num_workers: int = Field(1, ge=0)
    shuffle_buffer: int = Field(256, ge=0)
    pack_buffer: int = Field(64, ge=1)
    overlong: Literal["truncate", "drop"] = "truncate"
    max_error_rate: float = Field(0.01, ge=0, le=1)
    balance: bool = False
    streams: int | None = None
    eval_sources: list[dict[str, Any]] = []
    prepare: str | None = None  # a command that makes the data when it is missing (e.g. the quickstart's)


class CheckpointSection(_Section):
    dir: str | None = None  # default: RUN_DIR/checkpoints
    interval: int = Field(0, ge=0)  # steps; 0: only at the end
    keep: int = Field(2, ge=1)
    async_save: bool = True
    resume: str = "auto"  # auto | none | a checkpoint directory


class LauncherSection(_Section):
    backend: Literal["local", "ray"] = "local"
    num_workers: int = Field(1, ge=1)  # processes (ranks)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_failures: int = Field(0, ge=0)
    address: str | None = None  # Ray cluster; None: RAY_ADDRESS or an embedded local one
    placement: Literal["PACK", "STRICT_PACK", "SPREAD"] = "PACK"
    heartbeat_timeout_s: float = Field(600.0, gt=0)  # no progress from a worker for this long = hung
    timeout_s: float = Field(1800.0, gt=0)


class LoggingSection(_Section):
    run_dir: str = "runs/default"
    tensorboard: bool = True
    log_every: int = Field(1, ge=1)
    console: Literal["progress", "lines", "none"] = (
        "progress"  # a progress bar, one JSON line per record, or quiet
    )
    sample_ids: bool = False  # log each step's sample ids per data-parallel rank (RUN_DIR/samples/)


class TrainConfig(_Section):
    model: dict[str, Any]
    data: DataSection
    parallel: ParallelSection = ParallelSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    launcher: LauncherSection = LauncherSection()
    logging: LoggingSection = LoggingSection()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        from omni_models.config import ModelConfigError, OmniModelConfig

        try:
            OmniModelConfig.from_dict(self.model)
        except (ModelConfigError, TypeError) as e:
            raise ValueError(f"model: {e}") from None
        if self.data.max_tokens % self.parallel.sp:
            raise ValueError(
                f"data.max_tokens ({self.data.max_tokens}) must be a multiple of parallel.sp ({self.parallel.sp})"
            )
        return self

    # -- derived ---------------------------------------------------------------------------------
    def dims(self, world_size: int | None = None):
        from omni_dist import ParallelDims

        p = self.parallel
        return ParallelDims(
            world_size=world_size or self.launcher.num_workers,
            dp_replicate=p.dp_replicate,
            dp_shard=p.dp_shard,
            sp=p.sp,
            ep=p.ep,
        )

    def omni_model(self):
        from omni_models.config import OmniModelConfig

        return OmniModelConfig.from_dict(self.model)

    def data_config(self, sources: list[dict[str, Any]] | None = None, epochs: int | None = None):
        from omni_data.config import DataConfig

        d = self.data
        return DataConfig.from_dict(
            {
                "sources": sources if sources is not None else d.sources,
                "max_tokens": d.max_tokens,
                "max_encoder_units": d.max_encoder_units,
                "max_media_items": d.max_media_items,
                "micro_batches_per_step": self.train.micro_batches_per_step,
                "num_workers": d.num_workers,
                "seed": self.train.seed,
                "shuffle_buffer": d.shuffle_buffer,
                "pack_buffer": d.pack_buffer,
                "overlong": d.overlong,
                "max_error_rate": d.max_error_rate,
                "pad_to_multiple": self.parallel.sp,
                "balance": d.balance,
                "streams": d.streams,
                "epochs": epochs,
            }
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"


# -- loading ---------------------------------------------------------------------------------------
def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at a location (for 'did you mean')."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return list(getattr(current, "model_fields", {}))


def _explain(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = tuple(str(x) for x in err["loc"])
        key = ".".join(loc) or "config"
        if err["type"] == "extra_forbidden":
            valid = _fields_at(TrainConfig, loc)
            close = difflib.get_close_matches(loc[-1], valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"unknown key {key}{hint}; valid keys: {', '.join(valid)}")
        elif err["type"] == "missing":
            lines.append(f"missing key {key}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {err.get('input')!r})" if loc else msg)
    return "; ".join(lines)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, data: Mapping[str, Any] | None = None
) -> TrainConfig:
    """A YAML file (or a mapping), then `key=value` overrides (values parsed as YAML)."""
    if data is None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
    tree = yaml.safe_load(yaml.safe_dump(dict(data)))  # a deep copy of plain data
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def check_layout(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Parallel degrees vs the world size and the model (heads for SP, experts for EP)."""
    from omni_dist.parallel_dims import ParallelConfigError, check_sp_heads
    from omni_models.registry import FOUNDATIONS

    try:
        cfg.dims(world_size)
        mc = cfg.omni_model()
        hf = FOUNDATIONS[mc.foundation.name](**mc.foundation.config)
        check_sp_heads(cfg.parallel.sp, hf.num_attention_heads, getattr(hf, "num_key_value_heads", None))
        experts = getattr(hf, "num_experts", None)
        if cfg.parallel.ep > 1 and (not experts or experts % cfg.parallel.ep):
            raise ParallelConfigError(
                f"parallel.ep={cfg.parallel.ep} must divide the foundation's experts ({experts})"
            )
        if cfg.parallel.ep == 1 and cfg.parallel.ep_async > 1:
            raise ParallelConfigError(
                f"parallel.ep_async={cfg.parallel.ep_async} overlaps the EP dispatch, but parallel.ep=1"
            )
    except ParallelConfigError as e:
        raise ConfigError(f"parallel: {e}") from None


def dump(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
