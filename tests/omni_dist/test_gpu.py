"""GPU-only paths (skipped without CUDA): varlen/flash-attn backends and activation offload to pinned memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omni_dist.attention import BACKENDS, backend_status, sdpa_varlen
from omni_dist.recompute import apply_activation_offload

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["varlen", "flash_attn"])
def test_gpu_backend_equals_sdpa(backend):
    reason = backend_status("cuda")[backend]
    if reason != "ok":
        pytest.skip(reason)
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [100, 37, 250, 9]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    total = sum(lengths)

    def inputs():
        return [
            torch.randn(total, h, 64, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
            for h in (8, 2, 2)
        ]

    q, k, v = inputs()
    ref_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = BACKENDS[backend](q, k, v, cu, max(lengths), None, True)
    ref = sdpa_varlen(*ref_in, cu, max(lengths), None, True)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    for a, b in zip((q, k, v), ref_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=5e-2, atol=5e-2)


def test_activation_offload_moves_activations_not_weights():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).cuda()
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    block(x).square().sum().backward()
    want = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    offloader = apply_activation_offload(block, "block")
    block(x).square().sum().backward()
    assert offloader.offloaded_bytes > 0 and offloader.params_kept > 0
    for p, w in zip(block.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, w)


def test_grouped_mm_experts_match_loop_in_bf16():
    from omni_dist.expert_compute import fused_gate_up_compute, grouped_mm_status

    reason = grouped_mm_status(torch.device("cuda"), torch.bfloat16, (256, 128))
    if reason != "ok":
        pytest.skip(reason)
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = [300, 0, 17, 211, 0, 64, 5, 99]
    params = [
        torch.randn(8, 256, 256, generator=g, device="cuda", dtype=torch.bfloat16) * 0.05,  # gate_up
        torch.randn(8, 256, 128, generator=g, device="cuda", dtype=torch.bfloat16) * 0.05,  # down
        torch.randn(sum(counts), 256, generator=g, device="cuda", dtype=torch.bfloat16),  # rows
    ]
    grad = torch.randn(sum(counts), 256, generator=g, device="cuda", dtype=torch.bfloat16)
    results = []
    for compute in ("grouped_mm", "loop"):
        gate_up, down, rows = (p.clone().requires_grad_() for p in params)
        out = fused_gate_up_compute(gate_up, down, torch.nn.functional.silu, compute)(rows, counts)
        (out * grad).sum().backward()
        results.append((out, rows.grad, gate_up.grad, down.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
