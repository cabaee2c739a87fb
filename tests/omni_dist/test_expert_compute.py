"""Local expert computation: grouped_mm equals the per-expert loop (outputs and gradients, experts
with no rows included); the choice is checked before anything runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omni_dist.expert_compute import fused_gate_up_compute, grouped_mm_status, resolve_expert_compute
from omni_dist.parallel_dims import ParallelConfigError

E, H, INTER = 4, 16, 8
COUNTS = [5, 0, 9, 0]  # experts 1 and 3 get no rows


def _run(compute: str, counts: list[int]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(E, 2 * INTER, H, generator=g).requires_grad_()
    down = torch.randn(E, H, INTER, generator=g).requires_grad_()
    rows = torch.randn(sum(counts), H, generator=g).requires_grad_()
    out = fused_gate_up_compute(gate_up, down, F.silu, compute)(rows, counts)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), rows.grad, gate_up.grad, down.grad


@pytest.mark.parametrize("counts", [COUNTS, [0, 0, 0, 0]])
def test_grouped_mm_equals_loop_exactly_on_cpu(counts):
    assert resolve_expert_compute("auto", torch.device("cpu"), torch.float32, (H, INTER)) == "grouped_mm"
    grouped, loop = _run("grouped_mm", counts), _run("loop", counts)
    for a, b in zip(grouped, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert grouped[2][1].abs().sum() == 0 and grouped[3][3].abs().sum() == 0  # idle experts: zero grads


def test_bad_choices_fail_clearly():
    with pytest.raises(ParallelConfigError, match="not one of auto, loop, grouped_mm"):
        resolve_expert_compute("cutlass", torch.device("cpu"), torch.float32, (H, INTER))
    # 6 fp32 columns are 24 bytes: not 16-byte aligned, so grouped_mm cannot run; auto falls back.
    assert "divisible by 4" in grouped_mm_status(torch.device("cpu"), torch.float32, (H, 6))
    assert resolve_expert_compute("auto", torch.device("cpu"), torch.float32, (H, 6)) == "loop"
    with pytest.raises(ParallelConfigError, match=r"grouped_mm cannot run: .*divisible by 4"):
        resolve_expert_compute("grouped_mm", torch.device("cpu"), torch.float32, (H, 6))
