"""The stateful parts a checkpoint holds, and how their state becomes tensors only.

A part is anything with `state_dict()` / `load_state_dict()`. Checkpoints store tensors only, so
loading never unpickles: each part's state is split into its tensor leaves and a JSON skeleton of
everything else (numbers, strings, lists), and put back together on load. Parts with
`per_rank = True` (RNG states, data-loader cursors) are stored once per rank; all others are the same
on every rank (or sharded DTensors, which DCP stores once and reshards on load).
"""

from __future__ import annotations

import json
import random
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

_TENSOR = "__tensor__"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class ModelPart:
    """A (possibly FSDP-sharded) model under its full parameter names, loadable into any layout."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=True))


class OptimizerPart:
    """Optimizer state keyed by parameter names (not positions), so it follows the model across layouts."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class RNGPart:
    """This rank's random generators: torch CPU, its current CUDA device, and Python's `random`."""

    per_rank = True

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "cpu": torch.get_rng_state(),
            "python": _python_rng_to_json(random.getstate()),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["cpu"])
        random.setstate(_python_rng_from_json(state_dict["python"]))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def split_state(state: Any, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Tensor leaves under flat keys `prefix/path`, and a JSON-able skeleton with their keys in place."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {_TENSOR: path}
        if isinstance(node, dict):
            return {"__dict__": [[_json_key(k), walk(v, f"{path}/{k}")] for k, v in node.items()]}
        if isinstance(node, list | tuple):
            kind = "__tuple__" if isinstance(node, tuple) else "__list__"
            return {kind: [walk(v, f"{path}/{i}") for i, v in enumerate(node)]}
        if node is None or isinstance(node, bool | int | float | str):
            return node
        raise TypeError(f"checkpoint part {prefix!r}: {path} holds a {type(node).__name__}, which is not storable "
                        "as a tensor or JSON; convert it in the part's state_dict().")  # fmt: skip

    return tensors, walk(state, prefix)


def join_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of split_state."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if "__dict__" in skeleton:
            return {_from_json_key(k): join_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [join_state(v, tensors) for v in skeleton["__list__"]]
        if "__tuple__" in skeleton:
            return tuple(join_state(v, tensors) for v in skeleton["__tuple__"])
    return skeleton


def _json_key(key: Any) -> Any:
    if isinstance(key, bool | str) or key is None:
        return key
    if isinstance(key, int):
        return {"int": key}
    raise TypeError(f"state dict key {key!r} ({type(key).__name__}) cannot be stored; use str or int keys.")


def _from_json_key(key: Any) -> Any:
    return key["int"] if isinstance(key, dict) else key


def encode_json(value: Any) -> torch.Tensor:
    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)


def decode_json(tensor: torch.Tensor) -> Any:
    return json.loads(bytes(tensor.tolist()).decode())
