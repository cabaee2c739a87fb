"""Parallelizing the omni model: each part's plan on the one global mesh.

The foundation's input embedding becomes its own FSDP unit because the omni model calls it directly
(to splice media features in) rather than through the foundation's forward, and each encoder's
`lm_encode` (each decoder's `lm_encode`, `lm_head`, `lm_embed`) is registered as an FSDP forward
method so its unit gathers parameters around it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

from omni_dist.dtypes import resolve_dtype
from omni_dist.mesh import ParallelMesh
from omni_dist.parallelize import ParallelizeConfig, ParallelizeReport, parallelize
from omni_dist.plan import ParallelPlan, compose_plans
from omni_models.config import OmniModelConfig
from omni_models.hf_plans import plan_for
from omni_models.kernel_timing import KernelShapes, measure_kernels
from omni_models.kernels import KernelSet, select_kernels
from omni_models.omni import OmniModel, RunSettings


def omni_plan(model: OmniModel, cfg: OmniModelConfig) -> ParallelPlan:
    """One ParallelPlan for the whole model: each part's own plan (or its override), scoped to it."""
    foundation = (
        ParallelPlan.from_dict(cfg.foundation.plan) if cfg.foundation.plan else plan_for(model.foundation)
    )
    embedding = next(
        n for n, m in model.foundation.named_modules() if m is model.foundation.get_input_embeddings()
    )
    parts = {"foundation": dataclasses.replace(foundation, fsdp_units=(*foundation.fsdp_units, embedding))}
    for name, e in cfg.encoders.items():
        parts[f"encoders.{name}"] = ParallelPlan.from_dict(e.plan) if e.plan else model.encoders[name].plan()
        if any(True for _ in model.projectors[name].parameters()):  # an identity projector needs no unit
            parts[f"projectors.{name}"] = ParallelPlan()
    for name, d in cfg.decoders.items():
        parts[f"decoders.{name}"] = ParallelPlan.from_dict(d.plan) if d.plan else model.decoders[name].plan()
    return compose_plans(model, parts)


def omni_kernels(
    foundation_config: Any, mesh: ParallelMesh, config: ParallelizeConfig, tokens: int, loss_chunk: int
) -> KernelSet | None:
    """The kernel set `config.kernels` selects on the mesh's device (None: torch's own modules); `auto`
    measures the kernels at the foundation's widths, `tokens` rows per micro-batch and `loss_chunk` rows
    per loss-head chunk."""
    return select_kernels(
        config.kernels,
        mesh.world.device_type,
        announce=mesh.world.get_rank() == 0,
        measure=functools.partial(_measure, foundation_config, mesh, config, tokens, loss_chunk),
        compiled=config.compile,
    )


def run_settings(
    mesh: ParallelMesh, config: ParallelizeConfig, kernels: KernelSet | None, loss_chunk: int
) -> RunSettings:
    """The model's settings for a run on `mesh`: build the model with these and parallelize it with the
    same `kernels`."""
    return RunSettings(
        loss_chunk=loss_chunk,
        chunk_cross_entropy=None if kernels is None else kernels.chunk_cross_entropy,
        encoder_balance=config.encoder_balance,
        encoder_group=mesh["loss"].get_group(),  # every rank: where `world` balances encoder work
    )


def parallelize_omni(
    model: OmniModel,
    mesh: ParallelMesh,
    cfg: OmniModelConfig,
    config: ParallelizeConfig | None = None,
    kernels: KernelSet | None = None,
) -> ParallelizeReport:
    """`kernels`: the kernel set whose modules replace torch's (None: torch's own), the one the model's
    settings were made with (run_settings)."""
    config = config or ParallelizeConfig()
    chunk_ce = None if kernels is None else kernels.chunk_cross_entropy
    if model.settings.chunk_cross_entropy is not chunk_ce:
        raise ValueError(
            "parallelize_omni: the model was built with another loss kernel than `kernels` holds; build "
            "it with run_settings(mesh, config, kernels, loss_chunk) of the same kernels"
        )
    report = parallelize(
        model, mesh, omni_plan(model, cfg), config, None if kernels is None else kernels.swaps()
    )
    if isinstance(model.foundation, FSDPModule):
        # The chunked loss head runs the foundation's LM head after the foundation's forward: the unit's
        # own parameters (LM head, final norm) stay gathered until its backward.
        model.foundation.set_reshard_after_forward(False, recurse=False)
    for encoder in model.encoders.values():
        register_fsdp_forward_method(encoder, "lm_encode")
    for decoder in model.decoders.values():
        for method in ("lm_encode", "lm_loss", "lm_head", "lm_embed"):
            register_fsdp_forward_method(decoder, method)
    return report


def _measure(
    foundation_config: Any, mesh: ParallelMesh, config: ParallelizeConfig, tokens: int, chunk: int, kernels
):
    """Kernel times measured on rank 0's device and given to every rank, so all ranks run the same kernels."""
    times = [None]
    if mesh.world.get_rank() == 0:
        shapes = KernelShapes.of(foundation_config, tokens, chunk)
        device = torch.device("cuda", torch.cuda.current_device())
        dtype = resolve_dtype(config.param_dtype, "cuda", "param_dtype")
        times = [measure_kernels(shapes, kernels, device, dtype)]
    group = mesh.world.get_group()
    dist.broadcast_object_list(times, src=dist.get_global_rank(group, 0), group=group)
    return times[0]
