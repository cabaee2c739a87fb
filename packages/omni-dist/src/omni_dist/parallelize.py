"""Apply a ParallelPlan to a model. `parallelize` first checks the whole plan against the model and the
config (check_parallelize: every pattern matched, every combination checked, nothing changed yet), then
applies it in a fixed order of steps, each a function readable alone:

    kernel swaps (omni_dist.kernel_swap) -> apply_ep (expert parallelism) -> apply_compile (each block's
    forward, omni_dist.compile) -> apply_recompute_and_offload (wrapping the compiled forward) -> apply_fsdp

Works on a meta-device model (nothing is allocated until `materialize_`). Data parallelism is decided by
the mesh: dp_replicate == 1 shards over the `fsdp` view (FSDP); dp_replicate > 1 uses the 2-D `hsdp` view
(HSDP), which is pure replication (DDP) when dp_shard x sp == 1.

Gradients are SUMMED over the data-parallel mesh (FSDP's averaging is turned off): the loss each rank
backpropagates must already be divided by the global token count (see omni_dist.loss), which is what
makes every layout train the same model as one process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import nn
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from omni_dist.compile import CompileBackend, apply_compile, check_compile, check_compiled_experts
from omni_dist.dtypes import resolve_dtype
from omni_dist.expert_compute import ExpertCompute, check_expert_compute
from omni_dist.expert_parallel import EPDispatch, apply_expert_parallel
from omni_dist.kernel_swap import KernelSwap, swap_kernels
from omni_dist.mesh import ParallelMesh
from omni_dist.parallel_dims import ParallelConfigError
from omni_dist.plan import ParallelPlan, PlanError
from omni_dist.recompute import ActivationOffloader, apply_activation_offload, apply_recompute

log = logging.getLogger(__name__)

Recompute = Literal["none", "full", "selective"]
EncoderBalance = Literal["none", "sp", "world"]
RECOMPUTE_MODES: tuple[str, ...] = get_args(Recompute)
# When gradients are reduced under gradient accumulation: after every micro-batch (sharded gradient
# memory, one reduce-scatter per micro-batch) or once per optimizer step (each rank keeps the unsharded
# fp32 gradients of its FSDP units between micro-batches: no collective until the last one).
GradSync = Literal["micro_batch", "step"]
GRAD_SYNC_MODES: tuple[str, ...] = get_args(GradSync)
# Which kernels replace the plan.kernels modules: liger's (CUDA, the `gpu` extra), none (torch: the
# model's own modules), or auto: liger where it runs, with one log line saying why (omni_models.kernels).
Kernels = Literal["auto", "liger", "torch"]


@dataclass(frozen=True)
class ParallelizeConfig:
    """User choices for how the plan is applied (the plan says where, this says what), beside the run's
    other parallel settings, which their own parts read: sp_async (SequenceParallel.from_mesh),
    grad_sync (the training loop), encoder_balance (the model).

    A training recipe's `parallel` section takes these fields as they are (omni_train.config).
    """

    param_dtype: str = "float32"  # dtype of unsharded parameters in forward/backward
    reduce_dtype: str = "float32"  # dtype of gradient reduction
    reshard_after_forward: bool = True  # False keeps gathered params until backward (ZeRO-2-like)
    forward_prefetch: int = 0  # FSDP units ahead whose all-gather is issued early in forward
    offload_params: bool = False  # FSDP CPUOffloadPolicy: params, grads and optimizer state on CPU
    recompute: Recompute = "none"  # applied to plan.recompute
    offload_activations: bool = False  # saved activations of plan.offload modules go to CPU
    sp_async: int = 1  # >1: Ulysses all-to-alls overlapped in this many head chunks (SequenceParallel)
    ep_async: int = 1  # >1: EP dispatch in chunks overlapping expert compute
    expert_compute: ExpertCompute = "auto"  # local experts under EP (omni_dist.expert_compute)
    ep_dispatch: EPDispatch = "exact"  # padded: no host sync, ~ep x expert buffers (omni_dist.expert_padded)
    # the padded dispatch's fixed exchange size: tokens per rank per MoE call, the same on every rank and
    # at least the largest micro-batch's slice (training derives it: data.max_tokens // sp); 0: unset
    ep_token_bound: int = 0
    grad_sync: GradSync = "micro_batch"  # see GradSync; the training loop applies it (set_gradient_sync)
    # sp: the ranks of an SP group share the encoders' work (omni_dist.media_split); world: all ranks do,
    # across data-parallel ranks too; none: each SP rank encodes every item of the micro-batch
    encoder_balance: EncoderBalance = "sp"
    kernels: Kernels = "auto"
    compile: bool = False  # torch.compile each of plan.compile's blocks (omni_dist.compile)
    compile_backend: CompileBackend = "inductor"

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute={self.recompute!r} is not one of {', '.join(RECOMPUTE_MODES)}.")
        if self.forward_prefetch < 0:
            raise ValueError(f"forward_prefetch must be >= 0, got {self.forward_prefetch}.")
        for name in ("sp_async", "ep_async"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (1: no chunking), got {getattr(self, name)}.")
        if self.ep_token_bound < 0:
            raise ValueError(f"ep_token_bound must be >= 0 (0: unset), got {self.ep_token_bound}.")
        check_expert_compute(self.expert_compute)
        if self.grad_sync not in GRAD_SYNC_MODES:
            raise ValueError(f"grad_sync={self.grad_sync!r} is not one of {', '.join(GRAD_SYNC_MODES)}.")
        if self.encoder_balance not in get_args(EncoderBalance):
            raise ValueError(f"encoder_balance={self.encoder_balance!r} is not one of: none, sp, world.")
        if self.kernels not in get_args(Kernels):
            raise ValueError(f"kernels={self.kernels!r} is not one of: {', '.join(get_args(Kernels))}.")
        check_compile(self.compile, self.compile_backend, self.recompute)


@dataclass
class ParallelizeReport:
    """What parallelize did, by qualified module name (for logs and tests)."""

    fsdp_units: list[str] = field(default_factory=list)
    fp32_units: list[str] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)
    offloaded: dict[str, ActivationOffloader] = field(default_factory=dict)
    mesh_dims: tuple[str, ...] = ()
    expert_parallel: list[str] = field(default_factory=list)
    kernels: dict[str, str] = field(default_factory=dict)  # swapped module -> kernel name
    compiled: list[str] = field(default_factory=list)


def parallelize(
    model: nn.Module,
    mesh: ParallelMesh,
    plan: ParallelPlan,
    config: ParallelizeConfig | None = None,
    kernels: Mapping[str, KernelSwap] | None = None,
) -> ParallelizeReport:
    """Apply `plan` to `model` in place on `mesh`; returns what was applied. `kernels`: the selected
    kernel set's swaps (kernel name -> builder) for plan.kernels; None keeps the model's modules."""
    config = config or ParallelizeConfig()
    targets = check_parallelize(model, mesh, plan, config)  # everything is checked before any change
    report = ParallelizeReport()
    if kernels is not None:
        report.kernels = swap_kernels(model, targets.kernels, kernels)
    report.expert_parallel = apply_ep(model, mesh, plan, targets, config)
    # Before the recompute / offload wrappers, which then wrap the compiled forward (omni_dist.compile).
    report.compiled = apply_compile(targets.compile, config.compile_backend)
    report.recomputed, report.offloaded = apply_recompute_and_offload(targets, config.recompute)
    report.fsdp_units, report.fp32_units, report.mesh_dims = apply_fsdp(model, mesh, targets, config)
    if mesh.world.get_local_rank() == 0:
        _log(report, config)
    return report


@dataclass(frozen=True)
class Targets:
    """What each step of parallelize applies to: the plan's (qualified name, module) matches, the lists of
    features the config leaves off emptied, and the FSDP dtypes."""

    kernels: list[tuple[str, nn.Module, str]]  # (name, module, kernel name)
    experts: list[tuple[str, nn.Module]]  # expert-parallel modules; FSDP units on the EP mesh under ep > 1
    expert_params: dict[str, str]
    compile: list[tuple[str, nn.Module]]
    recompute: list[tuple[str, nn.Module]]
    offload: list[tuple[str, nn.Module]]
    fsdp_units: list[tuple[str, nn.Module]]
    fp32: list[tuple[str, nn.Module]]  # FSDP units computing in fp32 (none when everything is fp32)
    param_dtype: torch.dtype
    reduce_dtype: torch.dtype


def check_parallelize(
    model: nn.Module, mesh: ParallelMesh, plan: ParallelPlan, config: ParallelizeConfig
) -> Targets:
    """Match every pattern of `plan` (even of features that are off) and check the combination before
    touching the model, so a bad plan fails whole and early; returns what each step applies to."""
    device_type = mesh.world.device_type
    param_dtype = resolve_dtype(config.param_dtype, device_type, "param_dtype")
    reduce_dtype = resolve_dtype(config.reduce_dtype, device_type, "reduce_dtype")
    already = [fqn or "<root>" for fqn, m in model.named_modules() if isinstance(m, FSDPModule)]
    if already:
        raise PlanError(f"{type(model).__name__} is already parallelized (FSDP units: {already[:3]}...).")
    units = plan.match_modules(model, "fsdp_units")
    fp32 = plan.match_modules(model, "fp32_modules")
    recompute = plan.match_modules(model, "recompute")
    offload = plan.match_modules(model, "offload")
    experts = plan.match_modules(model, "experts")
    expert_params = plan.match_expert_params(model)
    swapped = plan.match_kernels(model)
    blocks = plan.match_modules(model, "compile")
    if not config.compile:
        blocks = []
    if config.recompute == "none":
        recompute = []
    if not config.offload_activations:
        offload = []
    if param_dtype == torch.float32:
        fp32 = []  # everything already computes in fp32: no separate units needed
    _check_combination(units, fp32, recompute, offload, config)
    check_compiled_experts(blocks, experts, mesh.dims.ep)
    wrapped = sorted(
        {f for f, _, _ in swapped} & {f for f, _ in units + fp32 + recompute + offload + experts}
    )
    if wrapped:
        raise PlanError(
            f"{wrapped[:3]} are in plan.kernels and in another plan list; a swapped module is a leaf."
        )
    if mesh.dims.ep > 1:
        overlap = sorted({f for f, _ in experts} & {f for f, _ in units + fp32})
        if overlap:
            raise PlanError(
                f"{overlap[:3]} are listed as experts and as FSDP/fp32 units; list each module once."
            )
        if config.ep_dispatch == "padded" and config.ep_token_bound < 1:
            raise ParallelConfigError(
                "ep_dispatch=padded sizes its exchange for a fixed number of tokens per rank: set "
                "ep_token_bound to the largest micro-batch's tokens per rank (training: data.max_tokens // sp)."
            )
    return Targets(
        kernels=swapped, experts=experts, expert_params=expert_params, compile=blocks, recompute=recompute,
        offload=offload, fsdp_units=units, fp32=fp32, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
    )  # fmt: skip


def apply_ep(
    model: nn.Module, mesh: ParallelMesh, plan: ParallelPlan, targets: Targets, config: ParallelizeConfig
) -> list[str]:
    """Split the experts over the `ep` mesh (nothing when ep == 1); returns their names."""
    if mesh.dims.ep == 1:
        return []
    apply_expert_parallel(
        model, mesh, plan, targets.experts, targets.expert_params, config.ep_async, config.expert_compute,
        config.ep_dispatch, config.ep_token_bound,
    )  # fmt: skip
    return [fqn for fqn, _ in targets.experts]


def apply_recompute_and_offload(
    targets: Targets, mode: Recompute
) -> tuple[list[str], dict[str, ActivationOffloader]]:
    """Wrap the recompute modules' forward in activation checkpointing (`mode`), then the offload
    modules' in saved-tensor hooks that move activations to the host; returns both by name."""
    for fqn, module in targets.recompute:
        apply_recompute(module, fqn, mode)
    offloaded = {fqn: apply_activation_offload(module, fqn) for fqn, module in targets.offload}
    return [fqn for fqn, _ in targets.recompute], offloaded


