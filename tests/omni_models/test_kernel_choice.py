"""`parallel.kernels: auto` chooses each kernel by a measurement, not by what is importable.

On CPU, liger cannot run: auto is torch with its reason. The choice itself (auto_kernels) is checked with a
candidate set of torch formulas and given timings; the measurement (kernel_timing.measure_kernels) runs
on CPU here with the same formulas (on a GPU, tests/omni_models/test_kernels_gpu.py measures liger's)."""

from __future__ import annotations

import logging

import torch

from omni_models.kernel_timing import KernelShapes, measure_kernels
from omni_models.kernels import KERNELS, auto_kernels, select_kernels
from tests.omni_models.kernel_refs import TORCH_FORMULAS

SHAPES = KernelShapes(
    tokens=64, hidden=32, intermediate=48, heads=4, kv_heads=2, head_dim=8, vocab=100, chunk=16
)


def test_measurement_times_every_kernel_of_the_candidate():
    times = measure_kernels(SHAPES, TORCH_FORMULAS, torch.device("cpu"), torch.float32, repeats=2)
    assert sorted(times) == sorted(KERNELS)
    assert all(t > 0 and c > 0 for t, c in times.values())
    ce_only = measure_kernels(
        SHAPES, TORCH_FORMULAS.only({"cross_entropy"}), torch.device("cpu"), torch.float32
    )
    assert list(ce_only) == ["cross_entropy"]


def test_auto_keeps_only_the_kernels_that_measured_faster(caplog):
    timings = {"rms_norm": (1.0, 0.6), "swiglu": (1.0, 1.1), "rope": (1.0, 0.7), "cross_entropy": (2.0, 2.5)}
    asked = []

    def measure(kernels):
        asked.append(kernels)
        return {k: timings[k] for k in KERNELS if _has(kernels, k)}

    with caplog.at_level(logging.INFO, logger="omni_models.kernels"):
        chosen = auto_kernels(TORCH_FORMULAS, measure, compiled=False)
    assert chosen.rms_norm is not None and chosen.rope is not None
    assert chosen.silu_mul is None and chosen.chunk_cross_entropy is None
    swaps = chosen.swaps()
    module = torch.nn.Identity()
    assert swaps["swiglu"](module) is module  # left to torch: the module stays
    assert swaps["rms_norm"] is not swaps["swiglu"] and swaps["rope"] is not swaps["swiglu"]
    assert "swiglu 1.000/1.100 ms -> torch" in caplog.messages[-1]
    assert "rms_norm 1.000/0.600 ms -> torch-formulas" in caplog.messages[-1]

    # compiled blocks: only the loss head's kernel is measured; the block kernels stay torch's
    timings["cross_entropy"] = (2.0, 1.5)
    chosen = auto_kernels(TORCH_FORMULAS, measure, compiled=True)
    assert (
        chosen.rms_norm is chosen.silu_mul is chosen.rope is None and chosen.chunk_cross_entropy is not None
    )
    assert [k for k in KERNELS if _has(asked[-1], k)] == ["cross_entropy"]

    # all slower: torch everywhere
    for k in timings:
        timings[k] = (1.0, 2.0)
    assert auto_kernels(TORCH_FORMULAS, measure, compiled=False) is None


def _has(kernels, name: str) -> bool:
    field = {
        "rms_norm": "rms_norm",
        "swiglu": "silu_mul",
        "rope": "rope",
        "cross_entropy": "chunk_cross_entropy",
    }
    return getattr(kernels, field[name]) is not None


def test_auto_on_cpu_is_torch_with_the_reason(caplog):
    with caplog.at_level(logging.INFO, logger="omni_models.kernels"):
        assert select_kernels("auto", "cpu", measure=lambda k: 1 / 0) is None
    assert caplog.messages == [
        "kernels: torch (auto: liger-kernel's Triton kernels run on CUDA, this run's device is cpu)"
    ]
