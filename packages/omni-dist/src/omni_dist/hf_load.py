"""Load HF safetensors weights into a (sharded) model: each rank reads only the slices it owns.

Uses torch.distributed.checkpoint's HuggingFaceStorageReader, which reads `*.safetensors` files in a
directory (as written by `save_pretrained`, single file or sharded) slice by slice, so no rank ever
materialises a full tensor it does not own. Needs the `safetensors` package (installed with
transformers, or `omni-dist[hf]`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from omni_dist.gather import all_gather_json

log = logging.getLogger(__name__)


class CheckpointMismatchError(RuntimeError):
    """The checkpoint lacks tensors the model needs, or has them with another shape."""


SplitKeys = Callable[[str, torch.Tensor], "dict[str, torch.Tensor] | None"]


def local_rows(t: torch.Tensor) -> torch.Tensor:
    """Global indices along dim 0 of the rows this rank holds of `t` (a DTensor or a plain tensor)."""
    if not isinstance(t, DTensor):
        return torch.arange(t.shape[0])
    index = torch.arange(t.shape[0], device=t.to_local().device)
    return distribute_tensor(index, t.device_mesh, t.placements, src_data_rank=None).to_local().cpu()


def load_hf_weights_(
    model: nn.Module,
    path: str | Path,
    strict: bool = True,
    split_keys: SplitKeys | None = None,
    used: set[str] | None = None,
) -> set[str]:
    """Fill `model`'s persistent parameters and buffers from the safetensors files in `path`.

    Names are matched literally: checkpoints whose layout differs from the model's (e.g. per-expert
    keys for a model with fused experts) need converting first. Tied tensors (one tensor under several
    names, e.g. embeddings and LM head) are read once, under whichever name the checkpoint has.
    `split_keys(name, tensor)` may map a model tensor to several checkpoint tensors, each given as the
    view of this rank's local shard it fills (e.g. fused experts from per-expert keys, for only the
    experts this rank holds); it returns None for tensors stored under their own name.
    Returns every name now filled, tied aliases included. With `strict`, a tensor the model has and
    the checkpoint lacks is an error listing them; otherwise the caller initialises the rest
    (`init_weights_(..., names=all - loaded)`). Unused checkpoint tensors are logged, unless `used` is
    given: then the checkpoint keys read are added to it, for a caller that fills several modules from
    one directory (and calls `log_unused` once).
    """
    try:
        import safetensors  # noqa: F401  (imported by the reader; fail here with a useful message)
    except ImportError:
        raise ImportError(
            "loading HF weights needs the `safetensors` package: pip install 'omni-dist[hf]'"
        ) from None
    path = Path(path)
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"no *.safetensors files in {path} (expected a save_pretrained directory).")
    reader = dcp.HuggingFaceStorageReader(str(path))
    available = reader.read_metadata().state_dict_metadata

    aliases: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(t), []).append(name)
        tensors[id(t)] = t
    to_load: dict[str, torch.Tensor] = {}
    loaded: set[str] = set()
    missing: list[str] = []
    error = None
    try:
        for key, names in aliases.items():
            parts = split_keys(names[0], tensors[key]) if split_keys is not None else None
            if parts is not None:
                absent = sorted(k for k in parts if k not in available)
                if absent:  # a fused tensor cannot be half loaded: it is an error even without strict
                    raise CheckpointMismatchError(f"{names[0]} needs {absent[:4]}, which are not in {path}.")
                for k, view in parts.items():
                    _check_tensor(k, view, available[k], path)
                    to_load[k] = view
            else:
                present = [n for n in names if n in available]
                if not present:
                    missing.extend(names)
                    continue
                t = tensors[key]
                _check_tensor(present[0], t, available[present[0]], path)
                to_load[present[0]] = t.data if isinstance(t, nn.Parameter) else t
            loaded.update(names)
        if missing and strict:
            raise CheckpointMismatchError(
                f"{len(missing)} tensors of {type(model).__name__} are not in {path}: {sorted(missing)[:8]}"
                + (" ..." if len(missing) > 8 else "")
                + " (pass strict=False to initialise them instead)."
            )
    except CheckpointMismatchError as e:
        error = e
    # With sharded experts the checks differ per rank: agree before anyone enters the collective load.
    used_keys = set(to_load)
    if dist.is_initialized():
        failed = torch.tensor([0 if error is None else 1])
        dist.all_reduce(failed)
        if error is None and int(failed):
            error = CheckpointMismatchError(
                f"loading {path} failed on {int(failed)} other rank(s); see their logs."
            )
        used_keys = set().union(*all_gather_json(sorted(used_keys)))
    if error is not None:
        raise error
    read = used_keys | {n for names in aliases.values() for n in names if n in available}
    if used is None:
        log_unused(path, set(available) - read)
    else:
        used |= read
    dcp.load(to_load, storage_reader=reader)
    return loaded


def checkpoint_keys(path: str | Path) -> set[str]:
    """Every tensor name in the safetensors files of `path`."""
    return set(dcp.HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata)


def log_unused(path: str | Path, unused: set[str]) -> None:
    if unused and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning(
            "%d tensors of %s are not used by the model, e.g. %s", len(unused), path, sorted(unused)[:4]
        )


def _check_tensor(name: str, tensor: torch.Tensor, stored, path: Path) -> None:
    """Same shape, and a float tensor for a float one (any float dtype converts; integers do not)."""
    want, have = tuple(tensor.shape), tuple(stored.size)
    if want != have:
        raise CheckpointMismatchError(
            f"{name}: the model needs shape {want}, the checkpoint has {have} ({path})."
        )
    dtype = stored.properties.dtype
    if tensor.dtype.is_floating_point != dtype.is_floating_point:
        raise CheckpointMismatchError(
            f"{name}: the model needs a {tensor.dtype} tensor, the checkpoint has {dtype} ({path})."
        )