def apply_fsdp(
    model: nn.Module, mesh: ParallelMesh, targets: Targets, config: ParallelizeConfig
) -> tuple[list[str], list[str], tuple[str, ...]]:
    """Shard the FSDP units, fp32 units, expert modules (under ep > 1) and the root, innermost first;
    returns (FSDP unit names, fp32 unit names, the data-parallel mesh's dims)."""
    dp_mesh = mesh.data_parallel_mesh(replicate=mesh.dims.dp_replicate > 1)
    offload_policy: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=mesh.world.device_type == "cuda")
        if config.offload_params
        else OffloadPolicy()
    )
    mp = MixedPrecisionPolicy(param_dtype=targets.param_dtype, reduce_dtype=targets.reduce_dtype)
    # fp32 modules compute in fp32 but hand the block's compute dtype back to their parent.
    mp_fp32 = MixedPrecisionPolicy(
        param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=targets.param_dtype
    )
    # Expert weights are already split over `ep`; FSDP shards each EP shard over the ranks that hold
    # the same experts (ep_fsdp), replicated over dp_replicate.
    expert_mesh = mesh["ep_hsdp"] if mesh.dims.dp_replicate > 1 else mesh["ep_fsdp"]
    experts = targets.experts if mesh.dims.ep > 1 else []

    def shard(module: nn.Module, policy: MixedPrecisionPolicy, reshard: bool, on=None) -> FSDPModule:
        fully_shard(
            module,
            mesh=dp_mesh if on is None else on,
            mp_policy=policy,
            offload_policy=offload_policy,
            reshard_after_forward=reshard,
        )
        assert isinstance(module, FSDPModule)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
        return module

    # Innermost first: a unit must be sharded before any unit that contains it.
    expert_names, fp32_names = {f for f, _ in experts}, {f for f, _ in targets.fp32}
    sharded, fp32_units = [], []
    for fqn, module in sorted(targets.fsdp_units + targets.fp32 + experts, key=lambda x: -x[0].count(".")):
        if fqn in expert_names:
            shard(module, mp, config.reshard_after_forward, on=expert_mesh)
        elif fqn in fp32_names:
            shard(module, mp_fp32, config.reshard_after_forward)
            fp32_units.append(fqn)
        else:
            sharded.append((fqn, shard(module, mp, config.reshard_after_forward)))
    # The root's parameters (embeddings, head) are needed again at the start of backward: keep them.
    shard(model, mp, reshard=False)
    if config.forward_prefetch:
        _prefetch_forward(model, sharded, config.forward_prefetch)
    return [fqn for fqn, _ in sharded], fp32_units, tuple(dp_mesh.mesh_dim_names or ())


