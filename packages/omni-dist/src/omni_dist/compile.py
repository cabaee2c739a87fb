"""torch.compile of each repeated block (decoder layers, vision blocks, encoder layers): plan.compile.

As torchtitan does, each block is compiled on its own, in place, before FSDP: its parameter names,
state dict and FSDP unit stay what they were, and blocks of one class share their compiled code (dynamo
inlines the module and takes its parameters as graph inputs, so one graph serves every layer).

Two choices differ from torchtitan's `block.compile()`, for what our blocks meet:
- The block's `forward` is compiled, not its `__call__`: the block's own hooks (FSDP2's all-gathers,
  HF's output-capture hook, which reads a ContextVar dynamo cannot trace) run eagerly around the compiled
  code instead of breaking its graph. Hooks on its submodules are still traced: HF's capture hook on
  each attention module (installed once a caller asks for hidden states, as OmniModel does) splits a
  decoder layer into three graphs.
- The blocks compile before the recompute and offload wrappers, which then wrap the compiled forward.
  A checkpoint traced inside a compiled region needs the whole block as one graph; HF blocks in the omni
  model break theirs (output-capture hooks, Qwen2-VL vision attention split on the host), and dynamo
  would then run such a block entirely eagerly, silently. Outside, full recompute replays the compiled
  forward. Selective recompute cannot work there: its policy chooses among the block's ops, and a
  compiled block runs as fused kernels whose intermediate ops it never sees (parallelize rejects it).

Packed micro-batches change length every step: blocks compile with `dynamic=True`, so the token
dimension, the number of documents (cu_seqlens) and max_seqlen are symbolic from the first call and a
new packed length reuses the graph. Parameters stay static (dynamo's default), so widths specialise
through the matmuls. Recompiles remain for a new block class, a size-1 dimension (specialised), sizes
that coincided on the first call (dynamo's duck sizing), and in frames dynamo resumes after a graph
break, which compile static first and dynamic on the first change: Qwen2-VL's vision attention splits
the patches by image on the host, a graph per new number of images (up to dynamo's recompile_limit).
Blocks of all classes are entered through the same compiled code object when they share a `forward`
(HF's GradientCheckpointingLayer wrapper), so they share that limit (8 per code object by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import nn

from omni_dist.plan import PlanError

# inductor: fused kernels, for runs; aot_eager: the same forward/backward graphs run op by op (to bisect
# a numerical difference); eager: dynamo's graphs as they are (to see graph breaks and recompiles fast).
CompileBackend = Literal["inductor", "aot_eager", "eager"]
COMPILE_BACKENDS: tuple[str, ...] = get_args(CompileBackend)


def check_compile(enabled: bool, backend: str, recompute: str) -> None:
    """Fail before touching the model when compile cannot do what the config asks with it."""
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile_backend={backend!r} is not one of {', '.join(COMPILE_BACKENDS)}.")
    if enabled and recompute == "selective":
        raise PlanError(
            "ParallelizeConfig: compile=True with recompute='selective': the selective policy keeps chosen "
            "ops' outputs, but a compiled block runs as fused kernels whose ops it cannot see, so it would "
            "recompute the whole block. Use recompute='full' with compile, or compile=False."
        )


def check_compiled_experts(
    blocks: Sequence[tuple[str, nn.Module]], experts: Sequence[tuple[str, nn.Module]], ep: int
) -> None:
    """Expert parallelism inside a compiled block is refused: its forward (an all-to-all dispatch around
    an FSDP unit of its own on the EP mesh) fails under dynamo, which sees expert tensors that are not
    split over ep (torch 2.13)."""
    inside = [e for e, _ in experts if any(e.startswith(b + ".") for b, _ in blocks)]
    if ep > 1 and inside:
        raise PlanError(
            f"compile=True with ep={ep}: the experts {inside[:2]} run their expert-parallel forward inside "
            "compiled blocks, which does not work yet. Use compile=False with ep > 1, or ep=1."
        )


def apply_compile(blocks: Sequence[tuple[str, nn.Module]], backend: str = "inductor") -> list[str]:
    """Compile each (qualified name, block)'s forward in place; returns the names. `backend` is one of
    COMPILE_BACKENDS or, in tests, a dynamo backend callable (e.g. one that counts compilations)."""
    for _, module in blocks:
        module.forward = torch.compile(module.forward, backend=backend, dynamic=True)
    return [fqn for fqn, _ in blocks]
