"""Kernel sets: which functions compute RMSNorm, SwiGLU, RoPE and the LM head's cross-entropy chunks.

`parallel.kernels` (omni_dist.parallelize.Kernels) picks them at parallelize time:
- `torch`: none; the model's own modules and the chunked loss head with torch's ops (omni_dist.loss_head);
- `liger`: liger-kernel's Triton kernels (CUDA, the `gpu` extra) for all four: the plan's `kernels` modules
  are swapped for omni_models.kernel_modules around them, and each chunk of the LM head's loss runs
  liger's cross-entropy kernel in place on the chunk's logits (omni_dist.loss_head chunks; its backward
  scales by the incoming gradient on the device, where liger's own fused function compares it with 1.0
  on the host);
- `auto`: per kernel, whichever of liger and torch is faster, measured on this device at the model's widths
  (omni_models.kernel_timing); torch where liger cannot run, and for the block kernels of compiled blocks
  (inductor fuses those itself). One log line says what was chosen and why.
Nothing is patched: the swaps are module replacements on the meta model (omni_dist.kernel_swap).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from omni_dist.kernel_swap import KernelSwap
from omni_dist.loss_head import ChunkCrossEntropy
from omni_models.kernel_modules import KernelRMSNorm, RMSNormFn, RopeFn, RotaryAttention, SiluMulFn, SwiGLUMLP

log = logging.getLogger(__name__)

# kernel name (as plans and log lines write it) -> the KernelSet field that holds its function
KERNEL_FIELDS = {
    "rms_norm": "rms_norm",
    "swiglu": "silu_mul",
    "rope": "rope",
    "cross_entropy": "chunk_cross_entropy",
}
KERNELS = tuple(KERNEL_FIELDS)


@dataclass(frozen=True)
class KernelSet:
    """A kernel per name; None keeps torch's (the model's own module, or the torch chunk kernel)."""

    name: str
    rms_norm: RMSNormFn | None = None
    silu_mul: SiluMulFn | None = None
    rope: RopeFn | None = None
    chunk_cross_entropy: ChunkCrossEntropy | None = None

    def swaps(self) -> dict[str, KernelSwap]:
        """Kernel name (as plans write it) -> the replacement of a module; a kernel this set leaves to torch
        keeps the module as it is."""
        keep: KernelSwap = lambda m: m  # noqa: E731
        swaps: dict[str, KernelSwap] = {"rms_norm": keep, "swiglu": keep, "rope": keep}
        if self.rms_norm is not None:
            swaps["rms_norm"] = lambda m: KernelRMSNorm(m, self.rms_norm)
        if self.silu_mul is not None:
            swaps["swiglu"] = lambda m: SwiGLUMLP(m, self.silu_mul)
        if self.rope is not None:
            swaps["rope"] = lambda m: RotaryAttention(m, self.rope)
        return swaps

    def only(self, kernels: set[str]) -> KernelSet | None:
        """This set with only `kernels` (names of KERNELS); None when that leaves none."""
        if not kernels:
            return None
        return dataclasses.replace(self, **{f: None for k, f in KERNEL_FIELDS.items() if k not in kernels})


def liger_kernels() -> KernelSet:
    """liger-kernel's functions (raises ImportError without it)."""
    from liger_kernel.transformers.functional import liger_rms_norm, liger_rope, liger_swiglu

    from omni_models.liger_ce import liger_chunk_cross_entropy

    def rms_norm(x, weight, eps):
        # out of place: in place, liger overwrites the incoming gradient, which the residual branch shares
        return liger_rms_norm(x, weight, eps, 0.0, "llama", False)

    def rope(q, k, cos, sin):
        # liger rotates in the storage it is given: here the q/k projections' outputs, which selective
        # recompute keeps for backward; a copy keeps them as they were
        return liger_rope(q.clone(), k.clone(), cos, sin)

    return KernelSet("liger", rms_norm, liger_swiglu, rope, liger_chunk_cross_entropy)


def liger_status(device_type: str) -> str:
    """ "ok", or why liger's kernels cannot run here."""
    if device_type != "cuda":
        return f"liger-kernel's Triton kernels run on CUDA, this run's device is {device_type}"
    try:
        liger_kernels()
    except ImportError as e:
        return f"liger-kernel is not usable ({e}); install the `gpu` extra (uv sync --extra gpu)"
    return "ok"


def select_kernels(
    choice: str,
    device_type: str,
    announce: bool = True,
    measure=None,
    compiled: bool = False,
) -> KernelSet | None:
    """The kernel set `choice` (auto | liger | torch) names on `device_type`; None: torch's own modules.

    `measure`: for `auto` where liger runs, a function (KernelSet) -> {kernel: (torch ms, liger ms)}
    (omni_models.kernel_timing.measure_kernels bound to the model's shapes); `compiled`: the blocks are
    compiled, so the block kernels stay torch's."""
    say = log.info if announce else (lambda *a: None)
    if choice == "torch":
        say("kernels: torch (requested)")
        return None
    status = liger_status(device_type)
    if status != "ok":
        if choice == "liger":
            raise ValueError(
                f"parallel.kernels=liger cannot run: {status}. Use parallel.kernels=auto or torch."
            )
        say("kernels: torch (auto: %s)", status)
        return None
    liger = liger_kernels()
    if choice == "liger":
        say("kernels: liger (requested)")
        return liger
    return auto_kernels(liger, measure, compiled, say)


def auto_kernels(candidate: KernelSet, measure, compiled: bool, say=log.info) -> KernelSet | None:
    """`candidate`'s kernels that measured faster than torch's (block kernels only when the blocks are not
    compiled); None: torch's everywhere."""
    wanted = {"cross_entropy"} if compiled else set(KERNELS)
    subset = candidate.only(wanted)
    times = measure(subset) if measure is not None and subset is not None else {}
    chosen = {k for k, (torch_ms, other_ms) in times.items() if other_ms < torch_ms}
    detail = ", ".join(
        f"{k} {t:.3f}/{o:.3f} ms -> {candidate.name if k in chosen else 'torch'}"
        for k, (t, o) in times.items()
    )
    say(
        "kernels: auto, measured torch/%s on this device%s: %s",
        candidate.name,
        " (compiled blocks: inductor fuses the block kernels)" if compiled else "",
        detail or "nothing measured -> torch",
    )
    return candidate.only(chosen)