def _prefetch_forward(model: nn.Module, units: list[tuple[str, FSDPModule]], ahead: int) -> None:
    """Each FSDP unit issues the all-gathers of the `ahead` units that follow it in forward order."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    in_forward_order = [m for _, m in sorted(units, key=lambda x: order[x[0]])]
    for i, unit in enumerate(in_forward_order):
        following = in_forward_order[i + 1 : i + 1 + ahead]
        if following:
            unit.set_modules_to_forward_prefetch(following)


def _log(report: ParallelizeReport, config: ParallelizeConfig) -> None:
    log.info(
        "parallelize: %d FSDP units on mesh %s, %d fp32 units, recompute=%s on %d modules, "
        "activation offload on %d modules, param offload=%s, %d modules swapped for kernels, "
        "compile=%s (%s) on %d blocks",
        len(report.fsdp_units), report.mesh_dims, len(report.fp32_units), config.recompute,
        len(report.recomputed), len(report.offloaded), config.offload_params, len(report.kernels),
        config.compile, config.compile_backend, len(report.compiled),
    )  # fmt: skip


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduces the gradients of every FSDP unit in `model` (reduce-scatter, and
    HSDP's all-reduce). Off, each rank accumulates its unsharded gradients until a backward with it on."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(enabled, recurse=False)


def _inside(fqn: str, outer: str) -> bool:
    return fqn.startswith(outer + ".")


def _check_combination(units, fp32, recompute, offload, config: ParallelizeConfig) -> None:
    both = sorted({f for f, _ in units} & {f for f, _ in fp32})
    if both:
        raise PlanError(
            f"{both[:3]} listed in both plan.fsdp_units and plan.fp32_modules; list each module once."
        )
    if recompute and offload:
        both = sorted({f for f, _ in recompute} & {f for f, _ in offload})
        if both:
            raise PlanError(
                f"ParallelizeConfig: recompute={config.recompute!r} and offload_activations=True both apply to "
                f"{both[:3]}; a recomputed module keeps no activations to offload, so choose one of them."
            )
    if config.recompute == "selective":
        for outer, _ in recompute:
            nested = [f for f, _ in fp32 if _inside(f, outer)]
            if nested:
                raise PlanError(
                    f"selective recompute of {outer!r} would contain the fp32 FSDP unit {nested[0]!r}, whose "
                    "hooks are not replayed op for op; use recompute='full', or drop it from plan.fp32_modules."
                )
