"""Materialise a (meta-device, possibly sharded) model and give it deterministic initial weights.

`init_weights_` initialises one module at a time on full-size temporary tensors, seeded from the
module's qualified name, and keeps only the local shard. The result is independent of world size,
layout and traversal order: every rank, and a single unsharded process, produce the same full
weights. Only one module's full tensors exist at a time, never the whole model.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


class WeightInitError(RuntimeError):
    """A tensor was left uninitialised, or the model is still on the meta device."""


def materialize_(model: nn.Module, device: torch.device | str, offload_params: bool = False) -> None:
    """Allocate storage for a meta-device model (local shards only, after parallelize).

    Values are garbage until `init_weights_` or a checkpoint load fills them. With FSDP parameter
    offload the shards live on CPU. Tied parameters (one Parameter under several modules, e.g.
    embeddings and LM head) stay tied: `to_empty` alone would give each module its own copy.
    """
    ties = tied_parameters(model)
    model.to_empty(device="cpu" if offload_params else device)
    if offload_params:  # only parameters live on CPU; buffers (rotary tables, ids) stay with compute
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(device)
    for names in ties:
        first = model.get_parameter(names[0])
        for fqn in names[1:]:
            owner, _, attr = fqn.rpartition(".")
            model.get_submodule(owner)._parameters[attr] = first


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of qualified names that refer to one Parameter (e.g. embeddings and a tied LM head)."""
    groups: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(fqn)
    return [names for names in groups.values() if len(names) > 1]


def module_seed(seed: int, fqn: str) -> int:
    """A per-module seed that depends only on the base seed and the module's qualified name."""
    return (seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63 - 1)


def non_persistent_buffers(model: nn.Module) -> set[str]:
    """Qualified names of buffers a checkpoint does not contain (rotary tables, position ids)."""
    out = set()
    for fqn, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            if module._buffers.get(name) is not None:
                out.add(f"{fqn}.{name}" if fqn else name)
    return out


def init_weights_(
    model: nn.Module,
    init_module: Callable[[nn.Module], None],
    seed: int,
    names: Iterable[str] | None = None,
) -> None:
    """Initialise parameters and buffers with `init_module(module)` (e.g. an HF model's `_init_weights`).

    `init_module` sees each module with full-size plain tensors in place of its direct parameters and
    buffers and must write all of them; anything it leaves untouched is an error. `names` restricts
    the work to those qualified tensor names (e.g. the buffers a checkpoint did not provide). The
    global RNG state is restored afterwards.
    """
    wanted = None if names is None else set(names)
    if wanted is not None:
        known = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {
            n for n, _ in model.named_buffers()
        }
        unknown = sorted(wanted - known)
        if unknown:
            raise WeightInitError(
                f"init_weights_: {type(model).__name__} has no tensors named {unknown[:5]}."
            )
    devices = sorted({t.device.index or 0 for t in _tensors(model) if t.device.type == "cuda"})
    done: set[int] = set()  # a tied tensor is initialised once, by its first owner
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        for fqn, module in model.named_modules():
            _init_one(module, fqn, init_module, seed, wanted, done)


def _tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _init_one(
    module: nn.Module,
    fqn: str,
    init_module: Callable[[nn.Module], None],
    seed: int,
    wanted: set[str] | None,
    done: set[int],
) -> None:
    slots = [(module._parameters, n, t) for n, t in module._parameters.items() if t is not None]
    slots += [(module._buffers, n, t) for n, t in module._buffers.items() if t is not None]
    slots = [s for s in slots if id(s[2]) not in done and (wanted is None or _qual(fqn, s[1]) in wanted)]
    if not slots:
        return
    done.update(id(s[2]) for s in slots)
    full = {}
    for store, name, t in slots:
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.is_meta:
            raise WeightInitError(f"{_qual(fqn, name)} is on the meta device: call materialize_() first.")
        full[name] = torch.empty(t.shape, dtype=t.dtype, device=local.device).fill_(_sentinel(t.dtype))
        store[name] = (
            nn.Parameter(full[name], requires_grad=t.requires_grad)
            if store is module._parameters
            else full[name]
        )
    torch.manual_seed(module_seed(seed, fqn))
    try:
        init_module(module)
    finally:
        for store, name, t in slots:
            store[name] = t
    for _, name, t in slots:
        value = full[name]
        if _still_sentinel(value):
            raise WeightInitError(
                f"the init function left {_qual(fqn, name)} ({type(module).__name__}) uninitialised; "
                "initialise it there, or load it from a checkpoint."
            )
        if isinstance(t, DTensor):
            shard = distribute_tensor(value, t.device_mesh, t.placements, src_data_rank=None).to_local()
            t.to_local().copy_(shard)
        else:
            t.copy_(value)


def _qual(fqn: str, name: str) -> str:
    return f"{fqn}.{name}" if fqn else name


def _sentinel(dtype: torch.dtype) -> float | int | bool:
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return False
    return torch.iinfo(dtype).min


def _still_sentinel(value: torch.Tensor) -> bool:
    if value.dtype == torch.bool or value.numel() == 0:
        return False
    if value.is_floating_point() or value.is_complex():
        return bool(torch.isnan(value).any())
    return bool((value == torch.iinfo(value.dtype).min).any())
