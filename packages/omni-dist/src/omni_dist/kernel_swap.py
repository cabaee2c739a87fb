"""Replace modules by a kernel set's modules, from outside the model (on the meta model, before the other
parallel treatments wrap anything).

The plan names the modules and their kernel (plan.kernels: pattern -> "rms_norm", "swiglu", ...); a kernel
set (e.g. omni_models.kernels) says how each kernel builds its replacement from the module it replaces.
A replacement holds the same parameters and buffers under the same names, so checkpoints, HF export, the
weight init and the plan's other patterns read it unchanged: checked here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from omni_dist.plan import PlanError

KernelSwap = Callable[[nn.Module], nn.Module]  # the module to replace -> its replacement


def swap_kernels(
    model: nn.Module, matches: list[tuple[str, nn.Module, str]], swaps: Mapping[str, KernelSwap]
) -> dict[str, str]:
    """Replace each matched module (qualified name, module, kernel name) by `swaps[kernel](module)`;
    returns qualified name -> kernel name."""
    missing = sorted({kernel for _, _, kernel in matches} - set(swaps))
    if missing:
        raise PlanError(
            f"plan.kernels asks for {missing}, which the kernel set lacks (it has {sorted(swaps)})."
        )
    done: dict[str, str] = {}
    # Innermost first: a replacement adopts its module's children, already replaced (Qwen3's q/k norms
    # inside its attention).
    for fqn, _, kernel in sorted(matches, key=lambda x: -x[0].count(".")):
        module = model.get_submodule(fqn)
        new = swaps[kernel](module)
        if new is module:  # the kernel set keeps torch's module here
            continue
        before, after = _tensors(module), _tensors(new)
        if before != after:
            raise PlanError(
                f"kernel {kernel!r} would change the tensors of {fqn!r} ({type(module).__name__} -> "
                f"{type(new).__name__}): {sorted(before.items() ^ after.items())[:4]}"
            )
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent), name, new)
        done[fqn] = kernel
    return done


def _tensors(module: nn.Module) -> dict[str, tuple]:
    named = [*module.named_parameters(), *module.named_buffers()]
    return {n: (tuple(t.shape), t.dtype) for n, t in named}
