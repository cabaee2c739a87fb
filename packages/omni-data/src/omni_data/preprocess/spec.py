"""The preprocessing spec (YAML): inputs, output, shard size, processor, Ray resources.

    inputs:
      - {kind: jsonl, paths: raw/qa-*.jsonl, source: qa, media_root: raw/}   # sample documents
      - {kind: parquet, paths: raw/docs.parquet, source: docs}               # `json` (+ `media`) columns
      - {kind: folder, paths: raw/photos, source: photos, prompt: "Describe the image."}
    output: shards/
    shard_samples: 1000          # at most this many samples per shard
    shard_bytes: 256000000       # and about this many bytes (estimated from the inputs)
    processor: {factory: "omni_train.assembly:preprocessing_processor", options: {model: recipe.yaml, tokenizer: tok/}}
    ray: {address: null, num_cpus: null, cpus_per_task: 1, memory_per_task: null}

`processor` is optional: it names a callable by import path that returns an omni_data Processor; with it
the job probes every media item, records token counts in each sample's meta and in the index, and
rejects samples the training-time processor would reject.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omni_dist.strict import strict_fields


class SpecError(ValueError):
    """A preprocessing spec that cannot run; the message names the key."""


def _strict(cls: type, d: Any, where: str) -> dict[str, Any]:
    return strict_fields(cls, d, where, SpecError)


@dataclass(frozen=True)
class InputSpec:
    kind: str  # jsonl | parquet | folder
    paths: str | tuple[str, ...]
    source: str
    media_root: str | None = None
    prompt: str = "Describe this."  # folder inputs: the user turn before each media file

    def __post_init__(self) -> None:
        if self.kind not in ("jsonl", "parquet", "folder"):
            raise SpecError(f"input kind must be jsonl, parquet or folder, got {self.kind!r}")
        if not self.source or any(c in self.source for c in "./ "):
            raise SpecError(
                f"input source {self.source!r} must be a non-empty name without '.', '/' or spaces"
            )


@dataclass(frozen=True)
class ProcessorSpec:
    factory: str  # "package.module:callable"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RaySpec:
    address: str | None = None  # None: RAY_ADDRESS if set, else an embedded local cluster
    num_cpus: int | None = None  # for the embedded cluster
    cpus_per_task: float = 1.0
    memory_per_task: int | None = None  # bytes


@dataclass(frozen=True)
class PreprocessSpec:
    inputs: tuple[InputSpec, ...]
    output: str
    shard_samples: int = 1000
    shard_bytes: int | None = None
    processor: ProcessorSpec | None = None
    ray: RaySpec = field(default_factory=RaySpec)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise SpecError("inputs is empty")
        if self.shard_samples < 1 or (self.shard_bytes is not None and self.shard_bytes < 1):
            raise SpecError("shard_samples and shard_bytes must be >= 1")
        sources = [i.source for i in self.inputs]
        if len(set(sources)) != len(sources):
            raise SpecError(f"input sources must be unique, got {sources}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        d = _strict(cls, d, "spec")
        if "inputs" not in d or "output" not in d:
            raise SpecError("the spec needs 'inputs' and 'output'")
        inputs = []
        for i, x in enumerate(d["inputs"]):
            x = _strict(InputSpec, x, f"inputs[{i}]")
            paths = x.get("paths")
            inputs.append(
                InputSpec(**{**x, "paths": paths if isinstance(paths, str) else tuple(paths or ())})
            )
        processor = (
            ProcessorSpec(**_strict(ProcessorSpec, d["processor"], "processor"))
            if d.get("processor")
            else None
        )
        ray = RaySpec(**_strict(RaySpec, d.get("ray") or {}, "ray"))
        return cls(**{**d, "inputs": tuple(inputs), "processor": processor, "ray": ray})

    @classmethod
    def from_yaml(cls, path: str) -> PreprocessSpec:
        import yaml

        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f) or {})
