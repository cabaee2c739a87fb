"""Local expert computation: grouped_mm equals the per-expert loop (outputs and gradients, experts
with no rows included); the choice is checked before anything runs. The padded dispatch's expert functions
(no host counts) equal the exact computation on the routed slots, and padding adds exactly nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omni_dist.expert_compute import (
    fused_gate_up_compute,
    fused_gate_up_padded,
    grouped_mm_status,
    resolve_expert_compute,
)
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


def _padded_inputs(experts: int, k: int):
    """10 tokens; slot value `experts` = routed to another rank; the last 3 rows are padding (no slot here);
    local expert 1 gets no slot."""
    g = torch.Generator().manual_seed(1)
    total = experts * 3  # the global experts: 3 ranks' worth
    index = torch.stack([torch.randperm(total, generator=g)[:k] for _ in range(10)])
    local = torch.where(index < experts, index, experts)
    local = torch.where(local == 1, experts, local)
    local[7:] = experts
    x = torch.randn(10, H, generator=g)
    x[7:] = 0  # padding rows are zeros, as the dispatch pads them
    weights = torch.rand(10, k, generator=g)
    gate_up = torch.randn(experts, 2 * INTER, H, generator=g)
    down = torch.randn(experts, H, INTER, generator=g)
    return x, local, weights, gate_up, down


def _padded_run(compute: str, experts: int, k: int) -> tuple[torch.Tensor, ...]:
    """`compute`: a padded expert function's implementation, or "exact" for the exact computation."""
    x, local, weights, gate_up, down = _padded_inputs(experts, k)
    for t in (x, weights, gate_up, down):
        t.requires_grad_()
    if compute == "exact":
        out = _exact_on_slots(gate_up, down, x, local, weights)
    else:
        out = fused_gate_up_padded(gate_up, down, F.silu, compute)(x, local, weights)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    return out.detach(), x.grad, weights.grad, gate_up.grad, down.grad


def _exact_on_slots(gate_up, down, x, local, weights):
    """The exact dispatch's computation: the routed slots sorted by expert, host counts, weighted sum."""
    experts = gate_up.shape[0]
    slots = sorted((int(e), t, j) for (t, j), e in np.ndenumerate(local.numpy()) if e < experts)
    token, slot = torch.tensor([t for _, t, _ in slots]), torch.tensor([j for _, _, j in slots])
    counts = [sum(1 for e, _, _ in slots if e == i) for i in range(experts)]
    y = fused_gate_up_compute(gate_up, down, F.silu, "loop")(x[token], counts)
    return torch.zeros_like(x).index_add(0, token, y * weights[token, slot][:, None])


@pytest.mark.parametrize(("experts", "k"), [(4, 2), (2, 3)])  # (2, 3): a token has fewer local slots than k
def test_padded_expert_functions_equal_the_exact_computation(experts, k):
    want = _padded_run("exact", experts, k)
    for compute in ("grouped_mm", "loop"):
        got = _padded_run(compute, experts, k)
        for name, a, b in zip(("out", "x", "weights", "gate_up", "down"), got, want, strict=True):
            torch.testing.assert_close(a, b, msg=f"{compute} {name}")
        out, x_grad, w_grad, gate_up_grad, _ = got
        assert not out[7:].any() and not x_grad[7:].any() and not w_grad[7:].any(), compute  # padding: 0
        assert not gate_up_grad[1].any(), compute  # the idle expert
