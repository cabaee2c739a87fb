"""The training configuration: pydantic sections that reject unknown keys, YAML + dotted overrides.

Everything is checked before any process starts: unknown keys (with the closest valid key), wrong
types, and impossible combinations (degrees that do not multiply to the world size, an SP degree
that does not divide the attention heads, a token budget that is not a multiple of sp, an unknown
encoder or foundation).

Each setting is declared once. The `data` and `parallel` sections are generated from the packages'
own config types (omni_data's DataConfig; omni_dist's ParallelDims degrees and ParallelizeConfig),
with their defaults; a field a package adds appears in the recipe by itself. Fields the trainer sets
from elsewhere (DERIVED) are left out. The `model` section is the omni model spec, parsed once by
omni_models.config.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from omni_data.config import DataConfig, DataConfigError
from omni_dist import ParallelDims
from omni_dist.parallel_dims import ParallelConfigError
from omni_dist.parallelize import ParallelizeConfig
from omni_models.config import ModelConfigError, OmniModelConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Package config fields the trainer sets itself, and the recipe key each comes from.
DERIVED = {
    "data": {"seed": "train.seed", "pad_to_multiple": "parallel.sp", "epochs": None},
    "parallel": {"world_size": None, "ep_token_bound": "data.max_tokens // parallel.sp"},
}


def _section(name: str, packages: tuple[type, ...], own: dict[str, Any]) -> type[_Section]:
    """A recipe section with the fields (types, defaults) of the packages' dataclasses, plus its own."""
    fields: dict[str, Any] = {}
    skip = DERIVED.get(name.lower().removesuffix("section"), {})
    for cls in packages:
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = Field(default_factory=f.default_factory)
            else:
                default = ...
            fields[f.name] = (hints[f.name], default)
    return create_model(name, __base__=_Section, **{**fields, **own})


DataSection = _section(
    "DataSection",
    (DataConfig,),
    {
        "sources": (list[dict[str, Any]], ...),  # each validated by omni_data's SourceConfig
        "tokenizer": (str | None, None),  # default: model.pretrained
        "eval_sources": (list[dict[str, Any]], []),
        "prepare": (str | None, None),  # a command that makes the data when it is missing
    },
)
ParallelSection = _section("ParallelSection", (ParallelDims, ParallelizeConfig), {})
_TRAINER_DATA_KEYS = {"tokenizer", "eval_sources", "prepare"}
_DIMS_KEYS = {f.name for f in dataclasses.fields(ParallelDims)} - DERIVED["parallel"].keys()
_PARALLELIZE_KEYS = {f.name for f in dataclasses.fields(ParallelizeConfig)}


class ProfileSection(_Section):
    """train.profile: a torch profiler trace and summary of optimizer steps [a, b) (omni_train.profiling)."""

    steps: tuple[int, int]  # 1-based step numbers as the trainer counts them: a inclusive, b exclusive
    dir: str | None = None  # default RUN_DIR/profile; a relative path is relative to the run dir

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= steps[0] < steps[1]:
            raise ValueError("[a, b] must satisfy 1 <= a < b (steps a..b-1 are profiled)")
        return steps


class TrainSection(_Section):
    steps: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    eval_every: int = Field(0, ge=0)  # 0: no evaluation
    eval_steps: int = Field(4, ge=0)  # eval steps per evaluation; 0: the whole eval set
    max_bad_steps: int = Field(5, ge=1)  # consecutive non-finite losses before the run stops
    # Positions whose logits the loss heads compute at once (recomputed in backward): memory
    # O(chunk x vocab), not O(labelled tokens x vocab); 0: all logits at once.
    loss_chunk: int = Field(4096, ge=0)
    profile: ProfileSection | None = None  # None: no profiling


class CheckpointSection(_Section):
    dir: str | None = None  # default RUN_DIR/checkpoints; a relative path is relative to the run dir
    interval: int = Field(0, ge=0)  # steps; 0: only at the end
    keep: int = Field(2, ge=1)
    async_save: bool = True
    resume: str = "auto"  # auto | none | a checkpoint directory
    save_final: bool = True  # save when training ends (benchmarks turn it off: no tens of GB written)


