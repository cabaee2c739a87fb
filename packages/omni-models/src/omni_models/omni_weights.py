"""Weights of the composite: per-part init, per-part loading from HF directories, per-part export."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from omni_dist.hf_export import export_hf_safetensors
from omni_dist.hf_load import CheckpointMismatchError, checkpoint_keys, load_hf_weights_, log_unused
from omni_dist.weights import init_weights_
from omni_models.config import OmniModelConfig
from omni_models.hf_keys import per_expert_keys, stored_shapes, transposed_view
from omni_models.omni import OmniModel


def _towers(model: OmniModel) -> dict[str, nn.Module]:
    """Part path -> the HF module whose checkpoint layout the part uses."""
    out: dict[str, nn.Module] = {"foundation": model.foundation}
    for name, enc in model.encoders.items():
        out[f"encoders.{name}"] = getattr(enc, "tower", enc)
    for name, proj in model.projectors.items():
        out[f"projectors.{name}"] = proj
    for name, dec in model.decoders.items():
        # its own layout (the VQ model under `tower.`, head/aligner/embed), or the module its `path`
        # fills alone (a VQ-VAE directory)
        out[f"decoders.{name}"] = getattr(dec, "checkpoint_module", dec)
    return out


def init_function(model: OmniModel) -> Callable[[nn.Module], None]:
    """Each module initialised by its own part: the `_init_weights` of the innermost HF model holding it
    (a tower, a vision model inside an encoder), `reset_parameters` for the rest (projectors, heads)."""
    owner: dict[int, Callable[[nn.Module], None]] = {}
    for part in model.modules():  # pre-order: an inner HF model overrides the outer one for its modules
        fn = getattr(part, "_init_weights", None)
        if fn is not None and isinstance(part, PreTrainedModel):
            for m in part.modules():
                owner[id(m)] = fn

    def init(module: nn.Module) -> None:
        owner.get(id(module), _reset)(module)

    return init


def _reset(module: nn.Module) -> None:
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()


def init_omni_weights_(model: OmniModel, seed: int, names: Iterable[str] | None = None) -> None:
    """Random init that gives the same full weights on any parallel layout (see init_weights_)."""
    init_weights_(model, init_function(model), seed, names)


def load_part_weights_(model: OmniModel, cfg: OmniModelConfig) -> set[str]:
    """Fill every part that names a `path` from its safetensors; returns the qualified names filled.

    Parts of a pretrained model read its directory through the family's layout (our module prefix ->
    the checkpoint's key prefix); a tensor there that no part reads is an error, unless the family
    ignores it (e.g. a speech generator it does not train)."""
    towers = _towers(model)
    paths = (
        {"foundation": cfg.foundation.path}
        | {f"encoders.{n}": e.path for n, e in cfg.encoders.items()}
        | {f"decoders.{n}": d.path for n, d in cfg.decoders.items()}
    )
    source = cfg.pretrained
    loaded: set[str] = set()
    used: dict[str, set[str]] = {}  # per directory (a pretrained model fills several parts from one)
    for part, path in paths.items():
        if path is None:
            continue
        tower = towers[part]
        prefix = next(f"{n}." for n, m in model.named_modules() if m is tower)
        # A part whose checkpoints use another layout (a full Janus or Qwen2-VL model's keys) maps
        # its tower's names to the checkpoint's.
        keys = getattr(model.get_submodule(part), "checkpoint_keys", None)
        if source is not None and str(path) == source.path:
            keys = _family_keys(source.family, prefix, path)
        read = used.setdefault(str(path), set())
        loaded |= {prefix + n for n in load_hf_weights_(tower, path, split_keys=keys, used=read)}
    for path, read in used.items():
        unused = checkpoint_keys(path) - read
        if source is not None and path == source.path:
            unexpected = sorted(k for k in unused if not k.startswith(source.family.ignore))
            if unexpected:  # a whole pretrained model must fill exactly its parts
                raise CheckpointMismatchError(
                    f"{len(unexpected)} tensors of {path} belong to no part of the {source.family.name} model: "
                    f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} (is this directory another "
                    "variant of the family?)"
                )
            unused -= {k for k in unused if k.startswith(source.family.ignore)}
        log_unused(path, unused)
    return loaded


def _family_keys(family, prefix: str, path):
    """split_keys reading each tensor of the part at `prefix` under the family layout's key (into its
    transposed view where the family allows it and the directory stores it so)."""
    shapes = stored_shapes(path) if family.transposed else {}

    def keys(name: str, tensor):
        key = family.checkpoint_key(prefix + name)
        if key is None:
            return None
        if family.per_expert and (experts := per_expert_keys(key, tensor)) is not None:
            return experts
        if key.endswith(family.transposed) and tensor.ndim >= 2:
            swapped = (*tensor.shape[:-2], tensor.shape[-1], tensor.shape[-2])
            if swapped != tuple(tensor.shape) and shapes.get(key) == swapped:
                return {key: transposed_view(tensor)}
        return None if key == name else {key: tensor}

    return keys


def export_parts(model: OmniModel, out_dir: str | Path, dtype: str = "bfloat16") -> dict[str, list[Path]]:
    """One HF directory per part (`foundation`, `encoders/<name>`, `projectors/<name>`); collective."""
    out: dict[str, list[Path]] = {}
    for part, tower in _towers(model).items():
        config = getattr(tower, "config", None)
        config_json = config.to_json_string() if config is not None else None
        out[part] = export_hf_safetensors(
            tower, Path(out_dir) / part.replace(".", "/"), dtype, config_json=config_json
        )
    return out
