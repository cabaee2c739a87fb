"""The omni model's configuration (YAML-able, validated) and building the model from it.

    foundation: {name: qwen2, config: {...HF config fields...}, path: hf_dir, freeze: false}
    encoders:
      vision: {name: qwen2_vl_vision, modalities: [image, video], config: {...}, freeze: true,
               projector: mlp, options: {max_pixels: 401408}}
      audio:  {name: whisper, modalities: [audio], config: {...}, path: whisper_encoder_dir}

Or a whole pretrained HF model directory, expanded by its family (omni_models.families) into the
same part specs (each with `path` = the directory); extra encoders/decoders may be added by config:

    pretrained: /models/Qwen2-VL-7B-Instruct
    freeze: [vision]              # parts to freeze by name (foundation, an encoder, a decoder)
    attention: flash_attn         # the foundation's packed-attention backend (default sdpa)
    # and keys the family reads (PretrainedFamily.options), e.g. Qwen2.5-Omni's
    # use_audio_in_video: true    # each video brings its audio track, interleaved with its frames

`config` holds the part's HF config fields (tiny ones in tests, the real ones for users); `path`
names a directory whose safetensors fill the part (`load_part_weights_`); `plan` overrides the
part's default ParallelPlan. A decoder's `loss_weight` (default 1) scales its token losses in the
training loss. Frozen parts get requires_grad=False: no gradients, no optimizer state.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn
from transformers import AutoModelForCausalLM

from omni_dist.media import MediaProcessor
from omni_dist.strict import strict_fields
from omni_models.attention import implementation_name, register_packed_attention
from omni_models.contracts import check_contract
from omni_models.families import PretrainedSource, read_source
from omni_models.modality import Decoder, Encoder, Foundation
from omni_models.omni import OmniModel, RunSettings, projector
from omni_models.registry import DECODERS, ENCODERS, FOUNDATION_MODELS, FOUNDATIONS


class ModelConfigError(ValueError):
    """An omni model spec that cannot be built; the message names the key."""


# where a part from outside the repo comes from (omni_train.plugins)
_PLUGIN_HINT = (
    " (a part from another package is registered by its plugin: list its module under the recipe's "
    "`plugins` key, or install a package declaring an `omniscale.plugins` entry point)"
)


def _strict(cls: type, data: Any, where: str) -> dict[str, Any]:
    return strict_fields(cls, data, where, ModelConfigError)


@dataclass(frozen=True)
class FoundationConfig:
    name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    path: str | None = None
    freeze: bool = False
    plan: Mapping[str, Any] | None = None
    attention: str = "sdpa"  # an omni-dist packed-attention backend: sdpa | varlen | flash_attn

    def __post_init__(self) -> None:
        if self.name not in FOUNDATIONS:
            raise ModelConfigError(
                f"unknown foundation {self.name!r}; registered: {sorted(FOUNDATIONS)}{_PLUGIN_HINT}"
            )


@dataclass(frozen=True)
class _PartConfig:
    """An encoder or decoder: a registered class by name, its HF config fields and constructor options."""

    name: str
    modalities: tuple[str, ...]
    config: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    path: str | None = None
    plan: Mapping[str, Any] | None = None

    def _check(self, kind: str, registry: Mapping[str, Any]) -> None:
        if self.name not in registry:
            raise ModelConfigError(
                f"unknown {kind} {self.name!r}; registered: {sorted(registry)}{_PLUGIN_HINT}"
            )
        if not self.modalities:
            raise ModelConfigError(f"{kind} {self.name!r} lists no modalities")


PROJECTORS = ("mlp", "linear", "identity")  # identity: the tower's own merger/aligner already projects


@dataclass(frozen=True)
class EncoderConfig(_PartConfig):
    freeze: bool = True
    projector: str = "mlp"
    freeze_projector: bool = False

    def __post_init__(self) -> None:
        self._check("encoder", ENCODERS)
        if self.projector not in PROJECTORS:
            raise ModelConfigError(f"projector must be one of {PROJECTORS}, got {self.projector!r}")


@dataclass(frozen=True)
class DecoderConfig(_PartConfig):
    freeze: bool = False  # its VQ model is always frozen; this freezes the embedding and head too
    # The weight of its token losses beside the text's: many high-entropy image codes per sample would
    # otherwise dominate the few answer tokens of the understanding tasks.
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        self._check("decoder", DECODERS)
        w = self.loss_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
            raise ModelConfigError(f"decoder {self.name!r}: loss_weight must be a positive number, got {w!r}")


@dataclass(frozen=True)
class OmniModelConfig:
    foundation: FoundationConfig
    encoders: Mapping[str, EncoderConfig] = field(default_factory=dict)
    decoders: Mapping[str, DecoderConfig] = field(default_factory=dict)
    pretrained: PretrainedSource | None = None  # the HF model directory the parts came from
    freeze: tuple[str, ...] = ()
    attention: str | None = None  # with `pretrained`: the foundation's attention backend

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OmniModelConfig:
        source, options = None, {}
        if isinstance(data, Mapping) and data.get("pretrained") is not None:
            source = read_source(str(data["pretrained"]), ModelConfigError)
            options = {k: data[k] for k in source.family.options if k in data}  # the family's own keys
            data = {k: v for k, v in data.items() if k not in options}
        d = _strict(cls, data, "model")
        if source is not None:
            if "foundation" in d:
                raise ModelConfigError(
                    "model.foundation and model.pretrained exclude each other: the foundation comes from "
                    "the pretrained directory (add encoders/decoders beside it, or drop model.pretrained)"
                )
            try:
                parts = source.family.expand(source.hf_config, source.path, **options)
            except ValueError as e:  # the family's options or config
                raise ModelConfigError(f"model.pretrained ({source.family.name}): {e}") from e
            d = _with_parts(parts, d)
        elif d.get("attention") is not None:
            raise ModelConfigError(
                "model.attention goes with model.pretrained; else set model.foundation.attention"
            )
        if "foundation" not in d:
            raise ModelConfigError("model.foundation (or model.pretrained) is required")
        encoders = {}
        for name, e in (d.get("encoders") or {}).items():
            e = _strict(EncoderConfig, e, f"model.encoders.{name}")
            encoders[name] = EncoderConfig(**{**e, "modalities": tuple(e.get("modalities", ()))})
        decoders = {}
        for name, e in (d.get("decoders") or {}).items():
            e = _strict(DecoderConfig, e, f"model.decoders.{name}")
            decoders[name] = DecoderConfig(**{**e, "modalities": tuple(e.get("modalities", ()))})
        foundation = FoundationConfig(**_strict(FoundationConfig, d["foundation"], "model.foundation"))
        freeze = tuple(d.get("freeze") or ())
        for name in freeze:
            if name == "foundation":
                foundation = replace(foundation, freeze=True)
            elif name in encoders:
                encoders[name] = replace(encoders[name], freeze=True)
            elif name in decoders:
                decoders[name] = replace(decoders[name], freeze=True)
            else:
                parts = ["foundation", *encoders, *decoders]
                close = difflib.get_close_matches(name, parts, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ModelConfigError(f"model.freeze names {name!r}, which is no part{hint}; parts: {parts}")
        return cls(foundation, encoders, decoders, source, freeze, d.get("attention"))

    @property
    def modalities(self) -> list[str]:
        return [m for e in self.encoders.values() for m in e.modalities]


def _with_parts(parts: Mapping[str, Any], d: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's model section with a family's expanded parts; an added part may not reuse a name."""
    attention = {"attention": d["attention"]} if d.get("attention") is not None else {}
    out = {**d, "foundation": {**parts["foundation"], **attention}}
    for kind in ("encoders", "decoders"):
        extra = dict(d.get(kind) or {})
        clash = sorted(set(extra) & set(parts.get(kind, {})))
        if clash:
            raise ModelConfigError(
                f"model.{kind}: {clash} already come from model.pretrained; give added parts other names"
            )
        out[kind] = {**parts.get(kind, {}), **extra}
    return out


