"""ParallelPlan: which parts of a model get which parallel treatment, as data.

A model family ships its plan next to its definition; `parallelize` applies it from outside, so model
code never changes. Module patterns match either a class name exactly (`Qwen2DecoderLayer`) or a
glob over the module's qualified name (`model.layers.*`, `visual.blocks.*`); parameter patterns are
globs over parameter names. A pattern that matches nothing is an error, because a typo in a plan would
otherwise silently train an unsharded model.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Any

from torch import nn


class PlanError(ValueError):
    """A plan that does not fit the model it is applied to."""


@dataclass(frozen=True)
class ParallelPlan:
    """Parallel treatment of one model family (all fields are patterns; see the module docstring).

    fsdp_units:     modules that become FSDP units (typically the transformer blocks); the root is
                    always a unit too.
    expert_params:  parameter glob -> placement for expert parallelism; "shard0" splits the expert
                    dimension (dim 0) over the EP group, e.g. {"*.mlp.experts.*": "shard0"}.
    experts:        modules holding the experts (each becomes its own FSDP unit on the EP-FSDP mesh).
    expert_forward: name of the EP forward (omni_dist.expert_parallel.EXPERT_FORWARDS) that replaces
                    the experts' forward under ep > 1; the router stays the model's own.
    recompute:      modules whose activations are recomputed in backward (when recompute is enabled).
    offload:        modules whose saved activations go to CPU (when activation offload is enabled).
    fp32_modules:   modules that keep fp32 parameters and compute under a lower-precision policy
                    (norms, routers); each becomes its own FSDP unit.
    kernels:        module pattern -> kernel name ("rms_norm", "swiglu", "rope"): the modules a kernel
                    set (omni_models.kernels) replaces when the run selects one.
    compile:        the repeated blocks (decoder layers, vision blocks, encoder layers) that
                    torch.compile compiles one by one when the run asks for it (omni_dist.compile).
    """

    fsdp_units: tuple[str, ...] = ()
    expert_params: Mapping[str, str] = field(default_factory=dict, hash=False)
    recompute: tuple[str, ...] = ()
    offload: tuple[str, ...] = ()
    fp32_modules: tuple[str, ...] = ()
    experts: tuple[str, ...] = ()
    expert_forward: str = ""
    kernels: Mapping[str, str] = field(default_factory=dict, hash=False)
    compile: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("fsdp_units", "recompute", "offload", "fp32_modules", "experts", "compile"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise PlanError(f"ParallelPlan.{name} must be a list of patterns, got the string {value!r}.")
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "expert_params", MappingProxyType(dict(self.expert_params)))
        object.__setattr__(self, "kernels", MappingProxyType(dict(self.kernels)))
        bad = {k: v for k, v in self.expert_params.items() if v != "shard0"}
        if bad:
            raise PlanError(
                f"plan.expert_params placements must be 'shard0' (the expert dimension), got {bad}."
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParallelPlan:
        """Build from plain data (YAML), rejecting unknown keys with the closest valid one."""
        valid = [f.name for f in fields(cls)]
        for key in data:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(valid)}."
                raise PlanError(f"unknown ParallelPlan key {key!r}.{hint}")
        return cls(**data)

    def match_modules(self, model: nn.Module, attr: str) -> list[tuple[str, nn.Module]]:
        """(qualified name, module) for every module matched by the patterns in `attr`, in model order.

        Raises PlanError when a pattern matches no module, or two patterns match the same module.
        """
        return [(fqn, m) for fqn, m, _ in _match(model, getattr(self, attr), f"plan.{attr}")]

    def match_kernels(self, model: nn.Module) -> list[tuple[str, nn.Module, str]]:
        """(qualified name, module, kernel name) for every module a `kernels` pattern matches."""
        return [(f, m, self.kernels[p]) for f, m, p in _match(model, tuple(self.kernels), "plan.kernels")]

    def match_expert_params(self, model: nn.Module) -> dict[str, str]:
        """Parameter name -> placement for the expert-sharded parameters; every glob must match."""
        names = [n for n, _ in model.named_parameters()]
        out: dict[str, str] = {}
        for pattern, placement in self.expert_params.items():
            matched = [n for n in names if fnmatchcase(n, pattern)]
            if not matched:
                raise PlanError(
                    f"plan.expert_params pattern {pattern!r} matches no parameter of {type(model).__name__}."
                    + _closest(pattern, names)
                )
            out.update(dict.fromkeys(matched, placement))
        return out


def compose_plans(
    model: nn.Module, parts: Mapping[str, ParallelPlan], part_units: bool = True
) -> ParallelPlan:
    """One plan for a composite model from the plans of its parts (submodule path -> plan).

    Each part's patterns are resolved against that part alone and become exact qualified names, so
    two parts built from the same classes keep their own treatment. With `part_units`, every part's
    root is an FSDP unit too (its leftover parameters, e.g. embeddings or a patch merger, are then
    gathered with that part instead of with the whole model's root).
    """
    out: dict[str, list[str]] = {
        f: [] for f in ("fsdp_units", "recompute", "offload", "fp32_modules", "experts", "compile")
    }
    expert_params: dict[str, str] = {}
    kernels: dict[str, str] = {}
    forwards = {p.expert_forward for p in parts.values() if p.expert_forward}
    if len(forwards) > 1:
        raise PlanError(
            f"parts ask for different expert forwards {sorted(forwards)}; one model, one EP forward."
        )
    for prefix, plan in parts.items():
        sub = model.get_submodule(prefix)
        for attr in out:
            out[attr] += [f"{prefix}.{fqn}" for fqn, _ in plan.match_modules(sub, attr)]
        expert_params.update({f"{prefix}.{n}": p for n, p in plan.match_expert_params(sub).items()})
        kernels.update({f"{prefix}.{fqn}": k for fqn, _, k in plan.match_kernels(sub)})
        if part_units:
            out["fsdp_units"].append(prefix)
    forward = forwards.pop() if forwards else ""
    return ParallelPlan(expert_params=expert_params, expert_forward=forward, kernels=kernels, **out)


def _match(model: nn.Module, patterns: tuple[str, ...], where: str) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, module, its pattern) per matched module, in model order; see match_modules."""
    named = [(fqn, m) for fqn, m in model.named_modules() if fqn]
    hits: dict[str, str] = {}
    for pattern in patterns:
        matched = [fqn for fqn, m in named if type(m).__name__ == pattern or fnmatchcase(fqn, pattern)]
        if not matched:
            raise PlanError(
                f"{where} pattern {pattern!r} matches no module of {type(model).__name__}."
                + _closest(pattern, [f for f, _ in named] + sorted({type(m).__name__ for _, m in named}))
            )
        for fqn in matched:
            if fqn in hits:
                raise PlanError(
                    f"{where}: module {fqn!r} is matched by both {hits[fqn]!r} and {pattern!r}; "
                    "each module may be listed once."
                )
            hits[fqn] = pattern
    return [(fqn, m, hits[fqn]) for fqn, m in named if fqn in hits]


def _closest(pattern: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(pattern, candidates, n=3, cutoff=0.5)
    return f" Closest: {', '.join(close)}." if close else ""
