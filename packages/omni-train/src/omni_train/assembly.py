"""Recipe -> runnable parts: the one place that builds them.

    model_spec --meta_model--> OmniModel on meta --build_model--> parallelized on the mesh, materialized,
        each part's HF weights loaded, the rest initialised from train.seed (same weights on any layout)
    checkpoint_model: the same model in one process, filled from a checkpoint of any layout
    data.tokenizer --tokenizer--> checked against the foundation's vocab
    chat_processor: the model's own encoders/decoders hand their media processors to omni-data
    build_loader, build_optimizer: the loader and AdamW + LR schedule of a run

The trainer, inference, convert, dry-run and the preprocessing job (`preprocessing_processor`) call
these; none builds a part itself. The recipe -> package-config mapping is TrainConfig's (config.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from omni_data.loader import OmniLoader
from omni_data.processor import ChatProcessor
from omni_dist import ParallelMesh, distributed
from omni_dist.attention import SequenceParallel
from omni_dist.checkpoint import CheckpointManager, ModelPart
from omni_dist.optim import SkippingAdamW
from omni_dist.parallelize import ParallelizeReport
from omni_dist.weights import materialize_, non_persistent_buffers
from omni_models.config import OmniModelConfig, build_omni_model, foundation_config
from omni_models.omni import OmniModel, RunSettings
from omni_models.omni_weights import init_omni_weights_, load_part_weights_
from omni_models.parallel import omni_kernels, parallelize_omni, run_settings
from omni_train.config import ConfigError, TrainConfig
from omni_train.schedule import lr_lambda


def meta_model(spec: OmniModelConfig, settings: RunSettings | None = None) -> OmniModel:
    """The omni model on the meta device: no memory, any scale."""
    with torch.device("meta"):
        return build_omni_model(spec, settings)


def sequence_parallel(cfg: TrainConfig, mesh: ParallelMesh) -> SequenceParallel | None:
    """The SP group the model's forward runs over (parallel.sp ranks, parallel.sp_async head chunks)."""
    return SequenceParallel.from_mesh(mesh["sp"], cfg.parallel.sp_async) if cfg.parallel.sp > 1 else None


@dataclass
class BuiltModel:
    model: OmniModel
    report: ParallelizeReport
    loaded: set[str]  # tensors filled from the parts' HF directories (the rest were initialised)


def build_model(cfg: TrainConfig, mesh: ParallelMesh, device: torch.device) -> BuiltModel:
    """Training: kernels -> meta build -> parallelize on `mesh` -> materialize local shards -> part
    weights -> init."""
    spec, pcfg, chunk = cfg.model_spec, cfg.parallelize_config(), cfg.train.loss_chunk
    kernels = omni_kernels(foundation_config(spec.foundation), mesh, pcfg, cfg.data.max_tokens, chunk)
    model = meta_model(spec, run_settings(mesh, pcfg, kernels, chunk))
    report = parallelize_omni(model, mesh, spec, pcfg, kernels)
    materialize_(model, device, offload_params=pcfg.offload_params)
    loaded = load_part_weights_(model, spec)
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    init_omni_weights_(model, cfg.train.seed, names=names - loaded)
    return BuiltModel(model, report, loaded)


def checkpoint_model(cfg: TrainConfig, checkpoint: Path, device: str = "cpu") -> OmniModel:
    """The model of a checkpoint, whole in this process (the checkpoint may come from any layout), with
    one process's settings (RunSettings' defaults: all logits at once, torch's loss)."""
    model = meta_model(cfg.model_spec)
    materialize_(model, device)
    init_omni_weights_(model, cfg.train.seed, names=non_persistent_buffers(model))  # rotary tables
    with distributed():  # one process; DCP reshards whatever layout wrote the checkpoint
        CheckpointManager(checkpoint.parent).load({"model": ModelPart(model)}, checkpoint)
    return model


def tokenizer(cfg: TrainConfig, model: OmniModel | None = None):
    """data.tokenizer, checked against the foundation's vocabulary when the model is given."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    if model is not None:
        vocab = model.foundation.config.vocab_size
        if len(tok) > vocab:
            raise ConfigError(
                f"data.tokenizer ({cfg.data.tokenizer}) has {len(tok)} tokens, but the foundation's "
                f"vocab_size is {vocab}: raise model.foundation.config.vocab_size"
            )
    return tok


def chat_processor(
    model: OmniModel, spec: OmniModelConfig, tok, use_recorded_counts: bool = True
) -> ChatProcessor:
    """omni-data's chat processor with the media processors of the model's own encoders and decoders;
    for a pretrained family, its media marker tokens and per-sample (M-RoPE) positions too."""
    media = {m: model.encoders[e].processor(m) for m, e in model.modality_encoder.items()}
    targets = {m: model.decoders[d].processor(m) for m, d in model.modality_decoder.items()}
    family = spec.pretrained.family if spec.pretrained is not None else None
    return ChatProcessor(
        tok,
        media=media,
        targets=targets,
        use_recorded_counts=use_recorded_counts,
        markers=family.markers if family is not None else None,
        positions=family.positions(spec.pretrained.hf_config) if family and family.positions else None,
    )


def preprocessing_processor(
    model: str | Mapping[str, Any], tokenizer: str, use_recorded_counts: bool = True
) -> ChatProcessor:
    """The preprocessing job's processor factory: `model` is a model spec or a YAML file with a
    `model:` section (e.g. the recipe); the processor is the one training will use."""
    from transformers import AutoTokenizer

    if isinstance(model, str):
        with open(model) as f:
            model = (yaml.safe_load(f) or {}).get("model")
        if model is None:
            raise ConfigError(
                "the YAML file given as the preprocessing processor's model has no 'model' section"
            )
    spec = OmniModelConfig.from_dict(model)
    return chat_processor(
        meta_model(spec), spec, AutoTokenizer.from_pretrained(tokenizer), use_recorded_counts
    )


def build_loader(
    cfg: TrainConfig,
    processor: ChatProcessor,
    mesh: ParallelMesh,
    device: torch.device,
    pad_id: int,
    sources: list[dict[str, Any]] | None = None,
    epochs: int | None = None,
) -> OmniLoader:
    """This rank's loader of the training sources (or `sources` for `epochs` passes, e.g. evaluation)."""
    return OmniLoader(
        cfg.data_config(sources, epochs),
        processor,
        dp_rank=mesh.dp_rank,
        dp_size=mesh.dims.dp,
        group=mesh["dp"].get_group(),
        device=device,
        pad_id=pad_id,
        peers=mesh["sp"].get_group() if mesh.dims.sp > 1 else None,  # SP ranks share micro-batches
    )


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(
    cfg: TrainConfig, model: torch.nn.Module, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters and the recipe's LR schedule."""
    t = cfg.train
    # torch's fused kernel (CPU and CUDA): one launch per step, and a non-finite step skips itself on the
    # device (omni_dist.optim), so the host never reads the loss mid-step
    optimizer = SkippingAdamW(
        trainable_parameters(model), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay
    )
    schedule = lr_lambda(t.schedule, t.steps, t.warmup_steps, t.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