def foundation_config(cfg: FoundationConfig) -> Any:
    """The foundation's HF config (a transformers PretrainedConfig), without building the model."""
    return FOUNDATIONS[cfg.name](**cfg.config)


def build_foundation(cfg: FoundationConfig) -> nn.Module:
    register_packed_attention()
    hf_cfg = foundation_config(cfg)
    hf_cfg._attn_implementation = implementation_name(cfg.attention)
    model_class = FOUNDATION_MODELS.get(cfg.name)
    return model_class(hf_cfg) if model_class is not None else AutoModelForCausalLM.from_config(hf_cfg)


def _checked_part(part: Any, protocol: type, where: str, modalities: tuple[str, ...] = ()) -> Any:
    """`part` once it (and its processor of each of `modalities`) satisfies its Protocol."""
    check_contract(part, protocol, where, ModelConfigError)
    for m in modalities:
        try:
            proc = part.processor(m)
        except (KeyError, ValueError) as err:
            raise ModelConfigError(f"{where}: processor({m!r}) raised {type(err).__name__}: {err}") from err
        check_contract(proc, MediaProcessor, f"{where} processor({m!r})", ModelConfigError)
    return part


def build_omni_model(cfg: OmniModelConfig, settings: RunSettings | None = None) -> OmniModel:
    """Build on the current default device (use `with torch.device("meta")` before parallelizing);
    `settings`: how the run computes its steps (omni_models.parallel.run_settings; default: one process).

    Every part is checked against its Protocol (omni_models.modality) as it is built: a registered
    class without a member the framework calls is a ModelConfigError naming the part and the member."""
    foundation = _checked_part(
        build_foundation(cfg.foundation), Foundation, f"model.foundation ({cfg.foundation.name})"
    )
    width = foundation.config.hidden_size
    encoders, projectors = {}, {}
    for name, e in cfg.encoders.items():
        encoders[name] = _checked_part(
            ENCODERS[e.name](dict(e.config), modalities=e.modalities, **e.options),
            Encoder,
            f"model.encoders.{name} ({e.name})",
            e.modalities,
        )
        projectors[name] = projector(e.projector, encoders[name].output_size, width)
    decoders = {
        name: _checked_part(
            DECODERS[d.name](dict(d.config), modalities=d.modalities, hidden_size=width, **d.options),
            Decoder,
            f"model.decoders.{name} ({d.name})",
            d.modalities,
        )
        for name, d in cfg.decoders.items()
    }
    weights = {name: float(d.loss_weight) for name, d in cfg.decoders.items()}
    model = OmniModel(foundation, encoders, projectors, decoders, weights, settings)
    model.foundation.requires_grad_(not cfg.foundation.freeze)
    for name, e in cfg.encoders.items():
        model.encoders[name].requires_grad_(not e.freeze)
        model.projectors[name].requires_grad_(not e.freeze_projector)
    for name, d in cfg.decoders.items():
        if d.freeze:
            model.decoders[name].requires_grad_(False)
    return model