class LauncherSection(_Section):
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
    # modules that register parts from outside the repository, in every process (omni_train.plugins)
    plugins: list[str] = []
    model: dict[str, Any]
    data: DataSection
    parallel: ParallelSection = ParallelSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    launcher: LauncherSection = LauncherSection()
    logging: LoggingSection = LoggingSection()
    _model_spec: OmniModelConfig = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _tokenizer_of_pretrained(cls, data: Any) -> Any:
        """data.tokenizer defaults to the pretrained model's directory."""
        model, section = (data.get("model"), data.get("data")) if isinstance(data, dict) else (None, None)
        pretrained = isinstance(model, dict) and model.get("pretrained")
        if pretrained and isinstance(section, dict) and section.get("tokenizer") is None:
            return {**data, "data": {**section, "tokenizer": model["pretrained"]}}
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        try:
            self._model_spec = OmniModelConfig.from_dict(self.model)
        except (ModelConfigError, TypeError) as e:
            raise ValueError(f"model: {e}") from None
        p = self.parallel
        try:
            ParallelDims.check_degrees(**p.model_dump(include=_DIMS_KEYS))
            self.parallelize_config()
        except (ParallelConfigError, ValueError) as e:
            raise ValueError(f"parallel: {e}") from None
        if self.data.tokenizer is None:
            if self._model_spec.pretrained is None:
                raise ValueError(
                    "data.tokenizer is required (it defaults to model.pretrained when that is set)"
                )
            self.data.tokenizer = self._model_spec.pretrained.path
        self.data_config()
        if self.data.eval_sources:
            self.data_config(self.data.eval_sources, epochs=1)
        return self

    # -- each package's config, derived from the recipe ------------------------------------------
    @property
    def model_spec(self) -> OmniModelConfig:
        """The omni model spec (omni_models.config), parsed once."""
        return self._model_spec

    def dims(self, world_size: int | None = None) -> ParallelDims:
        degrees = self.parallel.model_dump(include=_DIMS_KEYS)
        return ParallelDims(world_size=world_size or self.launcher.num_workers, **degrees)

    def parallelize_config(self) -> ParallelizeConfig:
        # every rank's slice of a micro-batch holds at most this many tokens: the padded EP dispatch's size
        bound = self.data.max_tokens // self.parallel.sp
        return ParallelizeConfig(**self.parallel.model_dump(include=_PARALLELIZE_KEYS), ep_token_bound=bound)

    def data_config(
        self, sources: list[dict[str, Any]] | None = None, epochs: int | None = None
    ) -> DataConfig:
        """The loader's config: the training sources (or `sources`, e.g. the eval set), `epochs` passes."""
        fields = self.data.model_dump(exclude=_TRAINER_DATA_KEYS)
        if sources is not None:
            fields["sources"] = sources
        derived = {"seed": self.train.seed, "pad_to_multiple": self.parallel.sp, "epochs": epochs}
        try:
            return DataConfig.from_dict({**fields, **derived})
        except DataConfigError as e:
            message = str(e)
            for key, recipe_key in DERIVED["data"].items():
                if recipe_key:  # name the recipe key the user can change
                    message = re.sub(rf"\b(data\.)?{key}\b", recipe_key, message)
            raise ConfigError(message) from None

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir)

    @property
    def checkpoint_dir(self) -> Path:
        """checkpoint.dir, relative to the run dir unless absolute (default RUN_DIR/checkpoints)."""
        return checkpoint_dir(self, self.run_dir)


def checkpoint_dir(cfg: TrainConfig, run_dir: Path) -> Path:
    """Where a run's checkpoints are, for a run dir that may have moved since (inference, convert)."""
    return run_dir / (cfg.checkpoint.dir or "checkpoints")


# -- loading ---------------------------------------------------------------------------------------
def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys at a location (for 'did you mean')."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        # an optional section (`X | None`): its keys are X's
        current = next(
            (a for a in get_args(field.annotation) if hasattr(a, "model_fields")), field.annotation
        )
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
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            where = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(
                f"--set {key}: the value is not valid YAML ({where}); quote strings that hold braces or "
                "colons, e.g. [{kind: webdataset, paths: 'x-{0..3}.tar'}]"
            ) from None
        out.append((key.strip(), value))
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, data: Mapping[str, Any] | None = None
) -> TrainConfig:
    """A YAML file (or a mapping), then `key=value` overrides (values parsed as YAML); the plugins
    (omni_train.plugins) are loaded before it is validated."""
    if data is None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
    from omni_train.plugins import load_plugins

    tree = yaml.safe_load(yaml.safe_dump(dict(data)))  # a deep copy of plain data
    for key, value in parse_overrides(overrides or []):
        set_dotted(tree, key, value)
    load_plugins(tree.get("plugins", []))  # before validating: the model section names registered parts
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_explain(e)) from None


def check_layout(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Parallel degrees vs the world size and the model (heads for SP, experts for EP): ParallelDims'."""
    from omni_models.registry import FOUNDATIONS

    try:
        dims = cfg.dims(world_size)
        mc = cfg.model_spec
        hf = FOUNDATIONS[mc.foundation.name](**mc.foundation.config)
        dims.check_model(
            hf.num_attention_heads,
            getattr(hf, "num_key_value_heads", None),
            getattr(hf, "num_experts", None) or 0,  # a dense foundation has no experts
            ep_async=cfg.parallel.ep_async,
        )
    except ParallelConfigError as e:
        raise ConfigError(f"parallel: {e}") from None


def dump(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
